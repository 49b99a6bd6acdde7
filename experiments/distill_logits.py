"""The teacher's logits of every batch of a distillation run, written to disk once, so
that the run (and others of the same data and seed) reads them instead of running the
teacher; as MaxText precomputes its teacher's top k for a big vocabulary.

  python -m experiments.distill_logits --config=experiments/configs/distill.py \
      --config.train.distill.teacher=/tmp/lm_default --config.train.distill.top_k=32 \
      --output=/tmp/teacher_logits
  python -m experiments.train --config=experiments/configs/distill.py --workdir=/tmp/lm_distill \
      --config.train.distill.top_k=32 --config.train.distill.teacher_logits=/tmp/teacher_logits

It makes the run's batches as its training loop would (config.train.num_steps of them,
then config.train.eval_steps evaluation batches) and writes each with the teacher's top
k (or, with top_k=0, its whole distribution: [batch, seq_len, vocab] float32 a step) as
OUTPUT/train/STEP.npz and OUTPUT/eval/INDEX.npz, then teacher_logits.json, last. On one
process; a run on several reads them if its config.data.streams is the one written with.
"""

import itertools
import os

from absl import flags
import jax
import numpy as np
from ml_collections import config_flags

from experiments import cli
from lm import objectives, sharding
from lm.errors import check, check_new_directory
from lm.objectives import distill
from lm.training import checkpointing, loop, setup as setup_lib, start

_CONFIG = config_flags.DEFINE_config_file('config', None, 'The distillation run\'s config.',
                                          lock_config=True)
_OUTPUT = flags.DEFINE_string('output', None, 'The directory to write (new).')
flags.mark_flags_as_required(['config', 'output'])


def write(config, output: str) -> None:
  settings = config.train.distill
  check(config.train.objective == 'distill', f'config.train.objective='
        f'{config.train.objective!r}: the teacher\'s logits are written for a \'distill\' run')
  check(not settings.teacher_logits, 'config.train.distill.teacher_logits is what this'
        ' writes: give config.train.distill.teacher, the teacher run')
  check(settings.on_policy_fraction == 0, 'config.train.distill.on_policy_fraction > 0:'
        ' on-policy batches are the student\'s samples, unknown before the run')
  check(jax.process_count() == 1, 'experiments.distill_logits runs on one process (set'
        ' config.data.streams to the training run\'s number of processes)')
  check_new_directory('--output', output)
  devices = jax.devices()
  meta = distill.logits_meta_for(config)  # Before resolve fills in what the run chooses.
  config, tokenizer = start.resolve(config, len(devices))
  objective = objectives.get('distill')
  data = loop.datasets(config, objective.data_reader(config.train), tokenizer)
  setup = setup_lib.make_setup(config, devices)
  with sharding.activate(setup.mesh):
    teacher = checkpointing.restore_for_inference(
        settings.teacher, flag='config.train.distill.teacher', mesh=setup.mesh)
    rollout = objective.make_rollout(setup, tokenizer, config,
                                     [(teacher.model, teacher.params)])
    batches = [(step, next(data.train_iterator), True)
               for step in range(config.train.num_steps)]
    batches += [(index, host_batch, False) for index, host_batch in enumerate(
        itertools.islice(data.validation_dataset, data.eval_batches))]
    for part in ('train', 'eval'):
      os.makedirs(os.path.join(output, part), exist_ok=True)
    for step, host_batch, train in batches:
      batch, _ = rollout(None, host_batch, step, train=train)
      names = ('tokens',) + tuple(name for name in distill.TEACHER_ARRAYS if name in batch)
      np.savez(distill.logits_path(output, step, train=train),
               **{name: np.asarray(batch[name]) for name in names})
  meta['teacher'] = os.path.abspath(settings.teacher)
  distill.write_logits_meta(output, meta)  # Last: without it the directory is unfinished.
  print(f'wrote the teacher\'s logits of {config.train.num_steps} training and'
        f' {data.eval_batches} evaluation batches to {output}')


def main():
  write(_CONFIG.value, _OUTPUT.value)


if __name__ == '__main__':
  cli.run(main)
