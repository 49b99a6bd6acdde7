"""Several JAX processes on this machine, as on several hosts: an entry point started once
per process, connected over localhost (CPU collectives through gloo), each process with
its own fake CPU devices. The processes are forked by conftest's `commands`
(tests/fork_server.py), which imported the entry point once, side by side."""

import re
import socket
import subprocess
from typing import NamedTuple

from conftest import FAST_CPU_COMPILE


class Process(NamedTuple):
  returncode: int
  stdout: str
  stderr: str


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def start(commands, module: str, *flags: str, num_processes: int = 2,
          devices_per_process: int = 4, only: dict[int, list[str]] | None = None,
          timeout: int = 600) -> list:
  """Starts `python -m experiments.MODULE FLAGS` as process 0..num_processes-1 of one job,
  process i with the flags `only[i]` too; each is killed (SIGALRM) after `timeout` seconds.
  Returns the running processes (tests/fork_server.py's `Started`: pid, send_signal...)."""
  only = only or {}
  env = {'XLA_FLAGS': ' '.join([
      f'--xla_force_host_platform_device_count={devices_per_process}', FAST_CPU_COMPILE])}
  distributed = lambda i: []
  if num_processes > 1:
    port = free_port()
    distributed = lambda i: [f'--coordinator_address=127.0.0.1:{port}',
                             f'--num_processes={num_processes}', f'--process_id={i}']
  return [commands.start(f'experiments.{module}', *flags, *only.get(i, []), *distributed(i),
                         timeout=timeout, env=env)
          for i in range(num_processes)]


def wait(processes: list) -> list[Process]:
  """Each process's exit code and output (less gloo's connection lines), once it ends (a
  process that ran past its timeout reports -14, SIGALRM)."""
  results = []
  for process in processes:
    done: subprocess.CompletedProcess = process.wait()
    results.append(Process(done.returncode, without_gloo(done.stdout), done.stderr))
  return results


# gloo's C++ prints each connection to stdout in pieces, which its threads can interleave.
_GLOO = re.compile(r'\[Gloo\]|\bRank\b|is connected to|peer ranks\.?|'
                   r'Expected number of connected|is :|\b\d+\b')


def without_gloo(stdout: str) -> str:
  """stdout less the lines made only of gloo's pieces."""
  return ''.join(line for line in stdout.splitlines(keepends=True)
                 if not line.strip() or _GLOO.sub('', line).strip())


def launch(commands, module: str, *flags: str, num_processes: int = 2,
           devices_per_process: int = 4, only: dict[int, list[str]] | None = None,
           timeout: int = 600) -> list[Process]:
  """start, then wait."""
  return wait(start(commands, module, *flags, num_processes=num_processes,
                    devices_per_process=devices_per_process, only=only, timeout=timeout))
