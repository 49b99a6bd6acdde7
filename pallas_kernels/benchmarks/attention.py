"""Causal attention speed (TFLOP/s), forward and forward+backward, as a table.

  python -m pallas_kernels.benchmarks.attention             # docs/anchors.md shapes, on a GPU
  python -m pallas_kernels.benchmarks.attention --memory    # S=32768 fwd+bwd: who runs out?
  python -m pallas_kernels.benchmarks.attention \
      --kernel_blocks=64:64:4:2,128:128:8:2/64:64:4:2/64:128:8:2
      # our kernel at several GPU tilings: block_q:block_k:num_warps:num_stages for all
      # three kernels, or FORWARD/DQ/DKV each in that form
  python -m pallas_kernels.benchmarks.attention --mosaic_blocks=128:128:2,64:64:3,128:64:2:0
      # the Mosaic GPU kernels at block_kv:block_kv_dq:stages[:pingpong] tilings too
  python -m pallas_kernels.benchmarks.attention --shapes=64:1 --heads=2 --head_dim=64 \
      --dtype=float32 --interpret   # a smoke run on CPU
  python -m pallas_kernels.benchmarks.attention --window=4096   # sliding-window attention

FLOPs as in docs/anchors.md: 4*B*S^2*N*H/2 forward (causal), 3.5x that for
forward+backward; with --window, 4*B*N*H times the query-key pairs in the window. Wall
time is the median of --repeats blocking calls after one warm-up; device time is the
kernels' own per call from a profiler trace (GPU and TPU only).
"""

from absl import app, flags
import jax
import jax.numpy as jnp

from pallas_kernels.benchmarks import timing
from pallas_kernels.flash_attention import api, gpu, mosaic_gpu

_SHAPES = flags.DEFINE_list('shapes', ['2048:8', '8192:2'], 'SEQ_LEN:BATCH pairs.')
_HEADS = flags.DEFINE_integer('heads', 16, 'Query heads.')
_KV_HEADS = flags.DEFINE_integer('kv_heads', None, 'KV heads (default: = heads).')
_HEAD_DIM = flags.DEFINE_integer('head_dim', 128, 'Head dimension.')
_DTYPE = flags.DEFINE_enum('dtype', 'bfloat16', ['bfloat16', 'float32'], 'Input dtype.')
_REPEATS = flags.DEFINE_integer('repeats', 10, 'Timed runs per case.')
_INTERPRET = flags.DEFINE_bool('interpret', False, 'Run our kernel in interpret mode (CPU).')
_MEMORY = flags.DEFINE_bool('memory', False, 'Instead: fwd+bwd at S=32768, B=1.')
_KERNEL_BLOCKS = flags.DEFINE_list(
    'kernel_blocks', [], 'Also time our GPU kernel at these tilings: '
    'block_q:block_k:num_warps:num_stages, or FORWARD/DQ/DKV each in that form.')
_WINDOW = flags.DEFINE_integer('window', None, 'Sliding window: each query sees the last '
                               'this many keys, itself included (default: all before it).')
_MOSAIC_BLOCKS = flags.DEFINE_list(
    'mosaic_blocks', [], 'Also time the Mosaic GPU kernels at these '
    'block_kv:block_kv_dq:stages[:pingpong] tilings (pingpong 1, the default: '
    'the forward\'s warpgroups alternate softmax and matmuls).')


def _local_window():
  """--window as jax.nn.dot_product_attention's (left, right) window, or None."""
  return None if _WINDOW.value is None else (_WINDOW.value - 1, 0)


def xla(q, k, v):
  return jax.nn.dot_product_attention(q, k, v, is_causal=True, local_window_size=_local_window(),
                                      implementation='xla')


def cudnn(q, k, v):
  return jax.nn.dot_product_attention(q, k, v, is_causal=True, local_window_size=_local_window(),
                                      implementation='cudnn')


def pallas(q, k, v):
  return api.flash_attention(q, k, v, causal=True, window=_WINDOW.value, implementation='gpu',
                             interpret=_INTERPRET.value)


def parse_blocks(spec: str) -> gpu.BlockSizes:
  """'bq:bk:warps:stages' for all three kernels, or 'FORWARD/DQ/DKV' in that form each."""
  tiles = [gpu.Tile(*map(int, part.split(':'))) for part in spec.split('/')]
  return gpu.BlockSizes(*tiles) if len(tiles) == 3 else gpu.BlockSizes(tiles[0], tiles[0],
                                                                        tiles[0])


def pallas_at(spec: str):
  blocks = parse_blocks(spec)
  return lambda q, k, v: api.flash_attention(q, k, v, causal=True, window=_WINDOW.value,
                                             implementation='gpu', block_sizes=blocks,
                                             interpret=_INTERPRET.value)


def mosaic_at(spec: str | None):
  """The Mosaic GPU kernels at 'block_kv:block_kv_dq:stages[:pingpong]', or their default
  tiling."""
  blocks = None
  if spec:
    fields = [int(field) for field in spec.split(':')]
    blocks = mosaic_gpu.BlockSizes(*fields[:3], *map(bool, fields[3:]))
  return lambda q, k, v: api.flash_attention(q, k, v, causal=True, window=_WINDOW.value,
                                             implementation='mosaic_gpu', block_sizes=blocks,
                                             interpret=_INTERPRET.value)


def implementations():
  found = {'pallas (ours)': pallas}
  found.update({f'pallas (ours) {spec}': pallas_at(spec) for spec in _KERNEL_BLOCKS.value})
  found['pallas mosaic (ours)'] = mosaic_at(None)
  found.update({f'pallas mosaic (ours) {spec}': mosaic_at(spec) for spec in _MOSAIC_BLOCKS.value})
  if not _INTERPRET.value:
    found.update({'xla': xla, 'cudnn': cudnn})
    try:
      import tokamax  # Optional: only where it installs.
      window = {} if _WINDOW.value is None else {'local_window_size': _local_window()}
      found['tokamax'] = lambda q, k, v: tokamax.dot_product_attention(q, k, v, is_causal=True,
                                                                       **window)
    except ImportError:
      pass
  return found


def make_inputs(seq_len, batch):
  keys = jax.random.split(jax.random.key(0), 3)
  kv_heads = _KV_HEADS.value or _HEADS.value
  dtype = jnp.dtype(_DTYPE.value)
  q = jax.random.normal(keys[0], (batch, seq_len, _HEADS.value, _HEAD_DIM.value), dtype)
  k = jax.random.normal(keys[1], (batch, seq_len, kv_heads, _HEAD_DIM.value), dtype)
  v = jax.random.normal(keys[2], (batch, seq_len, kv_heads, _HEAD_DIM.value), dtype)
  return q, k, v


def forward_and_backward(attention):
  loss = lambda q, k, v: jnp.sum(attention(q, k, v).astype(jnp.float32))
  return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def median_seconds(function, *args):
  return timing.median_seconds(function, *args, repeats=_REPEATS.value)


def attended_pairs(seq_len):
  """Query-key pairs computed: S^2/2 causal (docs/anchors.md), those in the window with one."""
  window = _WINDOW.value
  if window is None:
    return seq_len ** 2 / 2
  window = min(window, seq_len)
  return window * (window + 1) / 2 + (seq_len - window) * window


def speed_table():
  mask = 'causal' if _WINDOW.value is None else f'causal, window {_WINDOW.value}'
  print(f'device: {jax.devices()[0].device_kind}, jax {jax.__version__}; {mask}, {_DTYPE.value},'
        f' {_HEADS.value} heads ({_KV_HEADS.value or _HEADS.value} kv), head dim {_HEAD_DIM.value}')
  print('| implementation | S | B | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s '
        '| fwd TFLOP/s device | fwd+bwd TFLOP/s device |')
  print('|---|---|---|---|---|---|---|---|---|')
  tflops = lambda flops, seconds: '' if seconds is None else f'{flops / seconds / 1e12:.1f}'
  for shape in _SHAPES.value:
    seq_len, batch = map(int, shape.split(':'))
    q, k, v = make_inputs(seq_len, batch)
    flops = 4 * batch * attended_pairs(seq_len) * _HEADS.value * _HEAD_DIM.value
    for name, attention in implementations().items():
      if name.startswith('pallas mosaic') and (reason := mosaic_gpu.unsupported(q, k)):
        print(f'| {name} | {seq_len} | {batch} | unsupported: {reason} | | | | | |')
        continue
      try:
        forward, both = jax.jit(attention), forward_and_backward(attention)
        times = [median_seconds(forward, q, k, v), median_seconds(both, q, k, v),
                 timing.device_seconds(forward, q, k, v, repeats=_REPEATS.value),
                 timing.device_seconds(both, q, k, v, repeats=_REPEATS.value)]
      except Exception as error:  # One implementation failing must not hide the others.
        print(f'| {name} | {seq_len} | {batch} | failed: {type(error).__name__}: '
              f'{str(error).splitlines()[0][:80]} | | | | | |')
        continue
      print(f'| {name} | {seq_len} | {batch} | {times[0] * 1e3:.3f} | {tflops(flops, times[0])}'
            f' | {times[1] * 1e3:.3f} | {tflops(3.5 * flops, times[1])} | '
            f'{tflops(flops, times[2])} | {tflops(3.5 * flops, times[3])} |', flush=True)


def memory_check():
  q, k, v = make_inputs(32768, 1)
  print(f'fwd+bwd at S=32768, B=1, {_HEADS.value} heads, head dim {_HEAD_DIM.value}, {_DTYPE.value}')
  for name, attention in (('xla', xla), ('pallas (ours)', pallas),
                          ('pallas mosaic (ours)', mosaic_at(None))):
    try:
      seconds = median_seconds(forward_and_backward(attention), q, k, v)
      print(f'{name}: ran, {seconds * 1e3:.1f} ms')
    except Exception as error:
      print(f'{name}: failed: {type(error).__name__}: {str(error).splitlines()[0][:200]}')


def main(argv):
  del argv
  memory_check() if _MEMORY.value else speed_table()


if __name__ == '__main__':
  app.run(main)
