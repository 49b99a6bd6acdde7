"""lm as lm-evaluation-harness's model `lm` (lm/evaluation/lm_eval_model.py), offline: its
tasks from local YAML over local JSON lines score what lm's own reader and scorer do, on
conftest's `pretrained` run."""

import json
import os

os.environ.setdefault('HF_DATASETS_OFFLINE', '1')  # Before `datasets` is imported.

import numpy as np  # noqa: E402
import pytest  # noqa: E402

lm_eval = pytest.importorskip('lm_eval')  # In the test extra; skipped only without it.

from lm import sharding  # noqa: E402
from lm.evaluation import benchmarks, harness, scoring  # noqa: E402
from lm.evaluation import lm_eval_model  # noqa: E402,F401 (registers the model 'lm')
from lm.training import checkpointing  # noqa: E402


ARC = [dict(id=str(i), question=question, choices=dict(text=texts, label=['A', 'B', 'C']),
            answerKey=key) for i, (question, texts, key) in enumerate([
                ('Which is a gas?', ['ice', 'steam', 'iron'], 'B'),
                ('What do plants need?', ['sunlight', 'plastic', 'sand'], 'A'),
                ('Which is largest?', ['an ant', 'a mouse', 'an elephant'], 'C'),
                ('What melts ice?', ['heat', 'cold', 'darkness'], 'A')])]

TASKS = '''
task: lm_arc_local
dataset_path: json
dataset_kwargs:
  data_files:
    test: {arc}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{choices.label.index(answerKey)}}}}"
doc_to_choice: "{{{{choices.text}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
---
task: lm_text_local
dataset_path: json
dataset_kwargs:
  data_files:
    test: {text}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
---
task: lm_generate_local
dataset_path: json
dataset_kwargs:
  data_files:
    test: {text}
test_split: test
output_type: generate_until
doc_to_text: "{{{{text}}}}"
doc_to_target: "{{{{text}}}}"
generation_kwargs:
  until: ["\\n\\n", "Q:"]
  max_gen_toks: 12
  do_sample: false
metric_list:
  - metric: exact_match
'''


def write(tmp_path):
  arc, text = tmp_path / 'arc.jsonl', tmp_path / 'text.jsonl'
  arc.write_text(''.join(json.dumps(r) + '\n' for r in ARC))
  text.write_text(''.join(json.dumps({'text': t}) + '\n' for t in (
      'the cat sat on the mat', 'def f(x):\n    return x + 1', 'red trees and blue houses')))
  tasks = tmp_path / 'tasks'
  tasks.mkdir()
  for index, document in enumerate(TASKS.format(arc=arc, text=text).split('---')):
    (tasks / f'task_{index}.yaml').write_text(document)
  return arc, text, tasks


def test_the_harness_runs_lm_and_agrees_with_lms_own_scoring(pretrained, tmp_path):
  workdir, _ = pretrained
  arc, text, tasks = write(tmp_path)
  from lm_eval.tasks import TaskManager  # pylint: disable=import-outside-toplevel
  out = lm_eval.simple_evaluate(
      model='lm', model_args=f'workdir={workdir},batch_size=4',
      tasks=['lm_arc_local', 'lm_text_local', 'lm_generate_local'],
      task_manager=TaskManager(include_path=str(tasks)), log_samples=True)
  run = checkpointing.restore_for_inference(workdir)
  scorer = scoring.Scorer.for_run(run, batch_size=4)
  task = benchmarks.load(f'arc:{arc}')
  with sharding.activate(run.mesh):
    ours = harness.evaluate(task, scorer)
    pairs = [(r['context'], ' ' + c) for r in task.records for c in r['choices']]
    ours_ll = [s[0] for s in scorer.continuation_log_likelihoods(pairs)]
    texts = [json.loads(line)['text'] for line in text.read_text().splitlines()]
    rolling = [scorer.document_log_likelihood(t)[0] for t in texts]
    generated = [c.text for c in scorer.complete(texts, max_new_tokens=12, temperature=0.0,
                                                 seed=0, stops=('\n\n', 'Q:'))]
  results = out['results']
  assert results['lm_arc_local']['acc,none'] == ours['acc']
  assert results['lm_arc_local']['acc_norm,none'] == ours['acc_norm']
  samples = sorted(out['samples']['lm_arc_local'], key=lambda s: s['doc_id'])
  theirs_ll = [resp[0][0] for sample in samples for resp in sample['resps']]
  np.testing.assert_allclose(theirs_ll, ours_ll, rtol=1e-5)
  samples = sorted(out['samples']['lm_text_local'], key=lambda s: s['doc_id'])
  np.testing.assert_allclose([s['resps'][0][0] for s in samples], rolling, rtol=1e-5)
  samples = sorted(out['samples']['lm_generate_local'], key=lambda s: s['doc_id'])
  assert [s['resps'][0][0] for s in samples] == generated


def test_an_unknown_task_is_one_line(commands, pretrained):
  result = commands('experiments.lm_eval', '--model', 'lm', '--model_args',
                    f'workdir={pretrained[0]}', '--tasks', 'no_such_task')
  assert result.returncode == 1 and 'Traceback' not in result.stderr, result.stderr[-2000:]
  assert result.stderr.strip().splitlines()[-1] == (
      'error: --tasks: Tasks not found: no_such_task'), result.stderr[-2000:]
