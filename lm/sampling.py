"""Sampling with a cache in static batches: one prefill over the prompts, then one token
per step (lm/engine batches continuously over pages; both sample alike).

Prompts of different lengths are right-padded into one [B, T] batch; each row keeps
its own length in the cache, so every shape is static and one compile serves any
prompt up to T tokens. Greedy when temperature is 0, else softmax sampling at that
temperature restricted to the top-k tokens and to the smallest set whose probability
reaches top-p. A row stops after emitting a stop id; rows that stopped emit pad.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
import numpy as np

from lm import models, sharding

# Flax's Dense, DenseGeneral and Embed cast these to the module's compute dtype at every
# call; see cast_weights.
_CAST_BY_FLAX = ('kernel', 'bias', 'embedding')


def cast_weights(params, dtype):
  """params with every Dense/Embed weight already in `dtype`. The model computes the
  same numbers from them (flax would cast them to `dtype` anyway), but a decode loop no
  longer re-reads and converts the float32 weights at every step."""
  def cast(path, leaf):
    # A quantized weight's integers and scales (lm/quantization.py: attributes, not keys,
    # of qwix's arrays) stay as stored: each product dequantizes them.
    name = getattr(path[-1], 'key', None)
    if name in _CAST_BY_FLAX and jnp.issubdtype(leaf.dtype, jnp.floating):
      return leaf.astype(dtype)
    return leaf
  return jax.tree_util.tree_map_with_path(cast, params)


def init_cache(model, batch_size: int, cache_length: int):
  """An empty cache (the 'cache' collection) with `cache_length` slots per row."""
  def init():
    return models.init_variables(model, jax.random.key(0), batch_size=batch_size,
                                 length=cache_length, decode=True)['cache']
  return jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), jax.eval_shape(init))


def prefill(model, params, prompts_bt, prompt_lengths_b, cache_length: int):
  """Runs right-padded prompts into a fresh cache of `cache_length` slots per row.
  Returns each row's logits after its last prompt token [B, V] and the cache."""
  batch, prompt_length = prompts_bt.shape
  positions_bt = jnp.broadcast_to(jnp.arange(prompt_length), (batch, prompt_length))
  segment_ids_bt = (positions_bt < prompt_lengths_b[:, None]).astype(jnp.int32)
  logits_btv, variables = model.apply(
      {'params': params, 'cache': init_cache(model, batch, cache_length)},
      prompts_bt, segment_ids_bt, positions_bt, decode=True, mutable=['cache'])
  return logits_btv[jnp.arange(batch), prompt_lengths_b - 1], variables['cache']


def decode_step(model, params, cache, token_b, position_b):
  """One token per row, at `position_b`, through the cache. Returns the next logits
  [B, V] and the cache."""
  logits_b1v, variables = model.apply(
      {'params': params, 'cache': cache}, token_b[:, None], jnp.ones_like(token_b)[:, None],
      position_b[:, None], decode=True, mutable=['cache'])
  return logits_b1v[:, 0], variables['cache']


def sample_rows(logits_bv, keys_b, index_b, temperature_b, top_k_b, top_p_b):
  """Next ids [B] from float32 logits [B, V], each row with its own options: greedy at
  temperature 0, else softmax sampling at that temperature restricted to the top-k
  tokens and to the smallest set whose probability reaches top-p (top_k 0 and top_p 1
  are off). Row b draws with its key folded with index_b[b] (the token's index in its
  completion), so a row samples the same tokens whatever rows share its batch: the
  engine's requests (lm/engine) and generate's rows alike."""
  greedy_b = jnp.argmax(logits_bv, axis=-1)

  def sampled():
    logits = logits_bv / jnp.where(temperature_b > 0, temperature_b, 1.0)[:, None]
    # A batch without top-k or top-p skips the sort.
    logits = jax.lax.cond(jnp.any(top_k_b > 0) | jnp.any(top_p_b < 1), restricted,
                          lambda logits: logits, logits)
    return jax.vmap(jax.random.categorical)(jax.vmap(jax.random.fold_in)(keys_b, index_b),
                                            logits)

  def restricted(logits):
    vocab = logits.shape[-1]
    sorted_bv = jnp.sort(logits, axis=-1)[:, ::-1]
    k_b = jnp.where(top_k_b > 0, jnp.minimum(top_k_b, vocab), vocab)
    top_bv = jnp.where(jnp.arange(vocab) < k_b[:, None], sorted_bv, -jnp.inf)
    # Nucleus over the top k: drop tokens whose higher-ranked predecessors reach top_p.
    probabilities_bv = jax.nn.softmax(top_bv, axis=-1)
    kept_bv = (jnp.cumsum(probabilities_bv, axis=-1) - probabilities_bv < top_p_b[:, None])
    threshold_b1 = jnp.min(jnp.where(kept_bv & (top_bv > -jnp.inf), sorted_bv, jnp.inf),
                           axis=-1, keepdims=True)
    return jnp.where(logits < threshold_b1, -jnp.inf, logits)

  # A batch of greedy rows skips the sort and the draws.
  return jnp.where(temperature_b > 0,
                   jax.lax.cond(jnp.any(temperature_b > 0), sampled, lambda: greedy_b),
                   greedy_b)


@functools.partial(jax.jit, static_argnames=('model', 'max_new_tokens', 'cache_length',
                                             'temperature', 'top_k', 'top_p'))
def generate(params, prompts_bt, prompt_lengths_b, rng, stop_ids, *, model, max_new_tokens: int,
             cache_length: int, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             pad_id: int = 0):
  """Continues each prompt row (its first prompt_lengths_b[b] tokens). `rng`: a key per
  row [B], or one key split into one per row; token i of row b draws with its key folded
  with i (sample_rows), as an engine request does. The sampling options are static: each
  setting compiles once, and greedy decoding is one argmax per step.

  Returns new ids [B, M] (M = max_new_tokens) (pad after a row stops) and the number of new
  ids in each row, stop id included. `cache_length` must hold T + max_new_tokens.
  """
  batch, prompt_length = prompts_bt.shape
  if max_new_tokens < 1:
    raise ValueError(f'{max_new_tokens=} must be at least 1')
  if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
    raise ValueError(f'need temperature >= 0, 0 < top_p <= 1 and top_k >= 0; got '
                     f'{temperature=}, {top_p=}, {top_k=}')
  if prompt_length + max_new_tokens > cache_length:
    raise ValueError(f'{prompt_length=} + {max_new_tokens=} exceeds {cache_length=}')
  params = cast_weights(params, model.config.dtype)  # Once, outside the decode loop.
  last_logits_bv, cache = prefill(model, params, prompts_bt, prompt_lengths_b, cache_length)
  keys_b = rng if rng.ndim == 1 else jax.random.split(rng, batch)
  options_b = [jnp.full(batch, value, dtype) for value, dtype in (
      (temperature, jnp.float32), (top_k, jnp.int32), (top_p, jnp.float32))]

  def choose(index, logits_bv, done_b, new_bm, num_new_b):
    """Samples the token at `index` and records it; rows already done get pad."""
    if temperature == 0:
      token_b = jnp.argmax(logits_bv, axis=-1)
    else:
      token_b = sample_rows(logits_bv, keys_b, jnp.full(batch, index), *options_b)
    token_b = jnp.where(done_b, pad_id, token_b)
    new_bm = new_bm.at[:, index].set(token_b)
    num_new_b = num_new_b + (~done_b)
    return token_b, done_b | jnp.isin(token_b, stop_ids), new_bm, num_new_b

  def step(carry):
    index, logits_bv, cache, done_b, new_bm, num_new_b = carry
    token_b, done_b, new_bm, num_new_b = choose(index, logits_bv, done_b, new_bm, num_new_b)
    logits_bv, cache = decode_step(model, params, cache, token_b, prompt_lengths_b + index)
    return index + 1, logits_bv, cache, done_b, new_bm, num_new_b

  # The loop stops one token short: the last token is chosen after it, so no decode step
  # computes logits nobody reads.
  def keep_going(carry):
    index, _, _, done_b, *_ = carry
    return (index < max_new_tokens - 1) & ~jnp.all(done_b)

  initial = (jnp.int32(0), last_logits_bv, cache, jnp.zeros(batch, jnp.bool_),
             jnp.full((batch, max_new_tokens), pad_id, jnp.int32), jnp.zeros(batch, jnp.int32))
  index, logits_bv, _, done_b, new_bm, num_new_b = jax.lax.while_loop(
      keep_going, step, initial)
  _, _, new_bm, num_new_b = choose(index, logits_bv, done_b, new_bm, num_new_b)
  return new_bm, num_new_b


def pad_prompts(prompts: list[list[int]], pad_id: int, multiple: int = 64):
  """Right-pads id lists into [B, T] with T rounded up to `multiple` (fewer compiles)."""
  if not prompts or min(len(p) for p in prompts) == 0:
    raise ValueError('every prompt needs at least one token (the tokenizer adds bos)')
  length = -(-max(len(p) for p in prompts) // multiple) * multiple
  batch = np.full((len(prompts), length), pad_id, np.int32)
  for row, prompt in enumerate(prompts):
    batch[row, :len(prompt)] = prompt
  return batch, np.array([len(p) for p in prompts], np.int32)


def generate_rows(params, prompts_bt: np.ndarray, prompt_lengths_b: np.ndarray, rng, stop_ids,
                  *, batch_sharding=None, **options) -> tuple[np.ndarray, np.ndarray]:
  """`generate` on this process's rows of a global batch: with `batch_sharding` (a
  NamedSharding of [B, T] rows over the mesh), every process gives its rows, the batch
  is sampled over all devices at once, and each gets its own rows back (numpy). Without
  it, the rows are this process's whole batch."""
  if batch_sharding is None:
    new_bm, num_new_b = generate(params, jnp.asarray(prompts_bt), jnp.asarray(prompt_lengths_b),
                                 rng, stop_ids, **options)
    return np.asarray(new_bm), np.asarray(num_new_b)
  mesh, rows = batch_sharding.mesh, batch_sharding.spec[0]
  as_global = lambda value, spec: jax.make_array_from_process_local_data(
      jax.sharding.NamedSharding(mesh, spec), value)
  new_bm, num_new_b = generate(
      params, as_global(prompts_bt, jax.sharding.PartitionSpec(rows, None)),
      as_global(prompt_lengths_b, jax.sharding.PartitionSpec(rows)), rng, stop_ids, **options)
  return tuple(np.asarray(multihost_utils.global_array_to_host_local_array(array, mesh, spec))
               for array, spec in ((new_bm, jax.sharding.PartitionSpec(rows, None)),
                                   (num_new_b, jax.sharding.PartitionSpec(rows))))


def prompt_ids(tokenizer, text: str) -> list[int]:
  """`text` as the tokenizer encodes it (bos where it adds one, as transformers'
  `tokenizer(text)`); an empty prompt is the prefix token, so there is a token to
  continue from."""
  return tokenizer.prompt_ids(text) or [tokenizer.prefix_id]


def complete(model, params, tokenizer, prompts: list[str], *, max_new_tokens: int,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
             stop_ids: tuple[int, ...] | None = None, cache_length: int | None = None) -> list[str]:
  """Text in, text out: the prompt as the tokenizer encodes it (`prompt_ids`), generate,
  decode up to (not including) the stop id."""
  ids = [prompt_ids(tokenizer, p) for p in prompts]
  return complete_ids(model, params, tokenizer, ids, max_new_tokens=max_new_tokens,
                      temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                      stop_ids=stop_ids, cache_length=cache_length)


def complete_ids(model, params, tokenizer, ids: list[list[int]], *, max_new_tokens: int,
                 temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                 stop_ids: tuple[int, ...] | None = None,
                 cache_length: int | None = None) -> list[str]:
  """`complete` for prompts already in ids (a rendered chat, say), taken as they are."""
  stop_ids = tuple(tokenizer.stop_ids) if stop_ids is None else stop_ids
  count = len(ids)
  # Rows split over every device of every process; extra rows are one token, dropped.
  ids = list(ids) + [[tokenizer.prefix_id]] * (-count % sharding.rows_multiple())
  prompts_bt, lengths_b = pad_prompts(ids, tokenizer.pad_id)
  cache_length = cache_length or prompts_bt.shape[1] + max_new_tokens
  # Row i samples as an engine request with seed + i does (lm/engine).
  keys_b = jax.vmap(jax.random.key)(sharding.put_rows(seed + np.arange(len(ids), dtype=np.int32)))
  new_bm, num_new_b = generate(
      params, sharding.put_rows(prompts_bt), sharding.put_rows(lengths_b), keys_b,
      jnp.asarray(stop_ids, jnp.int32), model=model, max_new_tokens=max_new_tokens,
      cache_length=cache_length, temperature=temperature, top_k=top_k, top_p=top_p,
      pad_id=tokenizer.pad_id)
  completions = []
  for row, count_b in list(zip(*sharding.to_host((new_bm, num_new_b))))[:count]:
    row = [int(t) for t in row[:count_b]]
    completions.append(tokenizer.decode([t for t in row if t not in stop_ids]))
  return completions
