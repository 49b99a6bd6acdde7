"""Timing for the benchmarks: wall time per call, and device time from a profiler trace.

Wall time includes the host's dispatch of each call (0.15 to 0.35 ms for a jitted Pallas
call on the H100), which a kernel under a millisecond cannot hide; the device time is
what the kernels themselves take.
"""

import collections
import glob
import statistics
import tempfile
import time

import jax


def wall_seconds(function, *args, repeats: int) -> list[float]:
  """Wall time of each of `repeats` calls after one warm-up (compilation) call."""
  jax.block_until_ready(function(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(function(*args))
    times.append(time.perf_counter() - start)
  return times


def median_seconds(function, *args, repeats: int) -> float:
  return statistics.median(wall_seconds(function, *args, repeats=repeats))


def device_kernel_times(function, calls: int = 1) -> dict[str, list]:
  """Kernel name -> [launches, total microseconds] over `calls` traced calls of
  function(). Empty where the backend reports no device kernels (the CPU)."""
  with tempfile.TemporaryDirectory() as directory:
    with jax.profiler.trace(directory):
      for _ in range(calls):
        jax.block_until_ready(function())
    [path] = glob.glob(f'{directory}/**/*.xplane.pb', recursive=True)
    data = jax.profiler.ProfileData.from_file(path)
  totals = collections.defaultdict(lambda: [0, 0.0])
  for plane in data.planes:
    if not plane.name.startswith('/device:'):  # Host planes hold Python and runtime threads.
      continue
    for line in plane.lines:
      # GPU kernels sit on stream lines; TPU planes also have module and step lines,
      # which would count the same time twice.
      if line.name.startswith('Stream') or line.name == 'XLA Ops':
        for event in line.events:
          totals[event.name][0] += 1
          totals[event.name][1] += event.duration_ns / 1e3
  return totals


def device_seconds(function, *args, repeats: int) -> float | None:
  """Kernel time per call, summed over its kernels, from `repeats` traced calls after a
  warm-up call; None where the backend reports no device kernels."""
  if jax.default_backend() == 'cpu':  # Its traces hold no kernels: skip the extra calls.
    return None
  jax.block_until_ready(function(*args))
  kernels = device_kernel_times(lambda: function(*args), calls=repeats)
  if not kernels:
    return None
  return sum(microseconds for _, microseconds in kernels.values()) / repeats / 1e6
