"""Does lm's evaluation give lm-evaluation-harness's numbers? Three ways, on one transformers
checkpoint and one set of task files:

  hf          lm_eval's own HF backend on the transformers model: the reference;
  lm          `experiments.evaluate --log_samples` on the model `experiments.convert` imports;
  lm_harness  lm_eval with lm as its model (lm/evaluation/lm_eval_model.py).

The harness runs its own task configs (mmlu_<subject> 5-shot, hellaswag, arc_easy,
gsm8k_cot 8-shot) pointed at the local files, and a perplexity task shaped like its
wikitext (loglikelihood_rolling):

  python -m experiments.eval_parity --tiny
  python -m experiments.eval_parity --hf_dir=DIR --mmlu=DIR --hellaswag=FILE --arc=FILE \
      --gsm8k=FILE --perplexity=FILE [--workdir=W]

The files are in each benchmark's Hugging Face layout (lm/evaluation/benchmarks.py reads
the same): MMLU as DIR/{dev,test}.jsonl, the others JSON lines, perplexity {"text": ...}.
--tiny writes a few records of each and two tiny random checkpoints (a Llama whose
tokenizer adds bos, a Qwen2 whose tokenizer adds none) in a temporary directory.

Prints a table: per task and metric the three values, and per task the largest difference
of a record's log-likelihood (each choice's, or each document's rolling one) from hf's, or
how many chain-of-thought completions equal hf's, and whether lm's prompts (and GSM8K's
stop strings) are the harness's. Exits 1 unless every log-likelihood is within 1e-4 of
hf's (a sum past ~400 nats: within float32's rounding of it, FLOAT32_ROUNDING) and the
accuracies, prompts, completions and exact matches are equal. Needs the `eval` and `test`
extras (lm_eval, transformers, torch) and accelerate (the harness's HF backend imports it).
"""

import concurrent.futures
import dataclasses
import json
import os
import random
import re
import subprocess
import sys
import tempfile

from absl import app, flags

# The harness reads the local task files; nothing is downloaded.
os.environ.setdefault('HF_DATASETS_OFFLINE', '1')
os.environ.setdefault('HF_HUB_OFFLINE', '1')

_TINY = flags.DEFINE_bool('tiny', False, 'Build two tiny checkpoints and the task files.')
_HF_DIR = flags.DEFINE_string('hf_dir', None, 'A transformers checkpoint directory.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'The lm run imported from --hf_dir (made'
                               ' if missing; default: a temporary directory).')
_FILES = {kind: flags.DEFINE_string(kind, None, what) for kind, what in (
    ('mmlu', 'Directory of dev.jsonl and test.jsonl (one subject).'),
    ('hellaswag', 'HellaSwag JSON lines.'), ('arc', 'ARC JSON lines.'),
    ('gsm8k', 'GSM8K JSON lines.'), ('perplexity', 'JSON lines of {"text": ...}.'))}
_BATCH_SIZE = flags.DEFINE_integer('batch_size', 4, 'lm\'s sequences per forward pass.')

KINDS = ('mmlu', 'hellaswag', 'arc', 'gsm8k', 'perplexity')
BACKENDS = ('hf', 'lm', 'lm_harness')
LOG_LIKELIHOOD_TOLERANCE = 1e-4
# Every way sums log-probabilities in float32, which holds a sum x only to about
# |x| * 2**-23 (a document of 5,000 nats: 6e-4); past |x| ~ 400, two such roundings are
# allowed instead of 1e-4.
FLOAT32_ROUNDING = 2 * 2.0**-23
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The harness's configs, under lm_eval/tasks/, that each kind includes.
HARNESS_CONFIGS = {'mmlu': 'mmlu/default/mmlu_{subject}.yaml',
                   'hellaswag': 'hellaswag/hellaswag.yaml', 'arc': 'arc/arc_easy.yaml',
                   'gsm8k': 'gsm8k/gsm8k-cot.yaml'}
# Metrics compared: {kind: [(harness's key, lm's key)]}; perplexity's is the summed
# log-likelihood, from the records.
METRICS = {
    'mmlu': [('acc,none', 'acc')],
    'hellaswag': [('acc,none', 'acc'), ('acc_norm,none', 'acc_norm')],
    'arc': [('acc,none', 'acc'), ('acc_norm,none', 'acc_norm')],
    'gsm8k': [('exact_match,strict-match', 'exact_match_strict'),
              ('exact_match,flexible-extract', 'exact_match_flexible')],
    'perplexity': [],
}


# Tiny task files --------------------------------------------------------------------------

WORDS = ('the a cat dog sat ran on under over mat tree river house small big red blue quiet'
         ' loud man woman child ball water sun moon star green old new fast slow bright dark'
         ' garden kitchen road city field boat train bird fish stone wind rain snow warm cold'
         ' took gave found made saw heard kept left brought carried').split()


def _words(rng: random.Random, count: int) -> str:
  return ' '.join(rng.choice(WORDS) for _ in range(count))


def write_tasks(directory: str, num_records: int = 4, num_generated: int = 2,
                seed: int = 0) -> dict[str, str]:
  """A few records of each benchmark in its Hugging Face layout (`num_generated` of GSM8K,
  whose 256 new tokens make it the slow one), with prompts of well over 128 tokens;
  returns {kind: path}. Some records carry what the formats must handle: HellaSwag's
  [title] and [step] artifacts and a lowercase ctx_b, ARC's numeric labels and five
  choices, MMLU's stray whitespace, GSM8K's commas."""
  rng = random.Random(seed)
  os.makedirs(os.path.join(directory, 'mmlu'), exist_ok=True)
  paths = {kind: os.path.join(directory, f'{kind}.jsonl') for kind in KINDS}
  paths['mmlu'] = os.path.join(directory, 'mmlu')

  def mmlu_row(index):
    return dict(question=(' ' if index % 2 else '') + _words(rng, 40) + '?\n',
                subject='astronomy', choices=[_words(rng, rng.randint(3, 6)) for _ in range(4)],
                answer=rng.randrange(4))
  _write_lines(os.path.join(paths['mmlu'], 'dev.jsonl'), [mmlu_row(i) for i in range(5)])
  _write_lines(os.path.join(paths['mmlu'], 'test.jsonl'),
               [mmlu_row(i) for i in range(num_records)])

  def hellaswag_row(index):
    ctx_a = _words(rng, 150) + (' [title] ' + _words(rng, 5) if index % 2 else '') + '.'
    ctx_b = _words(rng, 8) if index % 3 else ''
    return dict(ind=index, activity_label=_words(rng, 2).capitalize(), ctx_a=ctx_a,
                ctx_b=ctx_b, ctx=f'{ctx_a} {ctx_b}', source_id=f'wikihow~{index}',
                split='val', split_type='indomain', label=str(rng.randrange(4)),
                endings=[('[step] ' if index % 2 else '') + _words(rng, rng.randint(6, 16)) + '.'
                         for _ in range(4)])
  _write_lines(paths['hellaswag'], [hellaswag_row(i) for i in range(num_records)])

  def arc_row(index):
    labels = '12345'[:3 + index % 3] if index % 2 else 'ABCDE'[:3 + index % 3]
    return dict(id=f'Mercury_{index}', question=_words(rng, 160) + '?',
                choices=dict(text=[_words(rng, rng.randint(1, 8)) for _ in labels],
                             label=list(labels)),
                answerKey=rng.choice(labels))
  _write_lines(paths['arc'], [arc_row(i) for i in range(num_records)])

  def gsm8k_row(index):
    total = rng.randint(10, 5000)
    return dict(question=_words(rng, 30) + f' {total // 3} and {total - total // 3}?',
                answer=f'{_words(rng, 12)} <<{total // 3}+{total - total // 3}={total}>>.\n'
                       f'#### {total:,}')
  _write_lines(paths['gsm8k'], [gsm8k_row(i) for i in range(num_generated)])

  # Paragraphs per document: the longer ones span two and three context windows.
  documents = ['\n\n'.join(_words(rng, 60) + '.' for _ in range((1, 8, 3, 12)[index % 4]))
               for index in range(num_records)]
  _write_lines(paths['perplexity'], [{'text': text} for text in documents])
  return paths


def _write_lines(path: str, records: list[dict]) -> None:
  with open(path, 'w', encoding='utf-8') as f:
    f.writelines(json.dumps(record) + '\n' for record in records)


def task_texts(paths: dict[str, str]) -> list[str]:
  """Every string in the task files (and the GSM8K exemplars), to train a tokenizer on."""
  from lm.evaluation import benchmarks  # pylint: disable=import-outside-toplevel
  files = [os.path.join(paths['mmlu'], name) for name in ('dev.jsonl', 'test.jsonl')]
  files += [paths[kind] for kind in KINDS if kind != 'mmlu']
  texts = [text for pair in benchmarks.GSM8K_EXEMPLARS for text in pair]
  for path in files:
    with open(path, encoding='utf-8') as f:
      texts += f.readlines()
  return texts


# Tiny checkpoints -------------------------------------------------------------------------

# {style: (special tokens, bos, eos)}, the style naming transformers' model type (Llama-
# ForCausalLM, Qwen2ForCausalLM): Llama 3's tokenizer puts bos in front of every text;
# Qwen2's adds nothing and names no bos (its config.json's bos_token_id is its eos, as
# Qwen2's own is).
STYLES = {
    'llama': (['<|begin_of_text|>', '<|end_of_text|>'], '<|begin_of_text|>', '<|end_of_text|>'),
    'qwen2': (['<|endoftext|>', '<|im_start|>', '<|im_end|>'], None, '<|endoftext|>'),
}
MAX_POSITION_EMBEDDINGS = 320  # Longer than gsm8k_cot's 256 new tokens, as the harness asks.


def write_checkpoint(directory: str, style: str, texts: list[str], seed: int = 0) -> str:
  """A random 2-layer, width-64 model of `style` with a byte-level BPE tokenizer trained
  on `texts`, saved by transformers (save_pretrained) in `directory`."""
  # pylint: disable=import-outside-toplevel (only --tiny and the tests build checkpoints)
  import tokenizers
  from tokenizers import decoders, models, pre_tokenizers, processors, trainers
  import torch
  import transformers
  specials, bos, eos = STYLES[style]
  bpe = tokenizers.Tokenizer(models.BPE())
  bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  bpe.decoder = decoders.ByteLevel()
  bpe.train_from_iterator(texts, trainers.BpeTrainer(
      vocab_size=600, special_tokens=specials, show_progress=False,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  if bos is None:
    bpe.post_processor = processors.ByteLevel(trim_offsets=False)
  else:
    bpe.post_processor = processors.TemplateProcessing(
        single=f'{bos} $A', pair=f'{bos} $A {bos} $B:1',
        special_tokens=[(bos, bpe.token_to_id(bos))])
  tokenizer = transformers.PreTrainedTokenizerFast(
      tokenizer_object=bpe, bos_token=bos, eos_token=eos, clean_up_tokenization_spaces=False)
  tokenizer.save_pretrained(directory)
  torch.manual_seed(seed)
  eos_id = tokenizer.convert_tokens_to_ids(eos)
  config = transformers.AutoConfig.for_model(
      style, vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
      max_position_embeddings=MAX_POSITION_EMBEDDINGS, tie_word_embeddings=style == 'qwen2',
      eos_token_id=eos_id,
      bos_token_id=eos_id if bos is None else tokenizer.convert_tokens_to_ids(bos))
  transformers.AutoModelForCausalLM.from_config(config).save_pretrained(directory)
  return directory


# Harness task configs ---------------------------------------------------------------------


def harness_task_name(kind: str) -> str:
  return f'parity_{kind}'


def write_harness_tasks(directory: str, paths: dict[str, str]) -> list[str]:
  """YAMLs in `directory` that include the harness's own task configs by absolute path
  and read `paths` instead of the hub; returns their task names."""
  import lm_eval.tasks  # pylint: disable=import-outside-toplevel
  root = os.path.dirname(os.path.abspath(lm_eval.tasks.__file__))
  os.makedirs(directory, exist_ok=True)
  mmlu = paths['mmlu']
  with open(os.path.join(mmlu, 'test.jsonl'), encoding='utf-8') as f:
    subject = json.loads(f.readline())['subject']
  # Each config's evaluated split (and MMLU's few-shot one) from the files; the splits
  # the files lack are unset, or the harness would read them for its few-shot sampler.
  local = {
      'mmlu': dict(num_fewshot=5, data_files=dict(
          dev=os.path.join(mmlu, 'dev.jsonl'), test=os.path.join(mmlu, 'test.jsonl'))),
      'hellaswag': dict(training_split=None, data_files=dict(validation=paths['hellaswag'])),
      'arc': dict(training_split=None, validation_split=None,
                  data_files=dict(test=paths['arc'])),
      'gsm8k': dict(data_files=dict(test=paths['gsm8k'])),
  }
  names = []
  for kind in KINDS:
    name = harness_task_name(kind)
    if kind == 'perplexity':  # As the harness's wikitext, over "text".
      config = dict(task=name, dataset_path='json', output_type='loglikelihood_rolling',
                    dataset_kwargs=dict(data_files=dict(test=paths['perplexity'])),
                    test_split='test', doc_to_text='', doc_to_target='{{text}}',
                    metric_list=[dict(metric='word_perplexity'),
                                 dict(metric='byte_perplexity'),
                                 dict(metric='bits_per_byte')])
    else:
      settings = dict(local[kind])
      config = dict(include=os.path.join(root, HARNESS_CONFIGS[kind].format(subject=subject)),
                    task=name, tag=[],  # In none of the harness's groups.
                    dataset_path='json', dataset_name=None,
                    dataset_kwargs=dict(data_files=settings.pop('data_files')), **settings)
    with open(os.path.join(directory, f'{name}.yaml'), 'w', encoding='utf-8') as f:
      json.dump(config, f, indent=2)  # JSON is YAML.
    names.append(name)
  return names


# Running each way -------------------------------------------------------------------------


def task_manager(task_directory: str):
  """The harness's task registry over `task_directory` alone: its YAMLs include the
  harness's own configs by path, so the index of every built-in task (many seconds to
  build) is not needed."""
  from lm_eval.tasks import TaskManager  # pylint: disable=import-outside-toplevel
  return TaskManager(include_path=task_directory, include_defaults=False)


def run_harness(model, tasks, names: list[str], **model_args) -> dict:
  """lm_eval.simple_evaluate's output with samples; `model` a name ('hf') with its
  model_args, or an LM instance; `tasks` a task_manager."""
  import lm_eval  # pylint: disable=import-outside-toplevel
  return lm_eval.simple_evaluate(model=model, model_args=model_args or None, tasks=names,
                                 task_manager=tasks, log_samples=True, bootstrap_iters=0)


def run_hf(hf_dir: str, tasks, names: list[str]) -> dict:
  """The reference: the harness's HF backend in float32, one sequence at a time, on one
  CPU thread (a tiny model's ops gain nothing from more, and on a busy machine a second
  thread made generation ten times slower)."""
  import torch  # pylint: disable=import-outside-toplevel
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  try:
    return run_harness('hf', tasks, names, pretrained=hf_dir, dtype='float32', batch_size=1,
                       device='cpu')
  finally:
    torch.set_num_threads(threads)


def run_lm_harness(workdir: str, tasks, names: list[str], batch_size: int = 4) -> dict:
  from lm.evaluation import lm_eval_model  # pylint: disable=import-outside-toplevel
  return run_harness(lm_eval_model.LmEvalModel(workdir=workdir, batch_size=batch_size),
                     tasks, names)


def lm_task_specs(paths: dict[str, str]) -> dict[str, str]:
  """{kind: --task value} of experiments.evaluate."""
  return {kind: path if kind == 'perplexity' else f'{kind}:{path}'
          for kind, path in paths.items()}


def import_checkpoint(hf_dir: str, workdir: str, env: dict | None = None) -> str | None:
  """`experiments.convert --from_hf` into `workdir`, unless it holds checkpoints; None,
  or why it failed."""
  if os.path.isdir(os.path.join(workdir, 'checkpoints')):
    return None
  return _command(['experiments.convert', f'--from_hf={hf_dir}', f'--workdir={workdir}'], env)


def run_lm(workdir: str, paths: dict[str, str], *, batch_size: int = 4,
           env: dict | None = None) -> str | None:
  """`experiments.evaluate --log_samples` of every task; None, or why it failed."""
  return _command(['experiments.evaluate', f'--workdir={workdir}', '--log_samples',
                   f'--batch_size={batch_size}',
                   *(f'--task={spec}' for spec in lm_task_specs(paths).values())], env)


def _command(arguments: list[str], env: dict | None) -> str | None:
  done = subprocess.run([sys.executable, '-m', *arguments], capture_output=True, text=True,
                        env=env, cwd=ROOT, check=False)
  if not done.returncode:
    return None
  lines = (done.stderr or done.stdout).strip().splitlines()
  return f'{arguments[0]} exited {done.returncode}: ' + ' | '.join(lines[-3:])


# Reading what each way wrote --------------------------------------------------------------


@dataclasses.dataclass
class Result:
  """One way's numbers on one task: its metrics by harness key, and per record
  (in record order) the log-likelihood of each choice, the completion, or the document's
  rolling log-likelihood."""
  metrics: dict[str, float]
  records: list


def harness_result(output: dict, kind: str) -> Result:
  """From simple_evaluate's output (log_samples=True)."""
  name = harness_task_name(kind)
  samples = {}  # A generation task logs each record once per filter.
  for sample in output['samples'][name]:
    samples.setdefault(sample['doc_id'], sample)
  ordered = [samples[index] for index in sorted(samples)]
  if kind == 'perplexity':
    records = [float(sample['resps'][0][0]) for sample in ordered]
    metrics = {'log_likelihood': sum(records)}
  else:
    metrics = {key: output['results'][name][key] for key, _ in METRICS[kind]}
    if kind == 'gsm8k':
      records = [sample['resps'][0][0] for sample in ordered]
    else:
      records = [[float(response[0][0]) for response in sample['resps']]
                 for sample in ordered]
  return Result(metrics, records)


def sample_file_name(task_name: str) -> str:
  """The --log_samples file of an lm task: its name with every character outside
  [A-Za-z0-9_.-] replaced by '_'."""
  return re.sub(r'[^A-Za-z0-9_.-]', '_', task_name) + '.jsonl'


def lm_task_name(spec: str) -> str:
  """The name experiments.evaluate gives the task of a --task value."""
  # pylint: disable=import-outside-toplevel
  from lm.evaluation import benchmarks, tasks
  return benchmarks.load(spec).name if benchmarks.is_benchmark(spec) else tasks.load(spec).name


def lm_result(workdir: str, kind: str, spec: str, step: int = 0) -> Result:
  """From <workdir>/eval/step_<step>.json and its step_<step>_samples/ (--log_samples)."""
  name = lm_task_name(spec)
  with open(os.path.join(workdir, 'eval', f'step_{step}.json'), encoding='utf-8') as f:
    reported = json.load(f)['results'][name]
  with open(os.path.join(workdir, 'eval', f'step_{step}_samples', sample_file_name(name)),
            encoding='utf-8') as f:
    samples = sorted((json.loads(line) for line in f if line.strip()),
                     key=lambda sample: sample['index'])
  if kind == 'perplexity':
    records = [float(sample['log_likelihood']) for sample in samples]
    return Result({'log_likelihood': sum(records)}, records)
  field = 'completion' if kind == 'gsm8k' else 'log_likelihoods'
  return Result({key: reported[lm_key] for key, lm_key in METRICS[kind]},
                [sample[field] for sample in samples])


# Comparing --------------------------------------------------------------------------------


def allowed_difference(log_likelihood: float) -> float:
  return max(LOG_LIKELIHOOD_TOLERANCE, FLOAT32_ROUNDING * abs(log_likelihood))


def record_differences(kind: str, reference: Result, other: Result) -> tuple[float, int]:
  """(the largest |log-likelihood difference| of a choice or document, the number of
  records that differ beyond allowed_difference, or for GSM8K in their completion).
  A record missing, or with other choices, differs infinitely."""
  if len(reference.records) != len(other.records):
    return float('inf'), abs(len(reference.records) - len(other.records))
  if kind == 'gsm8k':
    return 0.0, sum(a != b for a, b in zip(reference.records, other.records))
  largest, differing = 0.0, 0
  for a, b in zip(reference.records, other.records):
    if kind == 'perplexity':
      a, b = [a], [b]
    if len(a) != len(b):
      largest, differing = float('inf'), differing + 1
      continue
    gaps = [abs(x - y) for x, y in zip(a, b)]
    largest = max(largest, *gaps)
    differing += any(gap > allowed_difference(x) for gap, x in zip(gaps, a))
  return largest, differing


def failures(kind: str, results: dict[str, 'Result | None']) -> list[str]:
  """What breaks the parity of `kind` between each way and hf: a way that did not run, a
  metric not equal, a record's log-likelihood or completion not the same."""
  found = []
  reference = results['hf']
  for backend in BACKENDS[1:]:
    other = results.get(backend)
    if other is None:
      found.append(f'{kind}: {backend} has no results')
      continue
    for key, _ in METRICS[kind]:
      if other.metrics[key] != reference.metrics[key]:
        found.append(f'{kind} {key}: {backend} {other.metrics[key]} != hf'
                     f' {reference.metrics[key]}')
    largest, differing = record_differences(kind, reference, other)
    if differing and kind == 'gsm8k':
      found.append(f'{kind}: {differing} of {len(reference.records)} completions of'
                   f' {backend} differ from hf\'s')
    elif differing:
      found.append(f'{kind}: {differing} of {len(reference.records)} records of {backend}'
                   f' differ from hf\'s in log-likelihood (by up to {largest:.2g})')
  return found


def prompt_differences(kind: str, spec: str, output: dict) -> list[str]:
  """Where the prompts lm builds from a task file (lm/evaluation/benchmarks.py) are not
  those the harness's config builds (the `arguments` of its samples): each choice's
  context and continuation; GSM8K's prompt and stop strings; the document."""
  # pylint: disable=import-outside-toplevel
  from lm.evaluation import benchmarks, tasks
  task = benchmarks.load(spec) if benchmarks.is_benchmark(spec) else tasks.load(spec)
  samples = {}
  for sample in output['samples'][harness_task_name(kind)]:
    samples.setdefault(sample['doc_id'], sample)
  found = []
  for index, record in enumerate(task.records):
    theirs = [tuple(argument) for argument in samples[index]['arguments']]
    if kind == 'perplexity':
      ours = [(record['text'],)]
    elif kind == 'gsm8k':
      ours = [(record['prompt'], list(task.stops))]
      theirs = [(context, list(settings['until'])) for context, settings in theirs]
    else:
      ours = [(record['context'], task.delimiter + choice) for choice in record['choices']]
    if ours != theirs:
      found.append(f'{kind} record {index}: lm builds {_first_difference(ours, theirs)}')
  return found


def _first_difference(ours: list[tuple], theirs: list[tuple]) -> str:
  """Where lm's requests first differ from the harness's, in a few words."""
  if len(ours) != len(theirs):
    return f'{len(ours)} requests, the harness {len(theirs)}'
  for a, b in ((a, b) for mine, other in zip(ours, theirs) for a, b in zip(mine, other)
               if a != b):
    if isinstance(a, str):
      at = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
      a, b = a[max(0, at - 20):at + 20], b[max(0, at - 20):at + 20]
    return f'{a!r} where the harness has {b!r}'
  return 'other requests'


def table_rows(kind: str, results: dict[str, 'Result | None'], prompts: str) -> list[list[str]]:
  """[task, metric, hf, lm, lm_harness, records vs hf] rows of one task."""
  reference = results['hf']
  shown = lambda result, key: '-' if result is None else f'{result.metrics[key]:.6g}'
  versus = []
  for backend in BACKENDS[1:]:
    other = results.get(backend)
    if other is None:
      versus.append(f'{backend} -')
      continue
    largest, differing = record_differences(kind, reference, other)
    count = len(reference.records)
    versus.append(f'{backend} {count - differing}/{count} equal' if kind == 'gsm8k'
                  else f'{backend} {largest:.1e}')
  keys = [key for key, _ in METRICS[kind]] or ['log_likelihood']
  rows = [[kind if row == 0 else '', key, *(shown(results.get(b), key) for b in BACKENDS),
           ', '.join(versus) if row == 0 else ''] for row, key in enumerate(keys)]
  return rows + [['', 'prompts', 'harness\'s', prompts, 'harness\'s', '']]


def print_table(rows: list[list[str]]) -> None:
  header = ['task', 'metric', 'hf (harness)', 'lm', 'lm (harness)',
            'records vs hf: max |d loglik| or equal completions']
  widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
  for row in [header, *rows]:
    print('  '.join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())


# The command ------------------------------------------------------------------------------


def evaluate_every_way(hf_dir: str, workdir: str, paths: dict[str, str], scratch: str, *,
                       batch_size: int = 4, env: dict | None = None):
  """Runs hf, lm and lm_harness on `paths`: ({kind: {way: Result or None}}, {kind: prompt
  differences}, [why a way did not run]). lm's commands run beside the harness."""
  task_directory = os.path.join(scratch, 'harness_tasks')
  names = write_harness_tasks(task_directory, paths)
  tasks = task_manager(task_directory)
  # lm's commands run in a thread beside the harness: convert while hf runs, evaluate
  # while the harness runs lm.
  with concurrent.futures.ThreadPoolExecutor(1) as pool:
    imported = pool.submit(import_checkpoint, hf_dir, workdir, env)
    hf = run_hf(hf_dir, tasks, names)
    problem = imported.result()
    problems, harness_with_lm = [], None
    if not problem:
      evaluated = pool.submit(run_lm, workdir, paths, batch_size=batch_size, env=env)
      harness_with_lm = _attempt(lambda: run_lm_harness(workdir, tasks, names, batch_size),
                                 problems, 'lm_harness')
      problem = evaluated.result()
  problems += [f'lm: {problem}'] if problem else []
  specs = lm_task_specs(paths)
  results, prompts = {}, {}
  for kind in KINDS:
    results[kind] = {
        'hf': harness_result(hf, kind),
        'lm': None if problem else _attempt(lambda k=kind: lm_result(workdir, k, specs[k]),
                                            problems, f'lm {kind}'),
        'lm_harness': harness_with_lm and _attempt(
            lambda k=kind: harness_result(harness_with_lm, k), problems, f'lm_harness {kind}')}
    prompts[kind] = prompt_differences(kind, specs[kind], hf)
  return results, prompts, problems


def _attempt(call, problems: list[str], what: str):
  """call(), or None with what went wrong added to `problems`: a way that breaks is one
  failure of the check, reported beside the others' numbers."""
  try:
    return call()
  except Exception as error:  # pylint: disable=broad-except (any break is reported)
    problems.append(f'{what}: {type(error).__name__}: {str(error)[:300]}')
    return None


def main(argv):
  del argv
  scratch = tempfile.mkdtemp(prefix='eval_parity_')
  if _TINY.value:
    paths = write_tasks(os.path.join(scratch, 'tasks'))
    texts = task_texts(paths)
    checkpoints = {style: write_checkpoint(os.path.join(scratch, style), style, texts)
                   for style in STYLES}
  else:
    missing = [f'--{kind}' for kind in KINDS if not _FILES[kind].value]
    if not _HF_DIR.value or missing:
      sys.exit('error: give --tiny, or --hf_dir and ' + ', '.join(missing or ['the files']))
    paths = {kind: _FILES[kind].value for kind in KINDS}
    checkpoints = {os.path.basename(os.path.normpath(_HF_DIR.value)): _HF_DIR.value}
  rows, problems = [], []
  for name, hf_dir in checkpoints.items():
    workdir = (_WORKDIR.value if _WORKDIR.value and not _TINY.value
               else os.path.join(scratch, f'{name}_lm'))
    results, prompts, why = evaluate_every_way(
        hf_dir, workdir, paths, os.path.join(scratch, name), batch_size=_BATCH_SIZE.value)
    problems += [f'{name}: {line}' for line in why]
    rows.append([f'[{name}]', hf_dir, '', '', '', ''])
    for kind in KINDS:
      count = len(results[kind]['hf'].records)
      rows += table_rows(kind, results[kind], f'{count - len(prompts[kind])}/{count} equal')
      problems += [f'{name}: {line}' for line in failures(kind, results[kind]) + prompts[kind]]
  print_table(rows)
  for line in problems:
    print(f'FAIL {line}')
  print('parity holds' if not problems else f'{len(problems)} failures')
  sys.exit(1 if problems else 0)


if __name__ == '__main__':
  app.run(main)
