"""Tests run on the JAX CPU backend with 8 fake devices, for the sharding tests.

Two tiers by directory: tests/unit (no training run, no subprocess, no TPU compile: the
quick loop) and tests/integration (the rest). Runs that tests only read are trained once
per session (per pytest-xdist worker) here, and the commands the tests run share one
import per entry point and one compilation cache.
"""

import os
import shutil
import sys
import tempfile

# JAX_PLATFORMS=cuda runs the kernel tests compiled on a GPU (tests/backend.py).
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# On the CPU, LLVM at -O0 and XLA's older loop emitters: the test models are tiny, so
# compiling them is most of a test's time (eight Mamba model tests on 2 cores: 80 s at the
# default level, 47 s at -O0; the Mamba, sampling and kernel tests: 84 s at -O0, 55 s with
# the fusion emitters off).
FAST_CPU_COMPILE = '--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false'
os.environ['XLA_FLAGS'] = ' '.join([
    os.environ.get('XLA_FLAGS', ''), '--xla_force_host_platform_device_count=8',
    FAST_CPU_COMPILE if os.environ['JAX_PLATFORMS'] == 'cpu' else ''])

# One persistent compilation cache for the run, shared by the pytest-xdist workers and the
# commands the tests start: many tests compile the same tiny programs.
_CACHE = os.path.join(tempfile.gettempdir(), 'lm-test-compile-cache-'
                      + os.environ.get('PYTEST_XDIST_TESTRUNUID', str(os.getpid())))
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', _CACHE)
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '0')

# The integration tier reuses the unit tier's helpers (test_flash_attention's, ...).
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), 'unit'))

import jax  # noqa: E402
import ml_collections  # noqa: E402
import pytest  # noqa: E402

from lm.training import loop  # noqa: E402

# After the environment above:
import fork_server  # noqa: E402
from helpers import cpu_subprocess_env, make_tiny_config, write_corpus  # noqa: E402


def pytest_xdist_auto_num_workers(config):
  """`-n auto`: a worker per core, and one more. Many tests wait on the processes they
  start (several JAX processes, the commands); a third worker on 2 cores fills that time
  (the suite: 16 min 27 s with 2 workers, 13 min 18 s with 3; docs/benchmarks.md)."""
  del config
  return (os.cpu_count() or 1) + 1


def pytest_sessionfinish(session):
  """The run's compilation cache goes with it (in the process that started the workers)."""
  ours = os.environ['JAX_COMPILATION_CACHE_DIR'] == _CACHE  # Not one the user named.
  if ours and not hasattr(session.config, 'workerinput'):
    shutil.rmtree(_CACHE, ignore_errors=True)


@pytest.fixture
def tiny_config(tmp_path):
  return make_tiny_config(tmp_path / 'corpus')


@pytest.fixture(scope='session')
def pretrained_config(tmp_path_factory):
  """The config `pretrained` is trained with; a test copies it to change it."""
  config = make_tiny_config(tmp_path_factory.mktemp('corpus'))
  config.train.update(num_steps=2, warmup_steps=1, eval_every=2)
  return ml_collections.FrozenConfigDict(config)


@pytest.fixture(scope='session')
def pretrained(pretrained_config, tmp_path_factory):
  """(workdir, params) of a two-step tiny pretraining run, for post-training to start from.
  Read, never written: a test that changes a run copies it."""
  workdir = str(tmp_path_factory.mktemp('pretrained'))
  _, state = loop.train(ml_collections.ConfigDict(pretrained_config.to_dict()), workdir,
                        jax.devices()[:1])
  return workdir, state.params


@pytest.fixture(scope='session')
def command_env(tmp_path_factory):
  """The environment of the commands the tests run (helpers.cpu_subprocess_env), with
  JAX's persistent compilation cache in one directory for the session, every program
  cached: each tiny program is compiled by the first command that runs it, then read back
  by the others."""
  return cpu_subprocess_env(
      PYTHONUNBUFFERED='1',
      JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp('compile_cache')),
      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')


@pytest.fixture(scope='session')
def commands(command_env, tmp_path_factory):
  """commands('experiments.NAME', *argv): `python -m experiments.NAME ARGV...` as a real
  process, forked from a server that imported the entry point once
  (tests/fork_server.py); a subprocess.CompletedProcess with its exit code and output."""
  runner = fork_server.Commands(str(tmp_path_factory.mktemp('command_output')), command_env)
  yield runner
  runner.close()


def tiny_run_flags(workdir, corpus) -> list[str]:
  """The command line that trains `trained_run`: four steps on a generated corpus,
  checkpointed, evaluated and logged every two, then a sample."""
  return ['--config=experiments/configs/default.py:tiny', f'--workdir={workdir}',
          '--config.data.source=text', f'--config.data.path={corpus}',
          '--config.data.validation_fraction=0.25', '--config.train.num_steps=4',
          '--config.train.warmup_steps=1', '--config.train.log_every=2',
          '--config.train.eval_every=2', '--config.checkpoint.every_steps=2']


@pytest.fixture(scope='session')
def trained_run(commands, tmp_path_factory):
  """A tiny run trained by the real `python -m experiments.train` command (tiny_run_flags):
  {'workdir', 'corpus', 'flags', 'result' (the command's CompletedProcess)}. Read, never
  written: a test that changes it (evaluate writes its results there) copies it
  (copy_run)."""
  root = tmp_path_factory.mktemp('trained_run')
  corpus = write_corpus(str(root / 'corpus'))
  flags = tiny_run_flags(root / 'run', corpus)
  result = commands('experiments.train', *flags)
  assert result.returncode == 0, result.stderr[-3000:]
  return dict(workdir=root / 'run', corpus=corpus, flags=flags, result=result)


def copy_run(workdir, destination):
  """A copy of the run in `workdir` at `destination`, for a test that writes in it."""
  shutil.copytree(workdir, destination)
  return destination
