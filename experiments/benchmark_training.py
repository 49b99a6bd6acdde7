"""Training throughput of a Mamba LM against a Transformer of the same size, as a table.

  python -m experiments.benchmark_training                  # ~130M models, T=2048 and 8192
  python -m experiments.benchmark_training --size=tiny --seq_lens=64 --tokens_per_step=256 \
      --steps=2   # a smoke run on CPU

The full train step (forward, backward, AdamW update) of lm.training.steps, jitted as the
training loop jits it (lm.training.setup), on random tokens (speed does not depend on them), one packed document
per row. Sizes at --size=130m: the Transformer is 12 layers of width 768 (12 heads of 64,
SwiGLU 2048); the Mamba LM is 24 Mamba layers of width 768 (expand 2, state 16, dt rank
48), as Mamba-130M; both with a tied 32768-token embedding. Each row times --steps steps
after two warm-up steps; MFU is against the device's dense bf16 peak.
"""

import math
import time

from absl import app, flags
import jax
import jax.numpy as jnp
import ml_collections

from experiments.configs import default
from lm import flops, sharding
from lm.training import setup as setup_lib, start as start_lib, steps

_SIZE = flags.DEFINE_enum('size', '130m', ['130m', 'tiny'], 'Model sizes to compare.')
_SEQ_LENS = flags.DEFINE_list('seq_lens', ['2048', '8192'], 'Sequence lengths.')
_TOKENS_PER_STEP = flags.DEFINE_integer('tokens_per_step', 16384,
                                        'Batch size x sequence length, for every row.')
_STEPS = flags.DEFINE_integer('steps', 10, 'Timed steps per row.')
_MODELS = flags.DEFINE_list('models', ['transformer', 'mamba'], 'Rows: transformer, mamba.')
_ATTENTION = flags.DEFINE_string('attention', None,
                                 'Transformer attention (default: cudnn on GPU, else xla).')
_MAMBA_SCAN = flags.DEFINE_string('mamba_scan', 'pallas', 'config.model.mamba_scan.')
_REMAT = flags.DEFINE_string('remat', 'none', 'config.model.remat.')

SIZES = {  # Model config fields per --size and row.
    '130m': {
        'common': dict(vocab_size=32768, embed_dim=768, tie_embeddings=True),
        'transformer': dict(num_layers=12, layer_pattern='attention', num_heads=12,
                            num_kv_heads=12, head_dim=64, mlp_dim=2048),
        'mamba': dict(num_layers=24, layer_pattern='mamba', mamba_expand=2,
                      mamba_state_dim=16, mamba_dt_rank=48),
    },
    'tiny': {
        'common': dict(vocab_size=264, embed_dim=64, tie_embeddings=True),
        'transformer': dict(num_layers=2, layer_pattern='attention', num_heads=2,
                            num_kv_heads=2, head_dim=32, mlp_dim=128),
        'mamba': dict(num_layers=4, layer_pattern='mamba', mamba_state_dim=8, mamba_dt_rank=4),
    },
}


def attention_implementation() -> str:
  return _ATTENTION.value or ('cudnn' if jax.default_backend() == 'gpu' else 'xla')


def model_config(kind: str, seq_len: int) -> ml_collections.ConfigDict:
  config = default.get_config().model
  config.update(SIZES[_SIZE.value]['common'])
  config.update(SIZES[_SIZE.value][kind])
  config.update(max_seq_len=seq_len, attention=attention_implementation(),
                mamba_scan=_MAMBA_SCAN.value, remat=_REMAT.value, dtype='auto')
  return config


def time_training(kind: str, seq_len: int) -> dict:
  """Seconds per train step and the model's parameter count and FLOPs per token."""
  config = default.get_config()
  config.model = model_config(kind, seq_len)
  batch_size = max(_TOKENS_PER_STEP.value // seq_len, 1)
  config.data.update(seq_len=seq_len, batch_size=batch_size)
  config.train.sample_tokens = 0  # No run, no sample.
  config, _ = start_lib.resolve(config, jax.device_count())
  setup = setup_lib.make_setup(config, jax.devices())
  with sharding.activate(setup.mesh):
    state = setup.init(jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (batch_size, seq_len), 3,
                                config.model.vocab_size)
    batch = jax.device_put({
        'tokens': tokens,
        'segment_ids': jnp.ones_like(tokens),
        'positions': jnp.broadcast_to(jnp.arange(seq_len), tokens.shape),
    }, setup.batch_sharding)
    for _ in range(2):  # Compile, then one more so the timed steps start warm.
      state, metrics = setup.train_step(state, batch, steps.Frozen())
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(_STEPS.value):
      state, metrics = setup.train_step(state, batch, steps.Frozen())
    jax.block_until_ready(metrics)
    seconds = (time.perf_counter() - start) / _STEPS.value
  return dict(seconds=seconds, batch_size=batch_size,
              params=sum(math.prod(x.shape) for x in jax.tree.leaves(state.params)),
              flops_per_token=flops.flops_per_token(config.model, seq_len),
              loss=float(metrics['loss']))


def main(argv):
  del argv
  peak = flops.peak_flops_per_device()
  print(f'device: {jax.devices()[0].device_kind} x {jax.device_count()}, jax {jax.__version__}; '
        f'size {_SIZE.value}, {_TOKENS_PER_STEP.value} tokens per step, attention='
        f'{attention_implementation()}, mamba_scan={_MAMBA_SCAN.value}, remat={_REMAT.value}')
  print('| model | parameters | T | B | step ms | tokens/s | MFU |')
  print('|---|---|---|---|---|---|---|')
  for seq_len in map(int, _SEQ_LENS.value):
    for kind in _MODELS.value:
      try:
        result = time_training(kind, seq_len)
      except Exception as error:  # One row failing (memory) must not hide the others.
        print(f'| {kind} | | {seq_len} | | failed: {type(error).__name__}: '
              f'{str(error).splitlines()[0][:100]} | | |', flush=True)
        continue
      tokens_per_second = result['batch_size'] * seq_len / result['seconds']
      mfu = (f'{tokens_per_second * result["flops_per_token"] / (peak * jax.device_count()):.1%}'
             if peak else 'n/a')
      print(f'| {kind} | {result["params"] / 1e6:.1f}M | {seq_len} | {result["batch_size"]} | '
            f'{result["seconds"] * 1e3:.1f} | {tokens_per_second:,.0f} | {mfu} |', flush=True)


if __name__ == '__main__':
  app.run(main)
