"""Will a config fit a TPU slice? Compile its train step (and sampling steps) for the
slice here, without a TPU, and print the memory per chip against the chip's HBM.

  pip install -e ".[tpu]"   # libtpu, the TPU compiler, pinned to the jax release
  python -m experiments.compile --config=experiments/configs/open_models.py:llama3_8b \
      --topology=v5p-128 --config.mesh.fsdp=-1 --config.mesh.data=1
  python -m experiments.compile --config=... --topology=v5e-16 --sample_batch=32 \
      --prompt_length=1024 --cache_length=2048     # prefill and decode too

--topology: a slice name, v4-N, v5e-N, v5p-N or v6e-N (N as Cloud TPU names it: chips
for v5e and v6e, TensorCores for v4 and v5p), 2xv5e-256 for two slices, or cpu-N for N
fake CPU devices. The mesh is the config's, its -1 axis filled from the slice. Nothing is
run or written. Exit status 0: every program fits; 1: one does not (the table says by
how much, and which settings would help); 2: bad input (one line naming it).
"""

import os
import sys

from absl import flags
from ml_collections import config_flags

from experiments import cli
from lm.errors import ConfigError

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file.',
                                          lock_config=True)
_TOPOLOGY = flags.DEFINE_string('topology', None, 'v5e-256, v5p-128, 2xv6e-64, cpu-8, ...')
_TRAIN = flags.DEFINE_bool('train', True, 'Compile the train step.')
_SAMPLE_BATCH = flags.DEFINE_integer('sample_batch', 0,
                                     'Rows to sample at once; 0: no sampling steps.')
_PROMPT_LENGTH = flags.DEFINE_integer('prompt_length', 512, 'Prefill length (tokens).')
_CACHE_LENGTH = flags.DEFINE_integer('cache_length', 1024, 'Decoding cache slots per row.')
flags.mark_flags_as_required(['config', 'topology'])


def main():
  topology = _TOPOLOGY.value
  if topology.startswith('cpu-') and topology[4:].isdigit():
    # Before JAX starts its CPU backend (nothing above has asked it for devices).
    os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '')
                               + f' --xla_force_host_platform_device_count={topology[4:]}')
  from lm import aot  # pylint: disable=import-outside-toplevel
  try:
    plan = aot.plan(_CONFIG.value, aot.target(topology), train=_TRAIN.value,
                    sample_batch=_SAMPLE_BATCH.value, prompt_length=_PROMPT_LENGTH.value,
                    cache_length=_CACHE_LENGTH.value)
  except ConfigError as error:  # Apart from 1, "does not fit".
    print(f'error: {error}', file=sys.stderr)
    sys.exit(2)
  print(aot.table(plan), flush=True)
  if not plan.fits:
    sys.exit(1)


if __name__ == '__main__':
  cli.run(main)
