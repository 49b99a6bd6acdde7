"""Flash attention for Hopper GPUs in Pallas Mosaic GPU (wgmma and TMA), forward and backward.

Dimension letters as in lm/__init__.py: B, T, S, N, K, H. S, P, dS, dP, O, Q, K, V in
the formulas are the FlashAttention papers' matrices (scores, probabilities, ...).

Why a second GPU kernel: the Triton one (gpu.py) tops out near 320 TFLOP/s forward on
the H100 (docs/benchmarks.md); Hopper's tensor cores are fed at full rate only by
warpgroup MMAs (wgmma) reading operands from shared memory that the TMA unit fills
asynchronously, which Triton's Pallas lowering does not give us control of.

Structure (FlashAttention-3's warp specialisation, Shah et al. 2024). Every kernel runs
CTAs of three warpgroups: two compute warpgroups, each owning 64 rows (one wgmma M) of
the CTA's 128-row tile, and one memory warpgroup (`_stream`) that copies the streamed
operand's blocks by TMA into a ring of `stages` shared-memory slots. Each slot has a
"ready" barrier (the TMA's arrival) and a "free" barrier both compute warpgroups arrive
at when done with it, so loads of later blocks overlap the math on earlier ones; both
compute warpgroups walk the same blocks, so the ring advances in lockstep (rows that
cannot see a block get it masked). With BlockSizes.pingpong the forward's two compute
warpgroups also meet at a barrier twice a step, one phase apart, so one's softmax runs
while the other's matmuls occupy the tensor cores (FlashAttention-3's ping-pong).
  forward (tile: queries; streams K, V): S = Q K^T by one wgmma from shared memory
      (K read transposed in place), the online softmax in base 2 (log2 e folded into the
      scale), O += P V by a wgmma whose left operand P is in registers. Writes O and the
      row log-sum-exp (base 2).
  dq (tile: queries; streams K, V): S = Q K^T and dP = dO V^T issued together, then
      P = exp2(S - lse), dS = P (dP - delta), dQ += dS K.
  dk/dv (tile: keys; streams Q and dO of each query head that reads the kv head): keys as
      rows, S^T = K Q^T and dP^T = V dO^T issued together, then dV += P^T dO and
      dK += dS^T Q together: two wgmma waits a step rather than four (5% off the backward
      at S=8192 on the H100). Per-query lse and delta come from global memory into
      registers in the wgmma column layout.
Each kernel masks only the blocks that cross the diagonal or hold padding. With a sliding
window the forward and dq kernels start (and stream from) the first key block in the
window of the tile's first query, the dk/dv kernel stops after the last query block whose
window reaches the tile, and blocks that cross the window's edge are masked too. The
tiles with the most causal work (queries far from the start, keys near it) are launched
first, those of every head before any lighter one, so the last wave is short.

GQA: query head n reads kv head n // groups straight from K and V (never repeated).
Segment ids (packed documents): each step loads its block's ids from global memory into
registers and every block is masked. Padding: both lengths to a multiple of the 128-row
tile (and of block_kv), padding keys masked by index, padding queries sliced off (and
masked in dk/dv).

In interpret mode (tests on the CPU) the matmuls run as jnp dots on the shared-memory
tiles and layout casts are skipped: the interpreter of jax 0.10 cannot read a transposed
wgmma operand nor cast layouts, and none can run wgmma with a register operand or a
preinitialised accumulator. The pipeline, barriers, masks and softmax are the kernels'
own either way; the wgmma forms are checked by lowering for the GPU (tests) and by
running on one.
"""

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import compat
from pallas_kernels.flash_attention import gpu as triton_gpu
from pallas_kernels.flash_attention.reference import MASK_VALUE
from pallas_kernels.padding import pad_axis

LOG2_E = triton_gpu.LOG2_E
_COMPUTE_WARPGROUPS = 2
_ROWS = 64  # Rows per compute warpgroup: one wgmma M.
_TILE = _COMPUTE_WARPGROUPS * _ROWS  # Rows per CTA; sequences are padded to a multiple.
_SMEM_BYTES = 227 * 1024  # Shared memory one CTA may use on the H100.
# Registers a thread: the SM's 65,536 split as 2 x 128 x 232 + 128 x 40 = 64,512, nearly
# all to the math (the memory warpgroup only issues copies).
_COMPUTE_REGISTERS, _MEMORY_REGISTERS = 232, 40
_ROW = plgpu.Layout.WGMMA.reduce(1)  # A [rows] vector laid out like a wgmma result's rows.
_COLUMN = plgpu.Layout.WGMMA.reduce(0)  # A [columns] vector likewise.


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Each warpgroup's rows are 64 (wgmma's M): queries in the forward and dq kernels, keys
  in the dk/dv kernel, whose streamed query blocks are 64 too."""
  block_kv: int = 128  # Keys per forward step.
  block_kv_dq: int = 64  # Keys per dq step (it holds two [64, block] float32 tiles).
  stages: int = 2  # Streamed blocks in flight, every kernel.
  # Forward: FlashAttention-3's ping-pong. The compute warpgroups meet at a barrier twice
  # a step, one phase apart, so one's softmax runs while the other's matmuls do (8% off
  # the forward at S=8192 on the H100).
  pingpong: bool = True

  def __post_init__(self):
    if self.block_kv not in (64, 128, 192, 256):
      raise ValueError(f'block_kv={self.block_kv} must be 64, 128, 192 or 256')
    if self.block_kv_dq not in (64, 128):
      raise ValueError(f'block_kv_dq={self.block_kv_dq} must be 64 or 128')
    if self.stages < 2:
      raise ValueError(f'stages={self.stages} must be at least 2')


@functools.cache
def runs_here() -> bool:
  """Whether the default device can run these kernels: wgmma is Hopper's alone (sm_90),
  and CUDA runtimes 12.8.0 to 12.9.1 have a ptxas bug that jax's own Mosaic attention
  refuses causal masks for (so do we)."""
  device = jax.devices()[0]
  if device.platform != 'gpu' or getattr(device, 'compute_capability', None) != '9.0':
    return False
  runtime = compat.cuda_runtime_version() or 0
  return not 12080 <= runtime < 12091


def unsupported(q, k) -> str | None:
  """Why this kernel cannot take these inputs, or None."""
  if q.dtype not in (jnp.bfloat16, jnp.float16) or k.dtype != q.dtype:
    return f'dtype {q.dtype} (k {k.dtype}): wgmma takes bfloat16 or float16 here'
  if q.shape[-1] not in (64, 128):
    return f'head_dim={q.shape[-1]} is not 64 or 128'
  return None


def _smem_tile(shape, dtype):
  """A shared-memory buffer in the tiled, 128-byte-swizzled form wgmma and TMA read
  without bank conflicts (rows of 64 two-byte elements)."""
  return plgpu.SMEM(shape, dtype, transforms=(plgpu.TilingTransform((8, 64)),
                                              plgpu.SwizzleTransform(128)))


def _with_layout(x, layout, interpret):
  """x in a register layout (a no-op in meaning; jax 0.10's interpreter lacks it)."""
  return x if interpret else plgpu.layout_cast(x, layout)


def _load(ref, layout, interpret):
  """A small vector straight from global memory into registers in `layout`."""
  return ref[...] if interpret else plgpu.load(ref, (), layout=layout, optimized=False)


def _iota(shape, dimension, interpret):
  if interpret:
    return lax.broadcasted_iota(jnp.int32, shape, dimension)
  return plgpu.broadcasted_iota(jnp.int32, shape, dimension, layout=plgpu.Layout.WGMMA)


def _zeros(shape, layout, interpret):
  return _with_layout(jnp.zeros(shape, jnp.float32), layout, interpret)


def _dots_t(pairs, interpret, while_running=None):
  """[A B^T for (A, B) in pairs], shared-memory tiles [rows, H] and [columns, H] to float32
  [rows, columns], as wgmmas issued together and awaited once (B read transposed in
  place); `while_running()` runs between the issue and the wait."""
  if interpret:
    while_running and while_running()
    return [jnp.dot(a[...], b[...].T, preferred_element_type=jnp.float32) for a, b in pairs]

  def run(*accs):
    for acc, (a, b) in zip(accs, pairs):
      plgpu.wgmma(acc, a, b.T)
    while_running and while_running()
    return [acc[...] for acc in accs]  # The first read waits for all of them.
  return pl.run_scoped(run, *[plgpu.ACC((a.shape[0], b.shape[0]), jnp.float32)
                              for a, b in pairs])


def _accumulate_dots(terms, interpret):
  """[acc + P V for (acc, P, V) in terms], P [rows, columns] from registers and V
  [columns, H] from shared memory, accumulating in place in the wgmma registers; issued
  together, awaited once."""
  if interpret:
    return [acc + jnp.dot(p, v[...], preferred_element_type=jnp.float32) for acc, p, v in terms]

  def run(accs):
    for acc, (_, p, v) in zip(accs, terms):
      plgpu.wgmma(acc, p, v)
  return list(pl.run_state(run)(tuple(plgpu.ACC.init(acc) for acc, _, _ in terms)))


def _stream(copies, num_steps, max_steps, stages):
  """The memory warpgroup: for t in [0, num_steps), block t of every stream into ring slot
  t % stages, once both compute warpgroups have freed that slot of that stream. `copies`
  holds (source(t) -> global-memory view, ring [stages, ...], ready, free barriers);
  `max_steps` bounds num_steps statically."""
  plgpu.set_max_registers(_MEMORY_REGISTERS, action='decrease')

  def load(t, slot, wait):
    for source, ring, ready, free in copies:
      if wait:
        plgpu.barrier_wait(free.at[slot])
      plgpu.copy_gmem_to_smem(source(t), ring.at[slot], ready.at[slot])

  for t in range(min(stages, max_steps)):  # Fill the ring.
    if isinstance(num_steps, int):
      load(t, t, wait=False)
    else:
      pl.when(t < num_steps)(functools.partial(load, t, t, wait=False))

  @pl.loop(stages, num_steps)
  def _refill(t):
    load(t, lax.rem(t, jnp.int32(stages)), wait=True)

  @pl.loop(jnp.maximum(num_steps - stages, 0), num_steps)
  def _drain(t):  # Observe the last frees too, so no barrier phase is left pending.
    for _, _, _, free in copies:
      plgpu.barrier_wait(free.at[lax.rem(t, jnp.int32(stages))])


def _load_tiles(copies, barrier):
  """This warpgroup's own tiles (global view, shared-memory buffer) by TMA, awaited."""
  for source, destination in copies:
    plgpu.copy_gmem_to_smem(source, destination, barrier)
    plgpu.barrier_wait(barrier)


def _meet(barrier):
  """Both compute warpgroups reach this point (the next phase of a two-arrival barrier)."""
  plgpu.barrier_arrive(barrier)
  plgpu.barrier_wait(barrier)


def _store_tiles(copies):
  """(registers, shared-memory buffer, global view) triples out by TMA, awaited."""
  for value, buffer, _ in copies:
    buffer[...] = value.astype(buffer.dtype)
  plgpu.commit_smem()  # Make the stores visible to the TMA unit.
  for _, buffer, destination in copies:
    plgpu.copy_smem_to_gmem(buffer, destination)
  plgpu.wait_smem_to_gmem(0)


class _QueryTile(NamedTuple):
  """Where a query-tile CTA (forward, dq) and this warpgroup of it stand."""
  batch: jax.Array
  head: jax.Array
  warpgroup: jax.Array
  row0: jax.Array  # The warpgroup's first query row.
  kv_blocks: int
  # Key blocks visited, [first, num_steps): from the tile's first row's window (0 without
  # one) to its last row's diagonal (all, if not causal). Those in [first, window_end)
  # cross the window's edge, those in [window_end, unmasked) need no mask for any row of
  # the tile (before its first row and in every row's window, no padding keys, no segment
  # ids), the rest are masked.
  first: jax.Array | int
  window_end: jax.Array | int
  unmasked: jax.Array | int
  num_steps: jax.Array | int


def _query_tile(kv_len, kv_blocks, *, causal, window, segments, num_tiles, block_q,
                block_kv):
  batch, head = lax.axis_index('batch'), lax.axis_index('heads')
  # Causal tiles far from the start do the most work: start them first.
  tile = num_tiles - 1 - lax.axis_index('tiles') if causal else lax.axis_index('tiles')
  warpgroup = lax.axis_index('warpgroup')
  tile_rows = _COMPUTE_WARPGROUPS * block_q
  num_steps, unmasked = kv_blocks, 0 if segments else kv_len // block_kv
  if causal:
    num_steps = jnp.minimum(lax.div((tile + 1) * tile_rows + block_kv - 1, block_kv), kv_blocks)
    unmasked = jnp.minimum(lax.div(tile * tile_rows, block_kv), unmasked)
  first = window_end = 0
  if window is not None:
    first = lax.div(jnp.maximum(tile * tile_rows - window + 1, 0), block_kv)
    # Key blocks from here on are in the window of every row of the tile.
    window_end = lax.div(jnp.maximum((tile + 1) * tile_rows - window, 0) + block_kv - 1,
                         block_kv)
    window_end = jnp.clip(window_end, first, num_steps)
    unmasked = jnp.clip(unmasked, window_end, num_steps)
  return _QueryTile(batch, head, warpgroup, tile * tile_rows + warpgroup * block_q, kv_blocks,
                    first, window_end, unmasked, num_steps)


def _key_runs(where):
  """(start, stop, masked) of the runs of key blocks a query tile visits, in order."""
  return ((where.first, where.window_end, True), (where.window_end, where.unmasked, False),
          (where.unmasked, where.num_steps, True))


def _visibility(causal, window, *, keys_as_rows):
  """(rows, cols) -> where the query sees the key, by the causal mask and the sliding
  window; None without a causal mask."""
  if not causal:
    return None

  def visible(rows, cols):
    behind = cols - rows if keys_as_rows else rows - cols  # Query index - key index.
    return behind >= 0 if window is None else (behind >= 0) & (behind < window)
  return visible


def _mask_key_block(s, where, j, block_kv, kv_segment_ref, q_segments, *, causal, window,
                    kv_len, interpret):
  """The mask of key block j for a query-row kernel (forward, dq)."""
  return _mask(s, where.row0 + _iota(s.shape, 0, interpret),
               j * block_kv + _iota(s.shape, 1, interpret),
               visible=_visibility(causal, window, keys_as_rows=False), col_limit=kv_len,
               row_ids=q_segments,
               col_ids=None if q_segments is None else _load(
                   kv_segment_ref.at[where.batch, pl.ds(j * block_kv, block_kv)], _COLUMN,
                   interpret))


def _mask(s, rows, cols, *, visible, col_limit=None, row_ids=None, col_ids=None):
  """s where column (key) `cols` is visible to row `rows` (by `visible(rows, cols)`, the
  padding limit and the segment ids), else MASK_VALUE. The kernels hold either
  orientation: queries as rows (forward, dq) or keys as rows (dk/dv)."""
  conditions = [cols < col_limit if col_limit is not None else None,
                visible(rows, cols) if visible else None,
                (lax.broadcast_in_dim(row_ids, s.shape, [0]) ==
                 lax.broadcast_in_dim(col_ids, s.shape, [1])) if row_ids is not None else None]
  mask = None
  for condition in conditions:
    if condition is not None:
      mask = condition if mask is None else mask & condition
  return s if mask is None else jnp.where(mask, s, MASK_VALUE)


def _forward_kernel(q_ref, k_ref, v_ref, q_segment_ref, kv_segment_ref, o_ref, lse_ref,
                    q_smem, k_smem, v_smem, lse_smem, q_ready, k_ready, v_ready, k_free,
                    v_free, schedule, *, scale, causal, window, segments, groups, kv_len,
                    num_tiles, block_q, block_kv, stages, pingpong, interpret):
  where = _query_tile(kv_len, k_ref.shape[1] // block_kv, causal=causal, window=window,
                      segments=segments, num_tiles=num_tiles, block_q=block_q,
                      block_kv=block_kv)
  batch, head, warpgroup, row0 = where.batch, where.head, where.warpgroup, where.row0

  @pl.when(warpgroup < _COMPUTE_WARPGROUPS)
  def _compute():
    plgpu.set_max_registers(_COMPUTE_REGISTERS, action='increase')
    q_tile = q_smem.at[warpgroup]
    _load_tiles([(q_ref.at[batch, pl.ds(row0, block_q), head], q_tile)], q_ready.at[warpgroup])
    q_segments = (_load(q_segment_ref.at[batch, pl.ds(row0, block_q)], _ROW, interpret)
                  if segments else None)

    if pingpong:  # Warpgroup 1 runs a phase behind: its softmax meets 0's matmuls.
      pl.when(warpgroup == 1)(lambda: _meet(schedule))

    def step(j, carry, masked):
      acc, m, l = carry
      slot = lax.rem(j - where.first, jnp.int32(stages))
      plgpu.barrier_wait(k_ready.at[slot])
      [s] = _dots_t([(q_tile, k_smem.at[slot])], interpret,
                    functools.partial(_meet, schedule) if pingpong else None)
      s = s * scale
      plgpu.barrier_arrive(k_free.at[slot])
      if masked:
        s = _mask_key_block(s, where, j, block_kv, kv_segment_ref, q_segments, causal=causal,
                            window=window, kv_len=kv_len, interpret=interpret)
      m_new = jnp.maximum(m, s.max(axis=1))
      correction = jnp.exp2(m - m_new)
      p = jnp.exp2(s - lax.broadcast_in_dim(m_new, s.shape, [0]))
      l = l * correction + p.sum(axis=1)
      acc = acc * lax.broadcast_in_dim(correction, acc.shape, [0])
      if pingpong:
        plgpu.barrier_arrive(schedule)  # Softmax done; the tensor cores are the other's.
      plgpu.barrier_wait(v_ready.at[slot])
      if pingpong:
        plgpu.barrier_wait(schedule)  # Until the other warpgroup's softmax is done too.
      [acc] = _accumulate_dots([(acc, p.astype(q_ref.dtype), v_smem.at[slot])], interpret)
      plgpu.barrier_arrive(v_free.at[slot])
      return acc, m_new, l

    carry = (_zeros((block_q, q_ref.shape[-1]), plgpu.Layout.WGMMA, interpret),
             _with_layout(jnp.full((block_q,), MASK_VALUE, jnp.float32), _ROW, interpret),
             _zeros((block_q,), _ROW, interpret))
    for start, stop, masked in _key_runs(where):
      carry = lax.fori_loop(start, stop, functools.partial(step, masked=masked), carry)
    acc, m, l = carry
    if pingpong:  # Warpgroup 0's last meeting, matching 1's first: equal arrivals.
      pl.when(warpgroup == 0)(lambda: _meet(schedule))
    lse_smem.at[warpgroup][...] = m + jnp.log2(l)
    _store_tiles([(acc / lax.broadcast_in_dim(l, acc.shape, [0]), q_tile,
                   o_ref.at[batch, pl.ds(row0, block_q), head])])
    plgpu.copy_smem_to_gmem(lse_smem.at[warpgroup], lse_ref.at[batch, head, pl.ds(row0, block_q)])
    plgpu.wait_smem_to_gmem(0)

  @pl.when(warpgroup == _COMPUTE_WARPGROUPS)
  def _memory():
    # Step t streams key block first + t into slot t % stages, as the compute reads it.
    keys = lambda t: (batch, pl.ds((where.first + t) * block_kv, block_kv),
                      lax.div(head, groups))
    _stream([(lambda t: k_ref.at[keys(t)], k_smem, k_ready, k_free),
             (lambda t: v_ref.at[keys(t)], v_smem, v_ready, v_free)],
            where.num_steps - where.first, where.kv_blocks, stages)


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_segment_ref, kv_segment_ref,
               dq_ref, q_smem, do_smem, k_smem, v_smem, tile_ready, k_ready, v_ready, k_free,
               v_free, *, scale, sm_scale, causal, window, segments, groups, kv_len,
               num_tiles, block_q, block_kv, stages, interpret):
  """dQ = sum over key blocks of dS K, dS = P (dP - delta), P = exp2(S - lse), dP = dO V^T:
  the forward's walk over key blocks, with K and V streamed the same way."""
  where = _query_tile(kv_len, k_ref.shape[1] // block_kv, causal=causal, window=window,
                      segments=segments, num_tiles=num_tiles, block_q=block_q,
                      block_kv=block_kv)
  batch, head, warpgroup, row0 = where.batch, where.head, where.warpgroup, where.row0

  @pl.when(warpgroup < _COMPUTE_WARPGROUPS)
  def _compute():
    plgpu.set_max_registers(_COMPUTE_REGISTERS, action='increase')
    rows = pl.ds(row0, block_q)
    q_tile, do_tile = q_smem.at[warpgroup], do_smem.at[warpgroup]
    _load_tiles([(q_ref.at[batch, rows, head], q_tile), (do_ref.at[batch, rows, head], do_tile)],
                tile_ready.at[warpgroup])
    lse = _load(lse_ref.at[batch, head, rows], _ROW, interpret)
    delta = _load(delta_ref.at[batch, head, rows], _ROW, interpret)
    q_segments = _load(q_segment_ref.at[batch, rows], _ROW, interpret) if segments else None

    def step(j, dq, masked):
      slot = lax.rem(j - where.first, jnp.int32(stages))
      plgpu.barrier_wait(k_ready.at[slot])
      plgpu.barrier_wait(v_ready.at[slot])
      # S and dP need only the tiles: both in flight at once, one wait.
      s, dp = _dots_t([(q_tile, k_smem.at[slot]), (do_tile, v_smem.at[slot])], interpret)
      plgpu.barrier_arrive(v_free.at[slot])
      s = s * scale
      if masked:
        s = _mask_key_block(s, where, j, block_kv, kv_segment_ref, q_segments, causal=causal,
                            window=window, kv_len=kv_len, interpret=interpret)
      p = jnp.exp2(s - lax.broadcast_in_dim(lse, s.shape, [0]))
      ds = p * (dp - lax.broadcast_in_dim(delta, dp.shape, [0]))
      [dq] = _accumulate_dots([(dq, ds.astype(k_ref.dtype), k_smem.at[slot])], interpret)
      plgpu.barrier_arrive(k_free.at[slot])
      return dq

    dq = _zeros((block_q, q_ref.shape[-1]), plgpu.Layout.WGMMA, interpret)
    for start, stop, masked in _key_runs(where):
      dq = lax.fori_loop(start, stop, functools.partial(step, masked=masked), dq)
    _store_tiles([(dq * sm_scale, q_tile, dq_ref.at[batch, rows, head])])

  @pl.when(warpgroup == _COMPUTE_WARPGROUPS)
  def _memory():
    # Step t streams key block first + t into slot t % stages, as the compute reads it.
    keys = lambda t: (batch, pl.ds((where.first + t) * block_kv, block_kv),
                      lax.div(head, groups))
    _stream([(lambda t: k_ref.at[keys(t)], k_smem, k_ready, k_free),
             (lambda t: v_ref.at[keys(t)], v_smem, v_ready, v_free)],
            where.num_steps - where.first, where.kv_blocks, stages)


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_segment_ref,
                kv_segment_ref, dk_ref, dv_ref, k_smem, v_smem, q_smem, do_smem, tile_ready,
                q_ready, do_ready, q_free, do_free, *, scale, sm_scale, causal, window,
                segments, groups, q_len, block_q, block_kv, stages, interpret):
  """Keys as rows: per query block of each query head that reads this kv head,
  S^T = K Q^T, P^T = exp2(S^T - lse), dV += P^T dO, dP^T = V dO^T,
  dS^T = P^T (dP^T - delta), dK += dS^T Q; Q and dO streamed, no atomics."""
  batch, kv_head = lax.axis_index('batch'), lax.axis_index('heads')
  tile, warpgroup = lax.axis_index('tiles'), lax.axis_index('warpgroup')
  tile_keys = _COMPUTE_WARPGROUPS * block_kv
  q_blocks = q_ref.shape[1] // block_q
  # Query blocks [first, diagonal_end) cross the diagonal (masked), [diagonal_end, full)
  # see every key of the tile (no mask), [full, stop) hold padding queries or, with a
  # window, queries whose window ends inside the tile (masked). Before `first`, a causal
  # block sees none of the tile; from `stop` on, none has it in its window. Segment ids:
  # all masked.
  first, diagonal_end, full, stop = 0, 0, q_len // block_q, q_blocks
  if causal:
    first = lax.div(tile * tile_keys, block_q)
    diagonal_end = (tile + 1) * tile_keys // block_q
  if window is not None:
    stop = jnp.minimum(lax.div((tile + 1) * tile_keys + window - 1 + block_q - 1, block_q),
                       q_blocks)
    full = jnp.minimum(full, lax.div(tile * tile_keys + window, block_q))
  if segments:
    diagonal_end = full = first
  elif causal:
    full = jnp.clip(full, first, stop)
    diagonal_end = jnp.clip(diagonal_end, first, full)
  per_head = stop - first
  query_head = lambda g: kv_head * groups + g

  @pl.when(warpgroup < _COMPUTE_WARPGROUPS)
  def _compute():
    plgpu.set_max_registers(_COMPUTE_REGISTERS, action='increase')
    key0 = tile * tile_keys + warpgroup * block_kv
    keys = pl.ds(key0, block_kv)
    k_tile, v_tile = k_smem.at[warpgroup], v_smem.at[warpgroup]
    _load_tiles([(k_ref.at[batch, keys, kv_head], k_tile),
                 (v_ref.at[batch, keys, kv_head], v_tile)], tile_ready.at[warpgroup])
    kv_segments = _load(kv_segment_ref.at[batch, keys], _ROW, interpret) if segments else None

    def step(i, carry, group, masked):
      dk, dv = carry
      slot = lax.rem(group * per_head + i - first, jnp.int32(stages))
      queries = pl.ds(i * block_q, block_q)
      lse = _load(lse_ref.at[batch, query_head(group), queries], _COLUMN, interpret)
      delta = _load(delta_ref.at[batch, query_head(group), queries], _COLUMN, interpret)
      plgpu.barrier_wait(q_ready.at[slot])
      plgpu.barrier_wait(do_ready.at[slot])
      # Two wgmma waits a step: S^T with dP^T (they need only the tiles), then dV with dK.
      st, dpt = _dots_t([(k_tile, q_smem.at[slot]), (v_tile, do_smem.at[slot])], interpret)
      st = st * scale  # [keys, queries]
      if masked:
        st = _mask(st, key0 + _iota(st.shape, 0, interpret),
                   i * block_q + _iota(st.shape, 1, interpret),
                   visible=_visibility(causal, window, keys_as_rows=True), col_limit=q_len,
                   row_ids=kv_segments,
                   col_ids=_load(q_segment_ref.at[batch, queries], _COLUMN, interpret)
                   if segments else None)
      pt = jnp.exp2(st - lax.broadcast_in_dim(lse, st.shape, [1]))
      dst = pt * (dpt - lax.broadcast_in_dim(delta, dpt.shape, [1]))
      dv, dk = _accumulate_dots([(dv, pt.astype(do_ref.dtype), do_smem.at[slot]),
                                 (dk, dst.astype(q_ref.dtype), q_smem.at[slot])], interpret)
      plgpu.barrier_arrive(do_free.at[slot])
      plgpu.barrier_arrive(q_free.at[slot])
      return dk, dv

    head_dim = k_ref.shape[-1]
    carry = (_zeros((block_kv, head_dim), plgpu.Layout.WGMMA, interpret),) * 2
    for group in range(groups):  # The query heads that read this kv head, in turn.
      for start, end, masked in ((first, diagonal_end, True), (diagonal_end, full, False),
                                 (full, stop, True)):
        carry = lax.fori_loop(start, end, functools.partial(step, group=group, masked=masked),
                              carry)
    dk, dv = carry
    _store_tiles([(dk * sm_scale, k_tile, dk_ref.at[batch, keys, kv_head]),
                  (dv, v_tile, dv_ref.at[batch, keys, kv_head])])

  @pl.when(warpgroup == _COMPUTE_WARPGROUPS)
  def _memory():
    def queries(t):
      t, n = jnp.asarray(t, jnp.int32), jnp.asarray(per_head, jnp.int32)
      group, i = lax.div(t, n), first + lax.rem(t, n)
      return batch, pl.ds(i * block_q, block_q), query_head(group)
    _stream([(lambda t: q_ref.at[queries(t)], q_smem, q_ready, q_free),
             (lambda t: do_ref.at[queries(t)], do_smem, do_ready, do_free)],
            groups * per_head, groups * q_blocks, stages)


def _check_smem(block_sizes, buffers_rows, head_dim, dtype, kernel):
  smem_bytes = buffers_rows * head_dim * jnp.dtype(dtype).itemsize
  if smem_bytes > _SMEM_BYTES:
    raise ValueError(f'{block_sizes} at head_dim={head_dim}: the {kernel} kernel needs '
                     f'{smem_bytes} bytes of shared memory; a Hopper CTA has {_SMEM_BYTES}')


def _segment_operands(q_segment_ids, kv_segment_ids, batch, q_len, kv_len, q_pad, kv_pad):
  """Padded int32 segment ids (zeros when none: the kernels never read them then).
  Padding rows are sliced off and padding keys masked by index, so any id will do."""
  if q_segment_ids is None:
    q_segment_ids = jnp.zeros((batch, q_len), jnp.int32)
    kv_segment_ids = jnp.zeros((batch, kv_len), jnp.int32)
  return (pad_axis(q_segment_ids.astype(jnp.int32), q_pad, 1),
          pad_axis(kv_segment_ids.astype(jnp.int32), kv_pad, 1))


def _call(kernel, out_type, scratch_types, grid, interpret):
  """`grid` is (heads, batch, tiles): tiles vary slowest in launch order, so the tiles
  with the most causal work start first across all heads, not head by head (21% off
  forward+backward at S=2048 B=8 on the H100, 1% at S=8192 B=2)."""
  # The kernel's name in profiles (a partial has none: 'anonymous_mosaic_gpu_kernel').
  kernel.__name__ = 'flash_attention' + kernel.func.__name__.removesuffix('_kernel')
  return plgpu.kernel(
      kernel, out_type=out_type, scratch_types=scratch_types, grid=grid,
      grid_names=('heads', 'batch', 'tiles'), num_threads=_COMPUTE_WARPGROUPS + 1,
      thread_name='warpgroup', compiler_params=plgpu.CompilerParams(approx_math=True),
      interpret=compat.InterpretGPUParams() if interpret else None)


def _ring_barriers(stages):
  """ready (the TMA's arrival) and free (both compute warpgroups') barriers of a ring."""
  return (plgpu.Barrier(num_barriers=stages),
          plgpu.Barrier(num_arrivals=_COMPUTE_WARPGROUPS, num_barriers=stages))


def forward(q, k, v, q_segment_ids, kv_segment_ids, *, causal: bool, sm_scale: float,
            block_sizes: BlockSizes, interpret: bool, window: int | None = None):
  """Returns out [B, T, N, H] and lse [B, N, T_padded] (float32, base 2)."""
  batch, q_len, num_heads, head_dim = q.shape
  kv_len, num_kv_heads = k.shape[1], k.shape[2]
  block_kv, stages = block_sizes.block_kv, block_sizes.stages
  _check_smem(block_sizes, _TILE + 2 * stages * block_kv, head_dim, q.dtype, 'forward')
  q_pad = pl.cdiv(q_len, _TILE) * _TILE
  kv_pad = pl.cdiv(kv_len, block_kv) * block_kv
  segments = q_segment_ids is not None
  ids = _segment_operands(q_segment_ids, kv_segment_ids, batch, q_len, kv_len, q_pad, kv_pad)
  kernel = functools.partial(
      _forward_kernel, scale=sm_scale * LOG2_E, causal=causal, window=window,
      segments=segments, groups=num_heads // num_kv_heads, kv_len=kv_len,
      num_tiles=q_pad // _TILE, block_q=_ROWS, block_kv=block_kv, stages=stages,
      pingpong=block_sizes.pingpong, interpret=interpret)
  k_ready, k_free = _ring_barriers(stages)
  v_ready, v_free = _ring_barriers(stages)
  out, lse = _call(
      kernel,
      (jax.ShapeDtypeStruct((batch, q_pad, num_heads, head_dim), q.dtype),
       jax.ShapeDtypeStruct((batch, num_heads, q_pad), jnp.float32)),
      (_smem_tile((_COMPUTE_WARPGROUPS, _ROWS, head_dim), q.dtype),  # Q, then O.
       _smem_tile((stages, block_kv, head_dim), q.dtype),
       _smem_tile((stages, block_kv, head_dim), q.dtype),
       plgpu.SMEM((_COMPUTE_WARPGROUPS, _ROWS), jnp.float32),
       plgpu.Barrier(num_barriers=_COMPUTE_WARPGROUPS),
       k_ready, v_ready, k_free, v_free,
       plgpu.Barrier(num_arrivals=_COMPUTE_WARPGROUPS)),  # The ping-pong's meeting point.
      (num_heads, batch, q_pad // _TILE), interpret,
  )(pad_axis(q, q_pad, 1), pad_axis(k, kv_pad, 1), pad_axis(v, kv_pad, 1), *ids)
  return out[:, :q_len], lse


def backward(q, k, v, q_segment_ids, kv_segment_ids, out, lse, d_out, *, causal: bool,
             sm_scale: float, block_sizes: BlockSizes, interpret: bool,
             window: int | None = None):
  """Gradients (dq, dk, dv) of the forward's inputs, from its O and lse: a dq kernel over
  query tiles and a dk/dv kernel over key tiles, so neither needs atomics."""
  batch, q_len, num_heads, head_dim = q.shape
  kv_len, num_kv_heads = k.shape[1], k.shape[2]
  groups = num_heads // num_kv_heads
  block_kv, stages = block_sizes.block_kv_dq, block_sizes.stages
  _check_smem(block_sizes, 2 * _TILE + 2 * stages * block_kv, head_dim, q.dtype, 'dq')
  _check_smem(block_sizes, 2 * _TILE + 2 * stages * _ROWS, head_dim, q.dtype, 'dk/dv')
  q_pad = pl.cdiv(q_len, _TILE) * _TILE
  kv_pad = pl.cdiv(kv_len, _TILE) * _TILE  # block_kv_dq divides _TILE.
  segments = q_segment_ids is not None
  ids = _segment_operands(q_segment_ids, kv_segment_ids, batch, q_len, kv_len, q_pad, kv_pad)
  # delta_i = sum_h dO_ih O_ih: the row term of the softmax gradient.
  delta = jnp.einsum('btnh,btnh->bnt', d_out.astype(jnp.float32), out.astype(jnp.float32))
  operands = (pad_axis(q, q_pad, 1), pad_axis(k, kv_pad, 1), pad_axis(v, kv_pad, 1),
              pad_axis(d_out, q_pad, 1), pad_axis(lse[..., :q_len], q_pad, 2),
              pad_axis(delta, q_pad, 2), *ids)
  options = dict(scale=sm_scale * LOG2_E, sm_scale=sm_scale, causal=causal, window=window,
                 segments=segments, groups=groups, stages=stages, interpret=interpret)
  tiles = lambda x: _smem_tile((_COMPUTE_WARPGROUPS, _ROWS, head_dim), x.dtype)
  ring = lambda rows, dtype: _smem_tile((stages, rows, head_dim), dtype)
  a_ready, a_free = _ring_barriers(stages)
  b_ready, b_free = _ring_barriers(stages)

  dq = _call(
      functools.partial(_dq_kernel, kv_len=kv_len, num_tiles=q_pad // _TILE, block_q=_ROWS,
                        block_kv=block_kv, **options),
      jax.ShapeDtypeStruct(operands[0].shape, q.dtype),
      (tiles(q), tiles(d_out), ring(block_kv, k.dtype), ring(block_kv, v.dtype),
       plgpu.Barrier(num_barriers=_COMPUTE_WARPGROUPS), a_ready, b_ready, a_free, b_free),
      (num_heads, batch, q_pad // _TILE), interpret,
  )(*operands)
  dk, dv = _call(
      functools.partial(_dkv_kernel, q_len=q_len, block_q=_ROWS, block_kv=_ROWS, **options),
      (jax.ShapeDtypeStruct(operands[1].shape, k.dtype),
       jax.ShapeDtypeStruct(operands[2].shape, v.dtype)),
      (tiles(k), tiles(v), ring(_ROWS, q.dtype), ring(_ROWS, d_out.dtype),
       plgpu.Barrier(num_barriers=_COMPUTE_WARPGROUPS), a_ready, b_ready, a_free, b_free),
      (num_kv_heads, batch, kv_pad // _TILE), interpret,
  )(*operands)
  return dq[:, :q_len], dk[:, :kv_len], dv[:, :kv_len]
