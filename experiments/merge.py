"""A LoRA run's adapters folded into its base: a full lm checkpoint.

  python -m experiments.merge --workdir=W [--step=N] --output=W2

W2 holds the params W + (alpha / r) A B of every adapted weight (dequantized where the
run's base was stored quantized, so W2 computes what the run trained), with W's config
(adapters off) and tokenizer. Sample, evaluate, train from it (config.train.init_from),
or export it (experiments.convert --to_hf). Sample, evaluate and convert also read a
LoRA run directly, merging it in memory.
"""

import os

from absl import flags
import jax

from experiments import cli
from lm import lora
from lm.errors import check, check_new_directory
from lm.training import checkpointing

_WORKDIR, _STEP = cli.checkpoint_flags()
_OUTPUT = flags.DEFINE_string('output', None, 'The new run directory to write.')
flags.mark_flags_as_required(['output'])


def merge(workdir: str, step: int | None, output: str) -> None:
  check_new_directory('--output', output)
  run = checkpointing.restore_for_inference(workdir, step, head=None)  # A reward model too.
  check(lora.enabled(run.config.lora),
        f'--workdir={workdir}: its checkpoint holds every weight (config.lora.rank=0):'
        ' nothing to merge')
  config = run.config
  config.merged_from = f'{os.path.abspath(workdir)} step {run.step}'
  config.lora.rank = 0
  checkpointer = checkpointing.Checkpointer(output, max_to_keep=None)
  checkpointer.save_params(0, run.params, config, run.tokenizer)
  checkpointer.close()
  if jax.process_index() == 0:
    print(f'merged step {run.step} of {workdir} into {output}')


def main():
  merge(_WORKDIR.value, _STEP.value, _OUTPUT.value)


if __name__ == '__main__':
  cli.run(main)
