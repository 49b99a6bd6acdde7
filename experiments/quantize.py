"""Weight-only post-training quantization of a run's checkpoint (lm/quantization.py).

  python -m experiments.quantize --workdir=W [--step=N] --output=W2 --scheme=int8|int4 \
      [--group_size=64]

W2 is a new run directory holding W's params with every block matrix stored as integers
(int8: a scale per output channel; int4: a scale per output channel and group of
--group_size inputs), W's config with config.quantization (scheme, group size, source)
and its tokenizer. `experiments.sample` and `experiments.evaluate` run it quantized (the
weights stay integers in memory; each product dequantizes them); convert and
lm_eval read it dequantized; training from it is refused. A LoRA run is quantized with
its adapters folded in.
"""

import os

from absl import flags
import jax

from experiments import cli
from lm import lora, quantization
from lm.errors import ConfigError, check, check_new_directory, check_number
from lm.evaluation import inputs
from lm.training import checkpointing

_WORKDIR, _STEP = cli.checkpoint_flags()
_OUTPUT = flags.DEFINE_string('output', None, 'The new run directory to write.')
_SCHEME = flags.DEFINE_string('scheme', 'int8', f'One of {", ".join(quantization.SCHEMES)}.')
_GROUP_SIZE = flags.DEFINE_integer(
    'group_size', quantization.DEFAULT_GROUP_SIZE,
    'int4: consecutive inputs per scale.')
flags.mark_flags_as_required(['output'])


def quantize(workdir: str, step: int | None, output: str, scheme: str, group_size: int) -> None:
  inputs.check_all([
      inputs.workdir_check(workdir),
      (scheme in quantization.SCHEMES,
       f'--scheme={scheme!r} is not one of {", ".join(quantization.SCHEMES)}'),
  ])
  check_number('--group_size', group_size, at_least=1)
  check_new_directory('--output', output)
  # What the run holds decides the rest, before its arrays are read.
  saved_step, config = checkpointing.inference_config(workdir, step, head=None)
  head = config.model.get('head', 'lm')
  check(head == 'lm', f'--workdir={workdir} holds a model with model.head={head!r}; only a'
        ' language model (model.head=\'lm\') is quantized')
  if quantization.scheme_of(config):
    raise ConfigError(f'--workdir={workdir} is already quantized ({config.quantization.scheme},'
                      f' from {config.quantization.source}): quantize the run it came from')
  quantization.check_groups(config.model, scheme, group_size, '--group_size')

  run = checkpointing.restore_for_inference(workdir, saved_step)
  _, params = quantization.quantize(run.model, run.params, scheme, group_size, run.mesh)
  config = run.config
  config.quantization = quantization.config(
      scheme, group_size, f'{os.path.abspath(workdir)} step {run.step}')
  if lora.enabled(config.lora):  # Read with its adapters folded in.
    config.lora.rank = 0
  checkpointer = checkpointing.Checkpointer(output, max_to_keep=None)
  checkpointer.save_params(run.step, params, config, run.tokenizer)
  checkpointer.close()
  if jax.process_index() == 0:
    before, after = quantization.param_bytes(run.params), quantization.param_bytes(params)
    print(f'quantized step {run.step} of {workdir} to {scheme}'
          + (f' (groups of {group_size})' if scheme in quantization.TILED else '')
          + f' into {output}: params {before / 2**20:.2f} MiB -> {after / 2**20:.2f} MiB')


def main():
  quantize(_WORKDIR.value, _STEP.value, _OUTPUT.value, _SCHEME.value, _GROUP_SIZE.value)


if __name__ == '__main__':
  cli.run(main)
