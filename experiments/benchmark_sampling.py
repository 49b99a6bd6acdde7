"""Decode speed with the KV cache against full recomputation, as a table.

  python -m experiments.benchmark_sampling [--batch_sizes=1,32 --new_tokens=512]
      [--profile_steps=64] [--layer_pattern=mamba]
      [--config.model.num_layers=12 --config.model.embed_dim=768 ...]

Greedy decoding on the model of --config (default: the default config's; random weights:
speed does not depend on them). "cached" is lm.sampling.generate (one prefill, then one
token per step); "recompute" runs the whole [B, prompt + new] buffer through the model for every new
token, both inside one jitted loop so neither pays Python overhead per token. Times
exclude compilation (each path runs once first) and are the best of --repeats.

--profile_steps=N also traces N cached decode steps per batch size (jax.profiler) and
prints the device kernels that take the most time per step: where a step's time goes.
"""

import functools

from absl import app, flags
import flax.linen as nn
import jax
import jax.numpy as jnp
from ml_collections import config_flags

from lm import config as config_lib
from lm import models, sampling
from pallas_kernels.benchmarks import timing

_CONFIG = config_flags.DEFINE_config_file(
    'config', 'experiments/configs/default.py', 'Config whose model to time; override '
    'fields as --config.model.FIELD=VALUE for a larger model.')
_BATCH_SIZES = flags.DEFINE_list('batch_sizes', ['1', '32'], 'Batch sizes to time.')
_PROMPT_LENGTH = flags.DEFINE_integer('prompt_length', 16, 'Prompt tokens per row.')
_NEW_TOKENS = flags.DEFINE_integer('new_tokens', 512, 'Generated tokens per row.')
_REPEATS = flags.DEFINE_integer('repeats', 2, 'Timed runs per case; the best is shown.')
_DTYPE = flags.DEFINE_string('dtype', 'auto', 'Compute dtype (auto: bf16 on GPU/TPU).')
_LAYER_PATTERN = flags.DEFINE_string(
    'layer_pattern', None, "Shorthand for --config.model.layer_pattern: 'mamba' caches "
    "convolution and SSM state instead of keys and values.")
_PROFILE_STEPS = flags.DEFINE_integer(
    'profile_steps', 0, 'If positive, trace this many cached decode steps per batch size '
    'and print the device kernels that take the most time per step.')


@functools.partial(jax.jit, static_argnames=('model', 'new_tokens'))
def generate_by_recomputation(params, tokens_bt, lengths_b, *, model, new_tokens: int):
  batch, length = tokens_bt.shape
  positions_bt = jnp.broadcast_to(jnp.arange(length), (batch, length))

  def step(_, carry):
    tokens_bt, lengths_b = carry
    segment_ids_bt = (positions_bt < lengths_b[:, None]).astype(jnp.int32)
    logits_btv = model.apply({'params': params}, tokens_bt, segment_ids_bt, positions_bt)
    next_b = jnp.argmax(logits_btv[jnp.arange(batch), lengths_b - 1], axis=-1)
    return tokens_bt.at[jnp.arange(batch), lengths_b].set(next_b), lengths_b + 1

  return jax.lax.fori_loop(0, new_tokens, step, (tokens_bt, lengths_b))[0]


def print_decode_profile(generate_new, steps: int, rows: int = 12):
  """Per-step kernel times of cached decoding: a run of steps + 1 new tokens minus a run
  of one (which does the prefill and no decode step)."""
  for new in (1, steps + 1):
    jax.block_until_ready(generate_new(new))  # Compile outside the trace.
  prefill_only = timing.device_kernel_times(lambda: generate_new(1))
  with_steps = timing.device_kernel_times(lambda: generate_new(steps + 1))
  per_step = {name: ((n - prefill_only.get(name, (0, 0))[0]) / steps,
                     (us - prefill_only.get(name, (0, 0.0))[1]) / steps)
              for name, (n, us) in with_steps.items()}
  if not per_step:
    print('no device kernels in the trace (the CPU backend reports none)')
    return
  print(f'per decode step ({steps} traced): {sum(n for n, _ in per_step.values()):.0f} kernels,'
        f' {sum(us for _, us in per_step.values()):,.0f} us of kernel time')
  print('| us per step | launches per step | kernel |')
  print('|---|---|---|')
  for name, (n, us) in sorted(per_step.items(), key=lambda item: -item[1][1])[:rows]:
    print(f'| {us:.1f} | {n:.1f} | {name} |')


def main(argv):
  del argv
  model_config = _CONFIG.value.model
  model_config.dtype = config_lib.resolve_dtype(_DTYPE.value)
  if _LAYER_PATTERN.value:
    model_config.layer_pattern = _LAYER_PATTERN.value
  model = models.build(model_config)
  prompt, new = _PROMPT_LENGTH.value, _NEW_TOKENS.value
  if _PROFILE_STEPS.value >= new:
    raise app.UsageError(f'--profile_steps={_PROFILE_STEPS.value} must be below'
                         f' --new_tokens={new}')
  params = nn.meta.unbox(models.init_variables(model, jax.random.key(0))['params'])

  print(f'device: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__},'
        f' dtype {model_config.dtype}; model: {model_config.num_layers} layers of width'
        f' {model_config.embed_dim}, layer_pattern {model_config.layer_pattern!r}'
        f' ({sum(x.size for x in jax.tree.leaves(params)):,} parameters);'
        f' prompt {prompt} tokens, {new} new tokens, greedy')

  def generate(prompts, lengths, new_tokens):
    # Always the full cache length: a step's cost depends on it, profiled or timed.
    return sampling.generate(params, prompts, lengths, jax.random.key(0), jnp.asarray([-1]),
                             model=model, max_new_tokens=new_tokens, cache_length=prompt + new)

  profiles = []
  print('| batch | cached tokens/s | recompute tokens/s | speed-up |')
  print('|---|---|---|---|')
  for batch in map(int, _BATCH_SIZES.value):
    prompts = jax.random.randint(jax.random.key(1), (batch, prompt), 3,
                                 model_config.vocab_size)
    lengths = jnp.full((batch,), prompt, jnp.int32)
    buffer = jnp.zeros((batch, prompt + new), jnp.int32).at[:, :prompt].set(prompts)
    # The best of the repeats: a generation is long enough that the host's noise only adds.
    cached = min(timing.wall_seconds(generate, prompts, lengths, new, repeats=_REPEATS.value))
    recompute = min(timing.wall_seconds(
        functools.partial(generate_by_recomputation, model=model, new_tokens=new),
        params, buffer, lengths, repeats=_REPEATS.value))
    print(f'| {batch} | {batch * new / cached:,.0f} | {batch * new / recompute:,.0f} |'
          f' {recompute / cached:.1f}x |', flush=True)
    if _PROFILE_STEPS.value > 0:
      profiles.append((batch, functools.partial(generate, prompts, lengths)))
  for batch, generate_new in profiles:  # After the table, so its rows stay together.
    print(f'\nbatch {batch}, cached decoding:')
    print_decode_profile(generate_new, _PROFILE_STEPS.value)


if __name__ == '__main__':
  app.run(main)
