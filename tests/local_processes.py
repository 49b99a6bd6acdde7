"""Several JAX processes on this machine, as on several hosts: an entry point started once
per process, connected over localhost (CPU collectives through gloo), each process with
its own fake CPU devices."""

import os
import re
import socket
import subprocess
import sys
from typing import NamedTuple

from conftest import FAST_CPU_COMPILE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Process(NamedTuple):
  returncode: int
  stdout: str
  stderr: str


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def start(module: str, *flags: str, num_processes: int = 2, devices_per_process: int = 4,
          only: dict[int, list[str]] | None = None) -> list[subprocess.Popen]:
  """Starts `python -m experiments.MODULE FLAGS` as process 0..num_processes-1 of one job,
  process i with the flags `only[i]` too."""
  only = only or {}
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': ' '.join([
      f'--xla_force_host_platform_device_count={devices_per_process}', FAST_CPU_COMPILE])}
  distributed = lambda i: []
  if num_processes > 1:
    port = free_port()
    distributed = lambda i: [f'--coordinator_address=127.0.0.1:{port}',
                             f'--num_processes={num_processes}', f'--process_id={i}']
  return [subprocess.Popen(
      [sys.executable, '-m', f'experiments.{module}', *flags, *only.get(i, []),
       *distributed(i)], cwd=ROOT,
      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for i in range(num_processes)]


def wait(processes: list[subprocess.Popen], timeout: int = 600) -> list[Process]:
  """Each process's exit code and output (less gloo's connection lines); a job still
  running after `timeout` seconds is killed (its processes report -9)."""
  results = []
  for process in processes:
    try:
      stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
      for other in processes:
        other.kill()
      stdout, stderr = process.communicate()
    results.append(Process(process.returncode, without_gloo(stdout), stderr))
  return results


# gloo's C++ prints each connection to stdout in pieces, which its threads can interleave.
_GLOO = re.compile(r'\[Gloo\]|\bRank\b|is connected to|peer ranks\.?|'
                   r'Expected number of connected|is :|\b\d+\b')


def without_gloo(stdout: str) -> str:
  """stdout less the lines made only of gloo's pieces."""
  return ''.join(line for line in stdout.splitlines(keepends=True)
                 if not line.strip() or _GLOO.sub('', line).strip())


def launch(module: str, *flags: str, num_processes: int = 2, devices_per_process: int = 4,
           only: dict[int, list[str]] | None = None, timeout: int = 600) -> list[Process]:
  """start, then wait."""
  return wait(start(module, *flags, num_processes=num_processes,
                    devices_per_process=devices_per_process, only=only), timeout)
