"""Sampling by full recomputation over a fixed-length buffer (one compile for any length).

Greedy when temperature is 0; otherwise softmax sampling at that temperature.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np


@functools.partial(jax.jit, static_argnames=('model',))
def _next_token(params, tokens_1t, length, rng, temperature, *, model):
  positions_1t = jnp.arange(tokens_1t.shape[1])[None]
  segment_ids_1t = (positions_1t < length).astype(jnp.int32)
  logits_1tv = model.apply({'params': params}, tokens_1t, segment_ids_1t, positions_1t)
  logits_v = logits_1tv[0, length - 1]
  sampled = jax.random.categorical(rng, logits_v / jnp.maximum(temperature, 1e-6))
  return jnp.where(temperature > 0, sampled, jnp.argmax(logits_v))


def generate(model, params, prompt_ids, *, max_new_tokens: int, buffer_length: int,
             temperature: float, seed: int, stop_id: int | None = None) -> list[int]:
  """Continues `prompt_ids`; returns the new ids (stopping after `stop_id` if given)."""
  if len(prompt_ids) + max_new_tokens > buffer_length:
    raise ValueError(f'{len(prompt_ids)=} + {max_new_tokens=} exceeds {buffer_length=}')
  buffer = np.zeros((1, buffer_length), np.int32)
  buffer[0, :len(prompt_ids)] = prompt_ids
  tokens = jnp.asarray(buffer)
  rng = jax.random.key(seed)
  length, new_ids = len(prompt_ids), []
  for _ in range(max_new_tokens):
    rng, step_rng = jax.random.split(rng)
    token = int(_next_token(params, tokens, length, step_rng, temperature, model=model))
    new_ids.append(token)
    if token == stop_id:
      break
    tokens = tokens.at[0, length].set(token)
    length += 1
  return new_ids
