"""Tests run on the JAX CPU backend with 8 fake devices, for the sharding tests.

Two tiers by directory: tests/unit (no training run, no subprocess, no TPU compile: the
quick loop) and tests/integration (the rest). Runs that tests only read are trained once
per session (per pytest-xdist worker) here.
"""

import os

# JAX_PLATFORMS=cuda runs the kernel tests compiled on a GPU (tests/backend.py).
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# On the CPU, LLVM at -O0: the test models are tiny, so compiling them is most of a test's
# time (eight Mamba model tests on 2 cores: 80 s at the default level, 47 s at -O0).
FAST_CPU_COMPILE = '--xla_backend_optimization_level=0'
os.environ['XLA_FLAGS'] = ' '.join([
    os.environ.get('XLA_FLAGS', ''), '--xla_force_host_platform_device_count=8',
    FAST_CPU_COMPILE if os.environ['JAX_PLATFORMS'] == 'cpu' else ''])

import jax  # noqa: E402
import pytest  # noqa: E402

from lm.training import loop  # noqa: E402

from helpers import make_tiny_config  # noqa: E402 (after the environment above)


@pytest.fixture
def tiny_config(tmp_path):
  return make_tiny_config(tmp_path / 'corpus')


@pytest.fixture(scope='session')
def pretrained(tmp_path_factory):
  """(workdir, params) of a two-step tiny pretraining run, for post-training to start from.
  Read, never written: a test that changes a run copies it."""
  config = make_tiny_config(tmp_path_factory.mktemp('corpus'))
  config.train.update(num_steps=2, warmup_steps=1, eval_every=2)
  workdir = str(tmp_path_factory.mktemp('pretrained'))
  _, state = loop.train(config, workdir, jax.devices()[:1])
  return workdir, state.params
