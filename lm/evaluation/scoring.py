"""What evaluation asks of a model: log-probabilities of given tokens, and completions."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from lm import sampling, sharding


@functools.partial(jax.jit, static_argnames=('model',))
def _next_token_log_probs(params, tokens_bt, segment_ids_bt, *, model):
  """log p(tokens[t+1] | tokens[:t+1]) and whether it is the argmax, each [B, T-1]."""
  positions_bt = jnp.broadcast_to(jnp.arange(tokens_bt.shape[1]), tokens_bt.shape)
  logits_btv = model.apply({'params': params}, tokens_bt, segment_ids_bt, positions_bt)
  log_probs_btv = jax.nn.log_softmax(logits_btv[:, :-1], axis=-1)
  targets_bt = tokens_bt[:, 1:]
  picked_bt = jnp.take_along_axis(log_probs_btv, targets_bt[..., None], axis=-1)[..., 0]
  return picked_bt, jnp.argmax(log_probs_btv, axis=-1) == targets_bt


class Scorer:

  def __init__(self, model, params, tokenizer, *, max_length: int, batch_size: int = 16):
    self.model, self.params, self.tokenizer = model, params, tokenizer
    self.max_length, self.batch_size = max_length, batch_size

  def score(self, sequences: list[list[int]], score_from: list[int]):
    """For each id list: (sum of log p of ids[score_from:], their count, all greedy?).

    Each id at index i >= 1 is predicted from ids[:i]; sequences must fit max_length.
    """
    results = []
    # Rows split over every device of every process (padding rows score nothing).
    rows = -(-self.batch_size // sharding.rows_multiple()) * sharding.rows_multiple()
    for start in range(0, len(sequences), self.batch_size):
      chunk = sequences[start:start + self.batch_size]
      bucket = min(-(-max(len(s) for s in chunk) // 64) * 64, self.max_length)
      tokens = np.zeros((rows, bucket), np.int32)
      segment_ids = np.zeros((rows, bucket), np.int32)
      for row, ids in enumerate(chunk):
        tokens[row, :len(ids)] = ids
        segment_ids[row, :len(ids)] = 1
      log_probs, greedy = sharding.to_host(_next_token_log_probs(
          self.params, sharding.put_rows(tokens), sharding.put_rows(segment_ids),
          model=self.model))
      for row, ids in enumerate(chunk):
        first = score_from[start + row]
        span = slice(first - 1, len(ids) - 1)  # Predictions of ids[first:].
        results.append((float(log_probs[row, span].sum()), len(ids) - first,
                        bool(greedy[row, span].all())))
    return results

  def continuation_log_likelihoods(self, pairs: list[tuple[str, str]]):
    """log p(continuation | bos + context) for each pair; long contexts lose their start."""
    sequences, starts = [], []
    for context, continuation in pairs:
      context_ids = [self.tokenizer.bos_id, *self.tokenizer.encode(context)]
      continuation_ids = list(self.tokenizer.encode(continuation))
      ids = (context_ids + continuation_ids)[-self.max_length:]
      sequences.append(ids)
      starts.append(max(len(ids) - len(continuation_ids), 1))
    return self.score(sequences, starts)

  def document_log_likelihood(self, text: str):
    """(sum log p, tokens) of bos + text + eos, in windows of max_length; each window
    after the first starts with the last token of the one before, so every token after
    bos is predicted exactly once."""
    ids = [self.tokenizer.bos_id, *self.tokenizer.encode(text), self.tokenizer.eos_id]
    step = self.max_length - 1
    windows = [ids[start:start + self.max_length] for start in range(0, len(ids) - 1, step)]
    scored = self.score(windows, [1] * len(windows))
    return sum(s[0] for s in scored), sum(s[1] for s in scored)

  def complete(self, prompts: list[str], *, max_new_tokens: int, temperature: float,
               seed: int, stops: tuple[str, ...] | None = None) -> list[str]:
    """Completions up to the end of turn (the tokenizer's stop ids) or max_new_tokens;
    with `stops` None, also the first newline (one-line answers); else cut before the
    first of those strings (a multi-line chain of thought)."""
    stop_ids = tuple(self.tokenizer.stop_ids)
    newline = list(self.tokenizer.encode('\n'))
    if stops is None and len(newline) == 1:
      stop_ids += tuple(newline)
    completions = []
    for start in range(0, len(prompts), self.batch_size):
      completions += sampling.complete(
          self.model, self.params, self.tokenizer, prompts[start:start + self.batch_size],
          max_new_tokens=max_new_tokens, temperature=temperature, seed=seed + start,
          stop_ids=stop_ids)
    return [cut_at_stops(c, stops or ()) for c in completions]


def cut_at_stops(text: str, stops: tuple[str, ...]) -> str:
  """`text` up to the first occurrence of any of `stops`."""
  ends = [text.find(stop) for stop in stops if stop in text]
  return text[:min(ends)] if ends else text
