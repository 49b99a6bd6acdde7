"""lm as a model of lm-evaluation-harness, so any of its tasks whose data are on disk runs
on an lm checkpoint:

  python -m experiments.lm_eval --model lm --model_args workdir=W[,step=N,batch_size=16] \
      --tasks arc_easy --include_path DIR_OF_TASK_YAMLS

Log-likelihoods come from lm.evaluation.scoring (the scorer experiments.evaluate uses),
generation from lm.sampling. Rolling log-likelihoods (perplexity tasks) follow the
harness's windows: each token predicted once, every window after the first with a full
context. Requires the `eval` extra (lm_eval).
"""

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from lm import sharding
from lm.evaluation import scoring
from lm.training import checkpointing


@register_model('lm')
class LmEvalModel(LM):

  def __init__(self, workdir: str, step=None, batch_size=16, max_length=None, **_):
    super().__init__()
    self.run = checkpointing.restore_for_inference(workdir, None if step is None else int(step))
    self.max_length = int(max_length or self.run.config.model.max_seq_len)
    self.scorer = scoring.Scorer(self.run.model, self.run.params, self.run.tokenizer,
                                 max_length=self.max_length, batch_size=int(batch_size))

  def loglikelihood(self, requests, disable_tqdm: bool = False):
    """Requests that share a context (a multiple-choice question's choices) are scored
    from one pass over it."""
    by_context = {}
    for index, request in enumerate(requests):
      context, continuation = request.args
      by_context.setdefault(context, []).append((index, continuation))
    with sharding.activate(self.run.mesh):
      scored = self.scorer.choice_log_likelihoods(
          [(context, [c for _, c in members]) for context, members in by_context.items()])
    results = [None] * len(requests)
    for members, scores in zip(by_context.values(), scored):
      for (index, _), (log_likelihood, _, greedy) in zip(members, scores):
        results[index] = (log_likelihood, greedy)
    return results

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
    tokenizer = self.run.tokenizer
    results = []
    with sharding.activate(self.run.mesh):
      for request in tqdm(requests, disable=disable_tqdm):
        ids = [tokenizer.bos_id, *tokenizer.encode(request.args[0])]
        windows, starts = rolling_windows(ids, self.max_length)
        results.append(sum(s[0] for s in self.scorer.score(windows, starts)))
    return results

  def generate_until(self, requests, disable_tqdm: bool = False):
    """Requests grouped by their generation settings, each group sampled in batches."""
    groups = {}
    for index, request in enumerate(requests):
      context, settings = request.args
      until = settings.get('until', [])
      until = (until,) if isinstance(until, str) else tuple(until)
      temperature = (float(settings.get('temperature', 1.0)) if settings.get('do_sample')
                     else 0.0)
      key = (until, int(settings.get('max_gen_toks', 256)), temperature)
      groups.setdefault(key, []).append((index, context))
    completions = [None] * len(requests)
    with sharding.activate(self.run.mesh):
      for (until, max_new_tokens, temperature), members in groups.items():
        texts = self.scorer.complete([context for _, context in members],
                                     max_new_tokens=max_new_tokens, temperature=temperature,
                                     seed=0, stops=until)
        for (index, _), text in zip(members, texts):
          completions[index] = text
    return completions


def rolling_windows(ids: list[int], max_length: int) -> tuple[list[list[int]], list[int]]:
  """Windows of `ids` (a prefix token, then the text) whose scored tokens are each of
  ids[1:] exactly once, for Scorer.score: each window predicts up to max_length - 1 tokens
  and, after the first, takes as many earlier tokens as fit before them."""
  windows, starts = [], []
  step = max_length - 1
  for first in range(1, len(ids), step):
    last = min(first + step, len(ids))  # Scores ids[first:last].
    start = max(0, last - max_length)
    windows.append(ids[start:last])
    starts.append(first - start)
  return windows, starts
