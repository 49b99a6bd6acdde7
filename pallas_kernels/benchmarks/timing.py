"""Timing for the kernel benchmarks."""

import statistics
import time

import jax


def median_seconds(function, *args, repeats: int) -> float:
  """Median wall time of `repeats` calls after one warm-up (compilation) call."""
  jax.block_until_ready(function(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(function(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)
