"""Paged decode attention speed: one decoding step's attention (one layer) as a table, the
Pallas kernel (the GPU's or the TPU's) against its reference and against the contiguous-cache decode kernel at the
same lengths.

  python -m pallas_kernels.benchmarks.paged_attention       # Llama-3-8B's heads, on a GPU
  python -m pallas_kernels.benchmarks.paged_attention --page_size=64 --window=4096
  python -m pallas_kernels.benchmarks.paged_attention --kernel_blocks=1:2,8:3
      # our GPU kernel at several launches too, num_warps:num_stages
  python -m pallas_kernels.benchmarks.paged_attention --shapes=1024:4 --heads=8 \
      --kv_heads=2 --head_dim=64 --dtype=float32    # on CPU: the references only
  python -m pallas_kernels.benchmarks.paged_attention --shapes=40:2 --heads=4 \
      --kv_heads=2 --head_dim=16 --dtype=float32 --interpret   # a smoke run of the kernel

Shape LENGTH:BATCH: every row attends to LENGTH slots (its new token the last), its pages
spread over the pool in shuffled order. "decode_attention (contiguous)" is
pallas_kernels.decode_attention on a [B, LENGTH, K, H] cache (its kernel on GPU, its
reference elsewhere), which also writes the new key and value; its caches are donated
and carried from call to call, so it updates them in place as in decoding. Wall time is
the median of --repeats blocking calls after one warm-up (it includes the host's
dispatch); device time is the kernels' own per call from a profiler trace (GPU and TPU
only). tokens/s is batch rows per second of device time where there is one, else wall;
GB/s is the keys and values read (the slots each row sees) over the same time.
"""

import math

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.benchmarks import timing
from pallas_kernels.decode_attention import api as decode_api
from pallas_kernels.paged_attention import api, gpu

_SHAPES = flags.DEFINE_list('shapes', ['1024:1', '1024:32', '8192:8', '32768:1'],
                            'LENGTH:BATCH pairs.')
_HEADS = flags.DEFINE_integer('heads', 32, 'Query heads.')
_KV_HEADS = flags.DEFINE_integer('kv_heads', 8, 'KV heads.')
_HEAD_DIM = flags.DEFINE_integer('head_dim', 128, 'Head dimension.')
_PAGE_SIZE = flags.DEFINE_integer('page_size', 16, 'Slots per page.')
_DTYPE = flags.DEFINE_enum('dtype', 'bfloat16', ['bfloat16', 'float32'], 'Input dtype.')
_WINDOW = flags.DEFINE_integer('window', None, 'Sliding window: each token sees the last '
                               'this many slots, itself included (default: all).')
_REPEATS = flags.DEFINE_integer('repeats', 10, 'Timed runs per case.')
_INTERPRET = flags.DEFINE_bool('interpret', False, 'Run the kernels in interpret mode (CPU).')
_KERNEL_BLOCKS = flags.DEFINE_list('kernel_blocks', [], 'Also time our GPU kernel at these '
                                   'launches: num_warps:num_stages.')


def make_inputs(length, batch):
  """Paged inputs (q, k_pages, v_pages, page_table, lengths) and the same keys and values
  as contiguous caches [B, LENGTH, K, H] for decode_attention."""
  dtype, page_size = jnp.dtype(_DTYPE.value), _PAGE_SIZE.value
  pages_per_row = math.ceil(length / page_size)
  rng = np.random.default_rng(0)
  # Page 0 stays unused, as an engine's null page; the rest go to rows in shuffled order.
  page_table = rng.permutation(np.arange(1, 1 + batch * pages_per_row)).reshape(
      batch, pages_per_row).astype(np.int32)
  keys = jax.random.split(jax.random.key(0), 3)
  kv_shape = (1 + batch * pages_per_row, page_size, _KV_HEADS.value, _HEAD_DIM.value)
  q = jax.random.normal(keys[0], (batch, _HEADS.value, _HEAD_DIM.value), dtype)
  k_pages = jax.random.normal(keys[1], kv_shape, dtype)
  v_pages = jax.random.normal(keys[2], kv_shape, dtype)
  lengths = jnp.full((batch,), length, jnp.int32)
  paged = (q, k_pages, v_pages, jnp.asarray(page_table), lengths)
  contiguous = lambda pages: pages[page_table].reshape(
      batch, pages_per_row * page_size, *kv_shape[2:])[:, :length]
  return paged, (contiguous(k_pages), contiguous(v_pages))


def paged(implementation, block_sizes=None):
  return jax.jit(lambda *args: api.paged_attention(
      *args, window=_WINDOW.value, implementation=implementation, block_sizes=block_sizes,
      interpret=_INTERPRET.value))


def contiguous_decode(paged_inputs, caches):
  """decode_attention as a decoding loop runs it: a function of no arguments that writes
  the token's key and value at slot LENGTH - 1 of the carried caches (donated, so in
  place) and returns the attention."""
  q, _, _, _, lengths = paged_inputs
  k_cache, v_cache = caches
  start = lengths - 1
  k_new, v_new = k_cache[:, -1], v_cache[:, -1]
  implementation = 'gpu' if _INTERPRET.value else None
  step = jax.jit(lambda k_cache, v_cache: decode_api.decode_attention(
      q, k_new, v_new, k_cache, v_cache, start, window=_WINDOW.value,
      implementation=implementation, interpret=_INTERPRET.value), donate_argnums=(0, 1))
  state = [jnp.copy(k_cache), jnp.copy(v_cache)]

  def call():
    out, state[0], state[1] = step(*state)
    return out

  return call


def implementations(paged_inputs, caches):
  """Name -> (function, its arguments), or name -> why it is not timed."""
  found = {}
  kernel = jax.default_backend() if jax.default_backend() in api.KERNELS else (
      'gpu' if _INTERPRET.value else None)  # The interpreter runs the GPU kernel.
  if kernel is None:
    found['pallas (ours)'] = 'no GPU or TPU (--interpret runs it in the interpreter)'
  else:
    found['pallas (ours)'] = (paged(kernel), paged_inputs)
  if kernel == 'gpu':
    for spec in _KERNEL_BLOCKS.value:
      num_warps, num_stages = map(int, spec.split(':'))
      found[f'pallas (ours) {spec}'] = (
          paged('gpu', gpu.BlockSizes(num_warps=num_warps, num_stages=num_stages)),
          paged_inputs)
  found['reference'] = (paged('reference'), paged_inputs)
  found['decode_attention (contiguous)'] = (contiguous_decode(paged_inputs, caches), ())
  return found


def speed_table():
  window = 'no window' if _WINDOW.value is None else f'window {_WINDOW.value}'
  print(f'device: {jax.devices()[0].device_kind}, jax {jax.__version__}; {window}, '
        f'{_DTYPE.value}, {_HEADS.value} heads ({_KV_HEADS.value} kv), head dim '
        f'{_HEAD_DIM.value}, page size {_PAGE_SIZE.value}')
  print('| implementation | length | batch | wall us | device us | tokens/s | GB/s |')
  print('|---|---|---|---|---|---|---|')
  for shape in _SHAPES.value:
    length, batch = map(int, shape.split(':'))
    paged_inputs, caches = make_inputs(length, batch)
    seen = length if _WINDOW.value is None else min(length, _WINDOW.value)
    kv_bytes = 2 * batch * seen * _KV_HEADS.value * _HEAD_DIM.value * jnp.dtype(
        _DTYPE.value).itemsize
    for name, entry in implementations(paged_inputs, caches).items():
      if isinstance(entry, str):
        print(f'| {name} | {length} | {batch} | not run: {entry} | | | |')
        continue
      function, args = entry
      try:
        wall = timing.median_seconds(function, *args, repeats=_REPEATS.value)
        device = timing.device_seconds(function, *args, repeats=_REPEATS.value)
      except Exception as error:  # One implementation failing must not hide the others.
        print(f'| {name} | {length} | {batch} | failed: {type(error).__name__}: '
              f'{str(error).splitlines()[0][:80]} | | | |')
        continue
      seconds = wall if device is None else device
      device_us = '' if device is None else f'{device * 1e6:.1f}'
      print(f'| {name} | {length} | {batch} | {wall * 1e6:.1f} | {device_us} | '
            f'{batch / seconds:,.0f} | {kv_bytes / seconds / 1e9:.1f} |', flush=True)


def main(argv):
  del argv
  speed_table()


if __name__ == '__main__':
  app.run(main)
