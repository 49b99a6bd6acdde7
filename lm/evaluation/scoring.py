"""What evaluation asks of a model: log-probabilities of given tokens, and completions."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

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


@functools.partial(jax.jit, static_argnames=('model', 'cache_length'))
def _choice_log_probs(params, contexts_bt, context_lengths_b, choices_ct, owners_c, *, model,
                      cache_length):
  """log p of each choice's tokens [C, L] given its record's context, and whether each is
  the argmax. Each context [B, T] runs once, into a cache that each of its choices then
  continues from (`owners_c`: the context row of each choice)."""
  segment_ids_bt = (jnp.arange(contexts_bt.shape[1]) < context_lengths_b[:, None]).astype(
      jnp.int32)  # Padding (segment 0) is written to the cache but not counted.
  positions_bt = jnp.broadcast_to(jnp.arange(contexts_bt.shape[1]), contexts_bt.shape)
  logits_btv, variables = model.apply(
      {'params': params, 'cache': sampling.init_cache(model, contexts_bt.shape[0], cache_length)},
      contexts_bt, segment_ids_bt, positions_bt, decode=True, mutable=['cache'])
  last_bv = jnp.take_along_axis(logits_btv, (context_lengths_b - 1)[:, None, None], axis=1)[:, 0]
  cache_c = jax.tree.map(lambda x: x[owners_c], variables['cache'])
  positions_ct = context_lengths_b[owners_c][:, None] + jnp.arange(choices_ct.shape[1])[None]
  logits_ctv, _ = model.apply({'params': params, 'cache': cache_c}, choices_ct,
                              jnp.ones_like(choices_ct), positions_ct, decode=True,
                              mutable=['cache'])
  # A choice's first token is predicted by its context's last position, the rest by the
  # choice's own positions.
  predicting_ctv = jnp.concatenate([last_bv[owners_c][:, None], logits_ctv[:, :-1]], axis=1)
  log_probs_ctv = jax.nn.log_softmax(predicting_ctv.astype(jnp.float32), axis=-1)
  picked_ct = jnp.take_along_axis(log_probs_ctv, choices_ct[..., None], axis=-1)[..., 0]
  return picked_ct, jnp.argmax(log_probs_ctv, axis=-1) == choices_ct


class Scorer:

  def __init__(self, model, params, tokenizer, *, max_length: int, batch_size: int = 16,
               stop_ids: tuple[int, ...] | None = None):
    self.model, self.params, self.tokenizer = model, params, tokenizer
    self.max_length, self.batch_size = max_length, batch_size
    # Where a completion ends: the tokenizer's stop ids, or a chat template's end of turn.
    self.stop_ids = tuple(stop_ids or tokenizer.stop_ids)

  def score(self, sequences: list[list[int]], score_from: list[int]):
    """For each id list: (sum of log p of ids[score_from:], their count, all greedy?).

    Each id at index i >= 1 is predicted from ids[:i]; sequences must fit max_length.
    Batches take the sequences longest first, so each pads little and its length bucket
    (a multiple of 64) compiles once.
    """
    results = [None] * len(sequences)
    # Rows split over every device of every process (padding rows score nothing).
    rows = -(-self.batch_size // sharding.rows_multiple()) * sharding.rows_multiple()
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
    with _progress(len(sequences), 'scoring') as progress:
      for start in range(0, len(order), self.batch_size):
        chunk = order[start:start + self.batch_size]
        bucket = min(-(-len(sequences[chunk[0]]) // 64) * 64, self.max_length)
        tokens = np.zeros((rows, bucket), np.int32)
        segment_ids = np.zeros((rows, bucket), np.int32)
        for row, index in enumerate(chunk):
          tokens[row, :len(sequences[index])] = sequences[index]
          segment_ids[row, :len(sequences[index])] = 1
        log_probs, greedy = sharding.to_host(_next_token_log_probs(
            self.params, sharding.put_rows(tokens), sharding.put_rows(segment_ids),
            model=self.model))
        for row, index in enumerate(chunk):
          first, length = score_from[index], len(sequences[index])
          span = slice(first - 1, length - 1)  # Predictions of ids[first:].
          results[index] = (float(log_probs[row, span].sum()), length - first,
                            bool(greedy[row, span].all()))
        progress.update(len(chunk))
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

  def choice_log_likelihoods(self, records: list[tuple[str, list[str]]]):
    """For each (context, choices): [(log p(choice | bos + context), tokens, greedy?)]
    per choice, as continuation_log_likelihoods gives them, with each context's forward
    pass run once for all its choices (through the decoding cache). A record too long for
    max_length goes through continuation_log_likelihoods, which cuts its context's start."""
    encoded = [([self.tokenizer.bos_id, *self.tokenizer.encode(context)],
                [list(self.tokenizer.encode(choice)) for choice in choices])
               for context, choices in records]
    fits = [len(c) + max(len(x) for x in xs) <= self.max_length for c, xs in encoded]
    results = [None] * len(records)
    long = [i for i, ok in enumerate(fits) if not ok]
    if long:
      pairs = [(records[i][0], choice) for i in long for choice in records[i][1]]
      scored = iter(self.continuation_log_likelihoods(pairs))
      for i in long:
        results[i] = [next(scored) for _ in records[i][1]]
    order = sorted((i for i, ok in enumerate(fits) if ok), key=lambda i: -len(encoded[i][0]))
    with _progress(len(order), 'scoring') as progress:
      for start in range(0, len(order), self.batch_size):
        batch = order[start:start + self.batch_size]
        self._score_choices([encoded[i] for i in batch], [results, batch])
        progress.update(len(batch))
    return results

  def _score_choices(self, encoded, into):
    results, indices = into
    context_length = min(-(-max(len(c) for c, _ in encoded) // 64) * 64, self.max_length)
    choice_length = -(-max(len(x) for _, xs in encoded for x in xs) // 16) * 16
    num_choices = sum(len(xs) for _, xs in encoded)
    rows = -(-num_choices // 8) * 8  # Fewer shapes to compile.
    contexts = np.zeros((len(encoded), context_length), np.int32)
    choices = np.zeros((rows, choice_length), np.int32)
    owners = np.zeros((rows,), np.int32)
    row = 0
    for record, (context, options) in enumerate(encoded):
      contexts[record, :len(context)] = context
      for option in options:
        choices[row, :len(option)] = option
        owners[row] = record
        row += 1
    log_probs, greedy = sharding.to_host(_choice_log_probs(
        self.params, contexts, np.array([len(c) for c, _ in encoded], np.int32), choices,
        owners, model=self.model, cache_length=context_length + choice_length))
    row = 0
    for record, (_, options) in enumerate(encoded):
      scored = []
      for option in options:
        scored.append((float(log_probs[row, :len(option)].sum()), len(option),
                       bool(greedy[row, :len(option)].all())))
        row += 1
      results[indices[record]] = scored

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
    stop_ids = self.stop_ids
    newline = list(self.tokenizer.encode('\n'))
    if stops is None and len(newline) == 1:
      stop_ids += tuple(newline)
    completions = []
    with _progress(len(prompts), 'generating') as progress:
      for start in range(0, len(prompts), self.batch_size):
        completions += sampling.complete(
            self.model, self.params, self.tokenizer, prompts[start:start + self.batch_size],
            max_new_tokens=max_new_tokens, temperature=temperature, seed=seed + start,
            stop_ids=stop_ids)
        progress.update(len(prompts[start:start + self.batch_size]))
    return [cut_at_stops(c, stops or ()) for c in completions]


def _progress(total: int, what: str):
  """A progress bar over records on process 0, gone when done."""
  return tqdm.tqdm(total=total, desc=what, unit='record', leave=False,
                   disable=jax.process_index() != 0 or total < 2)


def cut_at_stops(text: str, stops: tuple[str, ...]) -> str:
  """`text` up to the first occurrence of any of `stops`."""
  ends = [text.find(stop) for stop in stops if stop in text]
  return text[:min(ends)] if ends else text
