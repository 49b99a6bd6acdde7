"""Runs one entry point many times, each a real process, without importing JAX each time.

  python tests/fork_server.py experiments.sample

imports the module (and so what it imports) once, then for each JSON line {"id": N,
"argv": [...], "stdout": PATH, "stderr": PATH, "timeout": SECONDS, "env": {...}} on stdin
forks a child that runs the entry point as `python -m experiments.sample ARGV...` would
(the module's code run again as __main__; its exit code, its stdout and stderr in the
files, an uncaught exception printed as the interpreter prints it), with `env` added to its
environment (variables read when JAX's backend starts, such as XLA_FLAGS: the server never
starts it). It answers {"id": N, "started": PID} at once, and {"id": N, "returncode": CODE}
when the child ends (-14, SIGALRM, for a child that ran past its timeout); children run
side by side, as the processes of one job do. The server starts no thread, so the fork is
safe; when its stdin closes, it kills the children still running.

The tests run hundreds of commands through it (`Commands`, below): one import per entry
point instead of one per command.
"""

import atexit
import importlib
import json
import os
import runpy
import select
import signal
import subprocess
import sys
import threading
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _import(module: str) -> list[str]:
  """Imports `module`; returns the names of the flags its own code defined (directly, or
  through a function it called), which running it again defines again."""
  from absl import flags  # pylint: disable=import-outside-toplevel
  defined, define = [], flags.FlagValues.__setitem__

  def record(flag_values, name, flag):
    frame = sys._getframe(1)  # pylint: disable=protected-access
    while frame and frame.f_code.co_name != '<module>':  # The module whose code runs this.
      frame = frame.f_back
    if frame and frame.f_globals.get('__name__') == module:
      defined.append(name)
    define(flag_values, name, flag)

  flags.FlagValues.__setitem__ = record
  try:
    importlib.import_module(module)
  finally:
    flags.FlagValues.__setitem__ = define
  return defined


def _child(module: str, own_flags: list[str], request: dict) -> None:
  signal.alarm(request.get('timeout', 300))
  os.environ.update(request.get('env', {}))
  for fd, path in ((1, request['stdout']), (2, request['stderr'])):
    file = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(file, fd)
    os.close(file)
  null = os.open(os.devnull, os.O_RDONLY)
  os.dup2(null, 0)
  os.close(null)
  code = 0
  try:
    # As `python -m` runs it: its code again, as __main__ (what it imports is imported
    # already), defining its flags anew (ml_collections' config flags read the command line
    # when they are defined).
    from absl import flags  # pylint: disable=import-outside-toplevel
    for name in own_flags:
      delattr(flags.FLAGS, name)
    del sys.modules[module]
    sys.argv = [module, *request['argv']]
    runpy.run_module(module, run_name='__main__', alter_sys=True)
  except SystemExit as exit_:
    if isinstance(exit_.code, str):
      print(exit_.code, file=sys.stderr)
      code = 1
    else:
      code = exit_.code or 0
  except BaseException:  # noqa: BLE001 (what `python -m` would do: print it, exit 1)
    traceback.print_exc()
    code = 1
  # As the interpreter ends: wait for the threads it started, then run its exit handlers
  # (jax.distributed's shutdown among them: a process that skipped it would leave its peer
  # in a collective, its connection reset).
  try:
    threading._shutdown()  # pylint: disable=protected-access
    atexit._run_exitfuncs()  # pylint: disable=protected-access
  except BaseException:  # noqa: BLE001
    traceback.print_exc()
    code = code or 1
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code)


def _answer(message: dict) -> None:
  os.write(1, (json.dumps(message) + '\n').encode())


def main() -> None:
  sys.path.insert(0, ROOT)
  module = sys.argv[1]
  own_flags = _import(module)
  assert threading.active_count() == 1, 'importing started a thread: forking is unsafe'
  children, pending, open_ = {}, b'', True  # children: {pid: request id}
  while open_ or children:
    readable, _, _ = select.select([0] if open_ else [], [], [], 0.05 if children else None)
    if readable:
      chunk = os.read(0, 1 << 16)
      open_ = bool(chunk)
      pending += chunk
      *lines, pending = pending.split(b'\n')
      for line in lines:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
          _child(module, own_flags, request)
        children[pid] = request['id']
        _answer({'id': request['id'], 'started': pid})
      if not open_:  # The tests are over: nobody waits for the children still running.
        for pid in children:
          os.kill(pid, signal.SIGKILL)
    while children:
      pid, status = os.waitpid(-1, os.WNOHANG)
      if not pid:
        break
      _answer({'id': children.pop(pid), 'returncode': os.waitstatus_to_exitcode(status)})


class Commands:
  """commands(MODULE, *argv) runs `python -m MODULE ARGV...` as a process forked from a
  server that imported MODULE once (started at its first command), in `env`; returns a
  subprocess.CompletedProcess with its exit code and text output. commands.start(...)
  returns the running process (a `Started`) instead."""

  def __init__(self, scratch: str, env: dict[str, str]):
    self.scratch, self.env, self.calls, self.servers = scratch, env, 0, {}

  def __call__(self, module: str, *argv: str, timeout: int = 300, env=None):
    return self.start(module, *argv, timeout=timeout, env=env).wait()

  def start(self, module: str, *argv: str, timeout: int = 300, env=None) -> 'Started':
    """The process of `python -m MODULE ARGV...`, started, with `env` (variables read when
    JAX's backend starts, such as XLA_FLAGS) added to its environment; it is killed
    (SIGALRM) after `timeout` seconds."""
    if module not in self.servers:
      self.servers[module] = _Server(module, self.env)
    self.calls += 1
    out, err = (os.path.join(self.scratch, f'{self.calls}.{name}') for name in ('out', 'err'))
    return self.servers[module].start(
        {'id': self.calls, 'argv': [str(arg) for arg in argv], 'stdout': out, 'stderr': err,
         'timeout': timeout, 'env': env or {}})

  def close(self):
    for server in self.servers.values():
      server.close()


class _Server:
  """A fork server of one module, and what it answered so far."""

  def __init__(self, module: str, env: dict[str, str]):
    self.module, self.returncodes, self.pending = module, {}, b''
    self.process = subprocess.Popen([sys.executable, os.path.abspath(__file__), module],
                                    cwd=ROOT, env=env, stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE)
    self.answers = self.process.stdout.fileno()

  def start(self, request: dict) -> 'Started':
    self.process.stdin.write((json.dumps(request) + '\n').encode())
    self.process.stdin.flush()
    while True:
      message = self._read(timeout=None)
      if message.get('id') == request['id'] and 'started' in message:
        return Started(self, message['started'], request)

  def _read(self, timeout: float | None) -> dict | None:
    """The server's next message (a child's end is recorded), or None if none came within
    `timeout` seconds."""
    while b'\n' not in self.pending:
      if not select.select([self.answers], [], [], timeout)[0]:
        return None
      chunk = os.read(self.answers, 1 << 16)
      assert chunk, f'the fork server of {self.module} stopped'
      self.pending += chunk
    line, self.pending = self.pending.split(b'\n', 1)
    message = json.loads(line)
    if 'returncode' in message:
      self.returncodes[message['id']] = message['returncode']
    return message

  def returncode(self, request_id: int, timeout: float | None = 0) -> int | None:
    """The exit code of request `request_id`'s child, or None if it did not end within
    `timeout` seconds."""
    while request_id not in self.returncodes:
      if self._read(timeout) is None:
        return None
    return self.returncodes[request_id]

  def close(self):
    self.process.stdin.close()
    self.process.wait(timeout=60)


class Started:
  """A command's process, running: its pid, poll(), send_signal(), wait()."""

  def __init__(self, server: _Server, pid: int, request: dict):
    self.server, self.pid, self.request = server, pid, request

  def poll(self) -> int | None:
    return self.server.returncode(self.request['id'])

  def send_signal(self, sig: int) -> None:
    if self.poll() is None:
      os.kill(self.pid, sig)

  def kill(self) -> None:
    self.send_signal(signal.SIGKILL)

  def output(self) -> tuple[str, str]:
    """What it printed so far: (stdout, stderr)."""
    texts = []
    for path in (self.request['stdout'], self.request['stderr']):
      with open(path, errors='replace') as f:
        texts.append(f.read())
    return tuple(texts)

  def wait(self, timeout: float | None = None) -> subprocess.CompletedProcess:
    """Its exit code and output, once it ends (subprocess.TimeoutExpired after `timeout`
    seconds, the process left running)."""
    deadline = None if timeout is None else time.time() + timeout
    while self.server.returncode(
        self.request['id'], None if deadline is None else max(0, deadline - time.time())) is None:
      if time.time() >= deadline:
        raise subprocess.TimeoutExpired(self.request['argv'], timeout)
    stdout, stderr = self.output()
    for path in (self.request['stdout'], self.request['stderr']):
      os.remove(path)
    return subprocess.CompletedProcess([self.server.module, *self.request['argv']],
                                       self.poll(), stdout, stderr)


if __name__ == '__main__':
  main()
