"""The training loop's runs: resumed exactly, past an unfinished checkpoint write, and
stopped at a non-finite loss."""

import os
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from lm.training import logger as logger_lib, loop, steps

from helpers import make_tiny_config


@pytest.fixture
def tiny_config(tiny_config):
  """conftest's tiny config with one layer: what these runs check does not depend on the
  depth, and one layer compiles quicker."""
  tiny_config.model.num_layers = 1
  return tiny_config


def losses_by_step(history):
  return {row['step']: row['loss'] for row in history if 'loss' in row}


@pytest.fixture(scope='module')
def resumed_runs(tmp_path_factory):
  """An uninterrupted eight-step run with checkpoints at steps 3, 6 and 8; and the same run
  stopped at step 5, its step-5 checkpoint dropped and an unfinished write of step 6 left
  behind, then resumed to step 8. {'config', 'uninterrupted', 'state', 'first', 'second',
  'resumed_state', 'workdir' (the resumed run's)}; read, never written."""
  config = make_tiny_config(tmp_path_factory.mktemp('corpus'))
  config.model.num_layers = 1  # As in tiny_config above.
  config.train.update(num_steps=8, warmup_steps=2, log_every=1, eval_every=4)
  config.checkpoint.every_steps = 3
  devices = jax.devices()[:1]
  root = tmp_path_factory.mktemp('runs')
  uninterrupted, state = loop.train(config, str(root / 'straight'), devices)

  interrupted_config = ml_collections.ConfigDict(config.to_dict())
  interrupted_config.train.num_steps = 5  # Stops after the checkpoint at step 3 and 5.
  first, _ = loop.train(interrupted_config, str(root / 'resumed'), devices)
  # Drop the step-5 checkpoint: the "kill" happened after step 4, so we resume from 3.
  shutil.rmtree(root / 'resumed' / 'checkpoints' / '5')
  # What a kill during orbax's write of the next checkpoint leaves behind: a temporary
  # directory.
  os.makedirs(root / 'resumed' / 'checkpoints' / '6.orbax-checkpoint-tmp' / 'state')
  second, resumed_state = loop.train(config, str(root / 'resumed'), devices)
  return dict(config=config, uninterrupted=uninterrupted, state=state, first=first,
              second=second, resumed_state=resumed_state, workdir=root / 'resumed')


def test_resume_gives_the_same_losses_and_params_as_an_uninterrupted_run(resumed_runs,
                                                                         tmp_path):
  uninterrupted, state = resumed_runs['uninterrupted'], resumed_runs['state']
  first, second = resumed_runs['first'], resumed_runs['second']
  resumed_state = resumed_runs['resumed_state']

  assert [row['step'] for row in second if 'loss' in row] == [4, 5, 6, 7, 8]
  want = losses_by_step(uninterrupted)
  got = {**losses_by_step(first), **losses_by_step(second)}
  assert sorted(got) == sorted(want)
  np.testing.assert_allclose([got[s] for s in sorted(want)], [want[s] for s in sorted(want)],
                             rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
               state.params, resumed_state.params)
  # metrics.jsonl: step 4 and 5, logged twice, keep the resumed run's values; a line cut
  # by a kill is passed over (in a copy: the run is shared).
  shutil.copy(resumed_runs['workdir'] / logger_lib.METRICS_FILE,
              tmp_path / logger_lib.METRICS_FILE)
  with open(tmp_path / logger_lib.METRICS_FILE, 'a') as f:
    f.write('{"step": 9, "lo')
  steps, logged = logger_lib.read_metrics(str(tmp_path))['loss']
  assert steps == sorted(want) and logged == [got[s] for s in sorted(want)]
  # Evaluations at every eval_every and at each run's last step.
  assert logger_lib.read_metrics(str(tmp_path))['eval_loss'][0] == [4, 5, 8]


def test_an_unfinished_checkpoint_write_is_ignored(resumed_runs):
  # The run resumed from step 3, past the temporary directory of step 6, and cleared it.
  history, workdir = resumed_runs['second'], resumed_runs['workdir']
  assert [row['step'] for row in history if 'loss' in row] == [4, 5, 6, 7, 8]
  assert not (workdir / 'checkpoints' / '6.orbax-checkpoint-tmp').exists()


def test_a_non_finite_loss_stops_the_run_with_its_step(tiny_config, tmp_path, monkeypatch):
  original = steps.train_step
  def poisoned(state, batch, frozen, **kwargs):
    state, metrics = original(state, batch, frozen, **kwargs)
    metrics['loss'] = jnp.where(state.step >= 3, jnp.nan, metrics['loss'])
    return state, metrics
  monkeypatch.setattr(steps, 'train_step', poisoned)
  tiny_config.train.update(log_every=1, num_steps=6, warmup_steps=1)
  with pytest.raises(FloatingPointError, match='at step 3'):
    loop.train(tiny_config, str(tmp_path), jax.devices()[:1])
