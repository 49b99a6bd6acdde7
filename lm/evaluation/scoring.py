"""What evaluation asks of a model: log-probabilities of given tokens, and completions,
each in the model's context window and in lm-evaluation-harness's way (`Scorer`), so the
figures equal the harness's on the same checkpoint; and of a reward model, its rewards
(`RewardScorer`)."""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from lm import sampling, sharding
from lm.engine import engine
from lm.data import pipeline
from lm.errors import check
from lm.objectives import reward_model


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


class Score(NamedTuple):
  """A continuation's summed log-likelihood, its token count, whether every token was the
  argmax, and whether its context lost its start to the context window."""
  log_likelihood: float
  tokens: int
  greedy: bool
  truncated: bool = False


class Completion(NamedTuple):
  text: str
  truncated: bool = False  # The prompt lost its start to fit the context window.


def context_length(config, trained_here: bool, max_length: int | None = None) -> int:
  """The tokens a model reads at once when scoring (`config` a run's whole config): its
  own context, or `max_length` below it. A checkpoint's model (a tokenizer not
  `trained_here`) has `config.model.max_seq_len`, its max_position_embeddings; a model
  trained here, the rows it was trained on (`config.data.seq_len`), since its RoPE never
  saw a position past them (the default run scored in 1024-token windows after training
  on 128: perplexity 21.6 against 3.71)."""
  limit = config.model.max_seq_len
  if max_length is None:
    return min(limit, config.data.seq_len) if trained_here else limit
  check(1 < max_length <= limit,
        f'--max_length={max_length} must be in [2, config.model.max_seq_len={limit}]')
  return max_length


def document_ids(tokenizer, text: str) -> list[int]:
  """A document as scored for perplexity: ids[0] is its condition, ids[1:] are predicted.
  A checkpoint's tokenizer: the prefix token, then the text as the tokenizer encodes it
  (its bos included), as lm-evaluation-harness's rolling log-likelihood; one trained here:
  bos, text, eos, as lm trains documents."""
  if tokenizer.trained_here:
    return [tokenizer.bos_id, *map(int, tokenizer.encode(text)), tokenizer.eos_id]
  return [tokenizer.prefix_id, *tokenizer.prompt_ids(text)]


def rolling_windows(ids: list[int], max_length: int) -> tuple[list[list[int]], list[int]]:
  """lm-evaluation-harness's rolling windows over `ids` (a condition, then the tokens to
  predict), for Scorer.score: each of ids[1:] is predicted exactly once, each window
  reads at most `max_length` tokens and predicts up to `max_length` of them, and every
  window after the first reads a full context before what it predicts."""
  windows, starts = [], []
  for first in range(1, len(ids), max_length):
    last = min(first + max_length, len(ids))  # Predicts ids[first:last].
    start = max(0, last - max_length - 1)
    windows.append(ids[start:last])
    starts.append(first - start)
  return windows, starts


class Scorer:
  """Log-likelihoods and completions of a model in a context window of `max_length`
  tokens, computed as lm-evaluation-harness's Hugging Face backend computes them:
  contexts encoded as the tokenizer encodes them, a context and its continuation
  encoded whole and split where the context's own encoding ends, and what does not fit
  cut from the left."""

  def __init__(self, model, params, tokenizer, *, max_length: int, batch_size: int = 16,
               stop_ids: tuple[int, ...] | None = None):
    self.model, self.params, self.tokenizer = model, params, tokenizer
    self.max_length, self.batch_size = max_length, batch_size
    # Where a completion ends: the tokenizer's stop ids, or a chat template's end of turn.
    self.stop_ids = tuple(stop_ids or tokenizer.stop_ids)

  @classmethod
  def for_run(cls, run, *, max_length: int | None = None, **options) -> 'Scorer':
    """The scorer of a restored run (checkpointing.restore_for_inference) in the model's
    own context (`context_length`), or `max_length` below it: what every entry point that
    scores text uses."""
    return cls(run.model, run.params, run.tokenizer, max_length=context_length(
        run.config, run.tokenizer.trained_here, max_length), **options)

  def score(self, sequences: list[list[int]], score_from: list[int]) -> list[Score]:
    """For each id list: the Score of ids[score_from:], each id predicted from those
    before it. A sequence holds at most max_length + 1 ids: the model reads all but the
    last. Batches take the sequences longest first, so each pads little and its length
    bucket (a multiple of 64) compiles once."""
    results = [None] * len(sequences)
    # Rows split over every device of every process (padding rows score nothing).
    rows = -(-self.batch_size // sharding.rows_multiple()) * sharding.rows_multiple()
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
    with _progress(len(sequences), 'scoring') as progress:
      for start in range(0, len(order), self.batch_size):
        chunk = order[start:start + self.batch_size]
        longest = len(sequences[chunk[0]])
        if longest > self.max_length + 1:  # A bug in a caller, not bad input.
          raise AssertionError(f'a sequence of {longest} ids for a window of {self.max_length}')
        bucket = min(-(-longest // 64) * 64, self.max_length + 1)
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
          results[index] = Score(float(log_probs[row, span].sum()), length - first,
                                 bool(greedy[row, span].all()))
        progress.update(len(chunk))
    return results

  def _encode(self, text: str) -> list[int]:
    """`prompt_ids`, except that a text already opening with the prefix token's text (a
    rendered chat) gets no second one, as the harness encodes it."""
    named = self.tokenizer.special_tokens
    prefix = named.get('bos_token') or named.get('eos_token')  # prefix_id's text.
    if prefix and self.tokenizer.matches_special_tokens and text.startswith(prefix):
      return [int(i) for i in self.tokenizer.encode(text)]
    return self.tokenizer.prompt_ids(text)

  def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as the harness makes them: the context's trailing
    spaces move to the continuation, the two are encoded whole and split where the
    context's own encoding ends; an empty context is the prefix token."""
    if not context:
      ids = [int(i) for i in self.tokenizer.encode(continuation)]
      if ids and ids[0] == self.tokenizer.prefix_id:
        return ids[:1], ids[1:]
      return [self.tokenizer.prefix_id], ids
    spaces = len(context) - len(context.rstrip())
    if spaces:
      context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole, context_ids = self._encode(context + continuation), self._encode(context)
    return context_ids, whole[len(context_ids):]

  def continuation_log_likelihoods(self, pairs: list[tuple[str, str]]) -> list[Score]:
    """log p(continuation | context) for each (context, continuation); a context too
    long for the window loses its start."""
    return self._score_pairs([self.encode_pair(*pair) for pair in pairs])

  def _score_pairs(self, encoded: list[tuple[list[int], list[int]]]) -> list[Score]:
    sequences, starts, truncated = [], [], []
    for context_ids, continuation_ids in encoded:
      ids = context_ids + continuation_ids
      kept = ids[-(self.max_length + 1):]
      sequences.append(kept)
      starts.append(max(len(kept) - len(continuation_ids), 1))
      truncated.append(len(kept) < len(ids))
    return [score._replace(truncated=cut)
            for score, cut in zip(self.score(sequences, starts), truncated)]

  def choice_log_likelihoods(self, records: list[tuple[str, list[str]]]) -> list[list[Score]]:
    """For each (context, choices): the Score of each choice given the context, as
    continuation_log_likelihoods gives them, with each context's forward pass run once
    for all its choices (through the decoding cache). A record whose choices do not share
    one context encoding, or that does not fit the window, is scored pair by pair."""
    encoded = [[self.encode_pair(context, choice) for choice in choices]
               for context, choices in records]
    shared = [len({tuple(c) for c, _ in pairs}) == 1
              and len(pairs[0][0]) + max(len(x) for _, x in pairs) <= self.max_length + 1
              for pairs in encoded]
    results = [None] * len(records)
    alone = [i for i, ok in enumerate(shared) if not ok]
    if alone:
      scored = iter(self._score_pairs([pair for i in alone for pair in encoded[i]]))
      for i in alone:
        results[i] = [next(scored) for _ in encoded[i]]
    order = sorted((i for i, ok in enumerate(shared) if ok), key=lambda i: -len(encoded[i][0][0]))
    with _progress(len(order), 'scoring') as progress:
      for start in range(0, len(order), self.batch_size):
        batch = order[start:start + self.batch_size]
        scored = self._score_choices([(encoded[i][0][0], [x for _, x in encoded[i]])
                                      for i in batch])
        for i, scores in zip(batch, scored):
          results[i] = scores
        progress.update(len(batch))
    return results

  def _score_choices(self, encoded):
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
    results, row = [], 0
    for _, options in encoded:
      scored = []
      for option in options:
        scored.append(Score(float(log_probs[row, :len(option)].sum()), len(option),
                            bool(greedy[row, :len(option)].all())))
        row += 1
      results.append(scored)
    return results

  def document_log_likelihood(self, text: str) -> tuple[float, int]:
    """(sum log p, tokens predicted) of a document (`document_ids`) in the harness's
    rolling windows of the context."""
    windows, starts = rolling_windows(document_ids(self.tokenizer, text), self.max_length)
    scored = self.score(windows, starts)
    return sum(s.log_likelihood for s in scored), sum(s.tokens for s in scored)

  def generation_prompts(self, prompts: list[str], max_new_tokens: int):
    """(ids, truncated) of each prompt: what fits in the window before max_new_tokens,
    cut from the left, as the harness cuts generation contexts."""
    keep = self.max_length - max_new_tokens
    check(keep >= 1, f'--max_new_tokens={max_new_tokens} leaves no room for a prompt in a'
          f' context of {self.max_length} tokens')
    encoded = [self._encode(p) or [self.tokenizer.prefix_id] for p in prompts]
    return [ids[-keep:] for ids in encoded], [len(ids) > keep for ids in encoded]

  def complete(self, prompts: list[str], *, max_new_tokens: int, temperature: float,
               seed: int, stops: tuple[str, ...] | None = None) -> list[Completion]:
    """Completions up to the end of turn (the tokenizer's stop ids) or max_new_tokens;
    with `stops` None, also the first newline (one-line answers); else cut before the
    first of those strings (a multi-line chain of thought)."""
    stop_ids = self.stop_ids
    newline = list(self.tokenizer.encode('\n'))
    if stops is None and len(newline) == 1:
      stop_ids += tuple(newline)
    ids, truncated = self.generation_prompts(prompts, max_new_tokens)
    # Every prompt to the engine at once, batch_size at a time (record i: seed + i).
    texts = engine.complete_ids(self.model, self.params, self.tokenizer, ids,
                                max_new_tokens=max_new_tokens, temperature=temperature,
                                seed=seed, stop_ids=stop_ids, slots=self.batch_size)
    return [Completion(cut_at_stops(text, stops or ()), cut)
            for text, cut in zip(texts, truncated)]


def _progress(total: int, what: str):
  """A progress bar over records on process 0, gone when done."""
  return tqdm.tqdm(total=total, desc=what, unit='record', leave=False,
                   disable=jax.process_index() != 0 or total < 2)


def cut_at_stops(text: str, stops: tuple[str, ...]) -> str:
  """`text` up to the first occurrence of any of `stops`."""
  ends = [text.find(stop) for stop in stops if stop in text]
  return text[:min(ends)] if ends else text


@functools.partial(jax.jit, static_argnames=('model',))
def _last_token_rewards(params, tokens_bt, segment_ids_bt, *, model):
  positions_bt = jnp.broadcast_to(jnp.arange(tokens_bt.shape[1]), tokens_bt.shape)
  return reward_model.rewards(params, {'tokens': tokens_bt, 'segment_ids': segment_ids_bt,
                                       'positions': positions_bt}, model=model)


class RewardScorer:
  """A reward model's reward for each (prompt, response): rendered as its training rows
  are (bos + prompt + response + eos, pipeline.prompt_and_response), cut at the end to
  `max_length` tokens as training cuts them, and read at the last token."""

  def __init__(self, model, params, tokenizer, *, max_length: int, batch_size: int = 16):
    self.model, self.params, self.tokenizer = model, params, tokenizer
    self.max_length, self.batch_size = max_length, batch_size

  @classmethod
  def for_run(cls, run, *, max_length: int | None = None, **options) -> 'RewardScorer':
    return cls(run.model, run.params, run.tokenizer, max_length=context_length(
        run.config, run.tokenizer.trained_here, max_length), **options)

  def rewards(self, pairs: list[tuple[str, str]]) -> list[tuple[float, bool]]:
    """(reward, whether the row was cut) of each (prompt, response)."""
    encoded = [pipeline.prompt_and_response(self.tokenizer, prompt, response)[0]
               for prompt, response in pairs]
    rows = -(-self.batch_size // sharding.rows_multiple()) * sharding.rows_multiple()
    results = []
    with _progress(len(encoded), 'scoring') as progress:
      for start in range(0, len(encoded), rows):
        chunk = [ids[:self.max_length] for ids in encoded[start:start + rows]]
        bucket = min(-(-max(map(len, chunk)) // 64) * 64, self.max_length)
        tokens, segment_ids = (np.zeros((rows, bucket), np.int32) for _ in range(2))
        for row, ids in enumerate(chunk):
          tokens[row, :len(ids)], segment_ids[row, :len(ids)] = ids, 1
        rewards = sharding.to_host(_last_token_rewards(
            self.params, sharding.put_rows(tokens), sharding.put_rows(segment_ids),
            model=self.model))
        results += [(float(rewards[row]), len(encoded[start + row]) > self.max_length)
                    for row in range(len(chunk))]
        progress.update(len(chunk))
    return results
