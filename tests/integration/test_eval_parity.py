"""lm's evaluation gives lm-evaluation-harness's numbers (experiments/eval_parity.py): on
tiny random transformers checkpoints, one whose tokenizer adds bos (Llama) and one that
adds none (Qwen2), and a few records of MMLU, HellaSwag, ARC, GSM8K and a perplexity task
with contexts past the model's 320 positions, the harness's HF backend, lm's own
`experiments.evaluate` and the harness running lm agree record by record."""

import pytest

lm_eval = pytest.importorskip('lm_eval')  # In the test extra; skipped only without it.

from experiments import eval_parity  # noqa: E402 (sets the harness offline first)
from test_eval_parity_checks import task_files  # noqa: E402,F401,F811 (a fixture)


@pytest.mark.parametrize('style', sorted(eval_parity.STYLES))
def test_every_benchmark_kind_gives_the_harness_numbers_record_by_record(
    style, task_files, command_env, tmp_path):
  """MMLU, HellaSwag and ARC: each choice's log-likelihood, acc and acc_norm; GSM8K: the
  greedy chains of thought and both exact matches; perplexity: each document's rolling
  log-likelihood past the context. One test per checkpoint, so that the three ways run
  once for it on one pytest worker; a failure names each kind that differs."""
  hf_dir = eval_parity.write_checkpoint(str(tmp_path / 'hf'), style,
                                        eval_parity.task_texts(task_files))
  results, prompts, problems = eval_parity.evaluate_every_way(
      hf_dir, str(tmp_path / 'lm'), task_files, str(tmp_path), env=command_env)
  assert not problems, problems
  differing = {kind: found for kind in eval_parity.KINDS
               if (found := prompts[kind] or eval_parity.failures(kind, results[kind]))}
  assert not differing, differing
