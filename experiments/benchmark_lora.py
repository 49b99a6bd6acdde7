"""Full fine-tuning against LoRA, as tables.

  python -m experiments.benchmark_lora --init_from=/tmp/lm_default --workdir=/tmp/lm_lora_bench

1. On this machine, SFT (configs/sft.py, the built-in stdlib_functions) from the run in
   --init_from, the same --steps with the same data order for each row: every weight
   (the SFT config's learning rate), and LoRA at each --ranks (configs/sft_lora.py's
   rate; --qlora adds int8 rows). Columns: trained parameters; bytes of the train state
   (trained params and AdamW's two moments) and of the frozen base; median step time
   after the first logged interval; held-out loss after the last step.
2. The same bytes for a released shape (--shape, from configs/open_models.py) from
   jax.eval_shape, no weights: full fine-tuning, LoRA and QLoRA (int8, nf4). Activations
   and gradients are not counted; 4-bit values count half a byte.
"""

import math
import os
import statistics

from absl import app, flags, logging
import jax
import jax.numpy as jnp
import ml_collections

from experiments.configs import open_models, sft, sft_lora
from lm import lora, models
from lm.training import loop
from lm.training import setup as setup_lib, start as start_lib

_INIT_FROM = flags.DEFINE_string('init_from', None, 'The run every row fine-tunes.')
_WORKDIR = flags.DEFINE_string('workdir', '/tmp/lm_lora_bench', 'Where the rows\' runs go.')
_STEPS = flags.DEFINE_integer('steps', 60, 'Optimizer steps per row.')
_RANKS = flags.DEFINE_list('ranks', ['8', '64'], 'LoRA ranks, one row each.')
_QLORA = flags.DEFINE_bool('qlora', True, 'Also each rank with an int8 base.')
_SHAPE = flags.DEFINE_string('shape', 'llama3_8b', 'A configs/open_models.py variant.')
_VARIANT = flags.DEFINE_string('variant', '', 'Config variant of the runs ("tiny": a smoke run).')

GIB = 2 ** 30


def nbytes(tree) -> float:
  """Bytes of the arrays at their types' widths: 4-bit values count half a byte, as TPUs
  and GPUs pack them (numpy's itemsize says 1)."""
  def bits(dtype):
    return jnp.iinfo(dtype).bits if jnp.issubdtype(dtype, jnp.integer) else dtype.itemsize * 8
  return sum(math.prod(x.shape) * bits(x.dtype) / 8 for x in jax.tree.leaves(tree))


def run_config(rank: int, base_dtype: str = '') -> ml_collections.ConfigDict:
  config = (sft_lora if rank else sft).get_config(_VARIANT.value)
  config.lora.update(rank=rank, alpha=2.0 * rank if rank else 16.0, base_dtype=base_dtype)
  steps = _STEPS.value
  config.train.update(init_from=_INIT_FROM.value, num_steps=steps, log_every=max(steps // 6, 1),
                      eval_every=steps, warmup_steps=max(steps // 10, 1), sample_tokens=0)
  config.checkpoint.every_steps = steps
  return config


def measured_row(name: str, config) -> dict:
  workdir = os.path.join(_WORKDIR.value, name.replace(' ', '_'))
  history, state = loop.train(config, workdir)
  times = [config.data.batch_size * config.data.seq_len / row['tokens_per_second']
           for row in history if 'tokens_per_second' in row][1:]
  base = 0
  if lora.enabled(config.lora):
    model = models.build(start_lib.resolve(config, 1)[0].model)
    base = nbytes(lora.abstract_split(model, config.lora)[0])
  return dict(name=name, trained=sum(x.size for x in jax.tree.leaves(state.params)),
              state=nbytes(state.params) + nbytes(state.opt_state), base=base,
              step=statistics.median(times) if times else float('nan'),
              eval_loss=[row['eval_loss'] for row in history if 'eval_loss' in row][-1])


def shape_row(name: str, rank: int, base_dtype: str = '') -> dict:
  """Bytes of the train state and the frozen base of --shape, from shapes alone."""
  config = open_models.get_config(_SHAPE.value)
  config.lora.update(rank=rank, alpha=2.0 * rank if rank else 16.0, base_dtype=base_dtype)
  # Adapters need a model to adapt; this one is named, never read: only shapes are made.
  config.train.init_from = f'{_SHAPE.value} (shapes only)'
  config, _ = start_lib.resolve(config, 1)
  setup = setup_lib.make_setup(config, jax.devices()[:1])
  base = 0
  if rank:
    base = nbytes(lora.abstract_split(models.build(config.model), config.lora)[0])
  return dict(name=name, trained=sum(x.size for x in jax.tree.leaves(setup.abstract_state.params)),
              state=nbytes(setup.abstract_state.params) + nbytes(setup.abstract_state.opt_state),
              base=base)


def main(argv):
  del argv
  logging.set_verbosity(logging.ERROR)  # orbax logs every file it reads and writes.
  if _INIT_FROM.value:
    rows = [measured_row('full SFT', run_config(0))]
    for rank in map(int, _RANKS.value):
      rows.append(measured_row(f'LoRA r={rank}', run_config(rank)))
      if _QLORA.value:
        rows.append(measured_row(f'QLoRA int8 r={rank}', run_config(rank, 'int8')))
    print(f'\nSFT from {_INIT_FROM.value}, {_STEPS.value} steps, on {jax.devices()[0].device_kind}')
    print('| run | trained params | train state MiB | frozen base MiB | step s | held-out loss |')
    print('|---|---|---|---|---|---|')
    for row in rows:
      print(f'| {row["name"]} | {row["trained"]:,} | {row["state"] / 2**20:.1f} |'
            f' {row["base"] / 2**20:.1f} | {row["step"]:.3f} | {row["eval_loss"]:.4f} |')
  shape = [shape_row('full fine-tuning', 0)]
  for rank in map(int, _RANKS.value):
    shape += [shape_row(f'LoRA r={rank}', rank), shape_row(f'QLoRA int8 r={rank}', rank, 'int8'),
              shape_row(f'QLoRA nf4 r={rank}', rank, 'nf4')]
  print(f'\n{_SHAPE.value}\'s shape (params in {open_models.get_config(_SHAPE.value).model.param_dtype}):')
  print('| run | trained params | train state GiB | frozen base GiB | total GiB |')
  print('|---|---|---|---|---|')
  for row in shape:
    print(f'| {row["name"]} | {row["trained"]:,} | {row["state"] / GIB:.2f} |'
          f' {row["base"] / GIB:.2f} | {(row["state"] + row["base"]) / GIB:.2f} |')


if __name__ == '__main__':
  app.run(main)
