"""Several processes, one per host: JAX's multi-controller runtime.

Every process runs the same program on its own devices; `jax.distributed.initialize`
connects them, after which `jax.devices()` lists every process's devices and arrays are
global. `initialize` here calls it when this process is one of several:
- from explicit settings (coordinator address, number of processes, this process's id),
  for hosts started by hand;
- else, when the environment is a cluster of several tasks that JAX detects by itself
  (Cloud TPU pod slices, SLURM, Open MPI), with no arguments;
- else (one process on one host) not at all.

A process that stops (killed, crashed) or stalls stops the others: a peer that misses its
heartbeats for `peer_timeout` seconds (--peer_timeout, default 30) is taken for gone, and
every process left prints one line and exits with code 1 (`lost_peer`), where JAX's own
reaction is an abort with a C++ dump, after 100 s. A collective that fails at once (the
peer's connection reset) ends the same way.
"""

import ctypes
import inspect
import os
import signal
import sys

import jax
from jax.experimental import multihost_utils
import numpy as np

from lm.errors import ConfigError


def _cluster_of_several() -> str | None:
  """The name of the multi-process cluster this process is a task of, if any."""
  if int(os.environ.get('SLURM_NTASKS', '1')) > 1 and 'SLURM_JOB_ID' in os.environ:
    return 'SLURM'
  if int(os.environ.get('OMPI_COMM_WORLD_SIZE', '1')) > 1:
    return 'Open MPI'
  # Cloud TPU VMs list every worker of the slice; one host lists one.
  if len([h for h in os.environ.get('TPU_WORKER_HOSTNAMES', '').split(',') if h]) > 1:
    return 'Cloud TPU'
  return None


PEER_TIMEOUT = 30  # Seconds without a heartbeat before a process is taken for gone.


def lost_peer(detail: str = '') -> None:
  """One line, and exit code 1 at once: no exit handler runs (JAX's would wait for the
  lost process, then abort)."""
  reason = (detail.strip().splitlines() or [''])[0][:160]
  stop(f'error: process {jax.process_index()}: another process stopped or cannot be reached;'
       ' its own output says why' + (f' ({reason})' if reason else ''))


def stop(line: str) -> None:
  """Ends this process with `line` on stderr and exit code 1, now: with several processes
  no exit handler runs, as JAX's shutdown would wait on the others (some gone), then abort.
  Written with os.write: it may run in a signal handler, on a thread of JAX's."""
  sys.stdout.flush()
  os.write(2, (line + '\n').encode('utf-8', 'replace'))
  os._exit(1)  # pylint: disable=protected-access


def _exit_cleanly_on_abort() -> None:
  """JAX's distributed runtime aborts the process (SIGABRT, a C++ dump) when its service
  reports a lost peer, from a thread of its own; this handler ends it with `lost_peer`'s
  line and exit code 1 instead."""
  handler_type = ctypes.CFUNCTYPE(None, ctypes.c_int)
  handler = handler_type(lambda signum: lost_peer(
      'JAX\'s distributed runtime stopped this one: a peer missed its heartbeats, or the'
      ' coordinator is gone'))
  libc = ctypes.CDLL(None, use_errno=True)
  libc.signal.argtypes, libc.signal.restype = [ctypes.c_int, handler_type], ctypes.c_void_p
  libc.signal(signal.SIGABRT, handler)
  _KEPT.append(handler)  # Alive as long as the process.


_KEPT = []


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, peer_timeout: int = PEER_TIMEOUT) -> None:
  """Connects this process to the others; must run before anything touches a device."""
  explicit = (coordinator_address, num_processes, process_id)
  if any(value is not None for value in explicit):
    names = ('--coordinator_address', '--num_processes', '--process_id')
    missing = [name for name, value in zip(names, explicit) if value is None]
    if missing:
      raise ConfigError(f'{", ".join(missing)}: give all three of {", ".join(names)} (or none,'
                        ' to run alone or on a cluster JAX detects)')
    if num_processes < 1 or not 0 <= process_id < num_processes:
      raise ConfigError(f'--process_id={process_id} must be in [0, --num_processes='
                        f'{num_processes})')
    if num_processes == 1:
      return
  elif _cluster_of_several() is None:
    return
  # Collectives between CPU devices of different processes (used by the tests here, and
  # by CPU-only runs) go through gloo; accelerators use their own.
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  if peer_timeout < 1:
    raise ConfigError(f'--peer_timeout={peer_timeout} must be at least 1 (seconds)')
  timeout = ({'heartbeat_timeout_seconds': peer_timeout} if 'heartbeat_timeout_seconds'
             in inspect.signature(jax.distributed.initialize).parameters else {})
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id, **timeout)
  _exit_cleanly_on_abort()
  _JOINED.append(True)


_JOINED = []


def joined() -> bool:
  """Whether this process joined others (`initialize`), without touching a device."""
  return bool(_JOINED)


def lost_another_process(error: Exception) -> bool:
  """Whether `error` is a collective that timed out waiting for a process that stopped
  (it reported its own error) or cannot be reached."""
  return jax.process_count() > 1 and any(
      any(sign in str(link) for sign in ('CoordinationService', 'DEADLINE_EXCEEDED', 'Gloo'))
      for link in _chain(error))


def _chain(error: BaseException) -> list[BaseException]:
  """`error` and those it was raised during or from: a lost peer's collective error may
  surface as a later one (a checkpoint's finishing barrier timing out in a `finally`)."""
  links = []
  while error is not None and error not in links:
    links.append(error)
    error = error.__cause__ or error.__context__
  return links


def all_gather(values: np.ndarray) -> np.ndarray:
  """This process's `values` -> [number of processes, ...] of every process's, on each."""
  if jax.process_count() == 1:
    return np.asarray(values)[None]
  return np.asarray(multihost_utils.process_allgather(np.asarray(values)))


def all_ok(ok: bool) -> bool:
  """Whether `ok` holds on every process: they take the same branch after it."""
  return bool(all_gather(np.array([ok], np.int32)).all())


def barrier(name: str) -> None:
  """Waits for every process to reach `name`."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)
