"""Log-probabilities of given tokens, for the completions API's `logprobs` and `echo`
(lm-evaluation-harness's `local-completions` scores a continuation by echoing the
context and continuation with `logprobs`, and sums the continuation's token_logprobs).

One plain forward pass over each whole sequence, as lm.evaluation.scoring's Scorer
scores text (bucketed lengths, padding in segment 0, rows over the mesh's data axes),
not the engine: the engine samples, and a sampler's cache is no place to read every
position's distribution. Unlike the scorer's pass, this one also returns the likeliest
tokens at each position (`top_logprobs`); a token's own log-prob and the top one come
from the same log-softmax, so a greedy token's two values are equal to the bit, which is
how the harness tells a greedy continuation.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from lm import sharding

# The most `top_logprobs` a request may ask for; every pass computes this many, so one
# program serves any request of a shape.
MAX_TOP = 20


@functools.partial(jax.jit, static_argnames=('model',))
def _log_probs(params, tokens_bt, segment_ids_bt, *, model):
  """log p(tokens[t+1] | tokens[:t+1]) [B, T-1], and the MAX_TOP likeliest next tokens'
  log-probs and ids after each position [B, T, MAX_TOP] (the last predicts past the end)."""
  positions_bt = jnp.broadcast_to(jnp.arange(tokens_bt.shape[1]), tokens_bt.shape)
  logits_btv = model.apply({'params': params}, tokens_bt, segment_ids_bt, positions_bt)
  log_probs_btv = jax.nn.log_softmax(logits_btv.astype(jnp.float32), axis=-1)
  picked_bt = jnp.take_along_axis(log_probs_btv[:, :-1], tokens_bt[:, 1:, None], axis=-1)[..., 0]
  top = min(MAX_TOP, log_probs_btv.shape[-1])
  top_values_btk, top_ids_btk = jax.lax.top_k(log_probs_btv, top)
  return picked_bt, top_values_btk, top_ids_btk


def sequence_log_probs(model, params, mesh, sequences: list[list[int]], *, max_length: int):
  """For each id list (at most `max_length` ids): (log-prob of each id given those before
  it [len - 1], the top log-probs [len, MAX_TOP] and their ids [len, MAX_TOP] after each
  position), numpy. Every sequence of a call runs in one batch."""
  longest = max(len(s) for s in sequences)
  if longest > max_length:  # The API checks lengths first: a bug, not bad input.
    raise AssertionError(f'a sequence of {longest} ids for a context of {max_length}')
  bucket = min(-(-longest // 64) * 64, max(max_length, longest))
  with sharding.activate(mesh):
    rows = -(-len(sequences) // sharding.rows_multiple()) * sharding.rows_multiple()
    tokens = np.zeros((rows, bucket), np.int32)
    segment_ids = np.zeros((rows, bucket), np.int32)
    for row, ids in enumerate(sequences):
      tokens[row, :len(ids)], segment_ids[row, :len(ids)] = ids, 1
    picked, top_values, top_ids = sharding.to_host(_log_probs(
        params, sharding.put_rows(tokens), sharding.put_rows(segment_ids), model=model))
  return [(picked[row, :len(ids) - 1], top_values[row, :len(ids)], top_ids[row, :len(ids)])
          for row, ids in enumerate(sequences)]
