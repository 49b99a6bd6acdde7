"""Runs one entry point many times, each a real process, without importing JAX each time.

  python tests/fork_server.py experiments.sample

imports the module once, then for each JSON line {"argv": [...], "stdout": PATH,
"stderr": PATH, "timeout": SECONDS} on stdin forks a child that runs the entry point as
`python -m experiments.sample ARGV...` would (its exit code, its stdout and stderr in the
files, an uncaught exception printed as the interpreter prints it) and answers
{"returncode": N} (-14, SIGALRM, for a child that ran past its timeout). The server
never starts JAX's backend or a thread, so the fork is safe.
The property tests drive hundreds of bad inputs through it: one import instead of hundreds.
"""

import importlib
import json
import os
import signal
import sys
import threading
import traceback


def _child(module, argv: list[str], stdout: str, stderr: str, timeout: int) -> None:
  signal.alarm(timeout)
  for fd, path in ((1, stdout), (2, stderr)):
    file = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(file, fd)
    os.close(file)
  sys.argv = [module.__name__, *argv]
  code = 0
  try:
    from experiments import cli
    cli.run(module.main)
  except SystemExit as exit_:
    if isinstance(exit_.code, str):
      print(exit_.code, file=sys.stderr)
      code = 1
    else:
      code = exit_.code or 0
  except BaseException:  # noqa: BLE001 (what `python -m` would do: print it, exit 1)
    traceback.print_exc()
    code = 1
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code)


def main() -> None:
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  module = importlib.import_module(sys.argv[1])
  assert threading.active_count() == 1, 'importing started a thread: forking is unsafe'
  for line in sys.stdin:
    request = json.loads(line)
    pid = os.fork()
    if pid == 0:
      _child(module, request['argv'], request['stdout'], request['stderr'],
             request.get('timeout', 300))
    _, status = os.waitpid(pid, 0)
    print(json.dumps({'returncode': os.waitstatus_to_exitcode(status)}), flush=True)


if __name__ == '__main__':
  main()
