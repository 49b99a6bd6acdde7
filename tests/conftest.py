"""Tests run on the JAX CPU backend with 8 fake devices, for the sharding tests."""

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


@pytest.fixture(scope='module')
def pretrained(tmp_path_factory):
  """(workdir, params) of a two-step tiny pretraining run, for post-training to start from."""
  config = make_tiny_config(tmp_path_factory.mktemp('corpus'))
  config.train.update(num_steps=2, warmup_steps=1, eval_every=2)
  workdir = str(tmp_path_factory.mktemp('pretrained'))
  _, state = loop.train(config, workdir, jax.devices()[:1])
  return workdir, state.params


# Slow tests of the kernel test files, marked here until those files carry
# @pytest.mark.slow themselves: {file: test functions (every parametrization)}. The quick
# loop, `python -m pytest -q -n auto -m "not slow"`, keeps each kernel's reference, dispatch,
# fallback and lowering tests and (for flash attention and the chunked scan) a comparison
# with the reference.
SLOW_KERNEL_TESTS = {
    'test_flash_attention.py': (
        'test_kernel_matches_reference_forward_and_gradients_in_float32',
        'test_kernel_in_bfloat16_stays_within_bfloat16_tolerance',
        'test_default_blocks_handle_a_sequence_shorter_than_one_block',
        'test_mosaic_kernels_give_reference_gradients',
        'test_mosaic_forward_matches_the_reference_in_bfloat16',
        'test_mosaic_lowers_for_hopper_forward_and_backward',
        'test_benchmark_script_runs_on_a_tiny_shape_in_interpret_mode'),
    'test_selective_scan.py': (
        'test_kernel_matches_reference_forward_and_gradients_in_float32',
        'test_kernel_with_bfloat16_inputs_keeps_a_float32_state',
        'test_gpu_kernel_split_into_time_segments_matches_the_reference',
        'test_gpu_backward_tiling_and_atomic_sums_match_the_reference',
        'test_gpu_kernel_options_lower_for_the_gpu',
        'test_benchmark_script_runs_on_a_tiny_shape_in_interpret_mode'),
    'test_decode_attention.py': (
        'test_kernel_matches_reference',
        'test_pallas_decoding_in_the_model_matches_xla_decoding'),
}


@pytest.hookimpl(tryfirst=True)  # Before -m selects by the markers.
def pytest_collection_modifyitems(items):
  for item in items:
    if getattr(item, 'originalname', None) in SLOW_KERNEL_TESTS.get(item.path.name, ()):
      item.add_marker(pytest.mark.slow)
