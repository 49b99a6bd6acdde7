"""The engine's thread: the generation engine (lm.engine.engine.Engine) is not
thread-safe, so one thread owns it and everything else talks to it through a queue.

The HTTP handlers run on an asyncio loop. A handler `submit`s a prompt; the thread takes
the request from the queue, adds it to the engine, calls `engine.step()` while there is
work (and blocks on the queue when there is none), and hands each `Output` to the
request's own asyncio.Queue through `loop.call_soon_threadsafe`. `generate` wraps that
as an async iterator which cancels its request (the engine frees its pages) when the
consumer stops early: a client that disconnected, a stop the handler found.

A request the engine refuses (`add` raises ValueError) ends with Failure(400); any other
exception of the engine fails the requests it touched with Failure(500), is logged with
its traceback, and the thread goes on serving.
"""

import asyncio
import concurrent.futures
import dataclasses
import logging
import queue
import threading

_LOG = logging.getLogger(__name__)


class Failure(Exception):
  """What ended a request instead of its outputs: `status` 400 (the engine refused the
  request) or 500 (the engine failed), and a one-line message."""

  def __init__(self, status: int, message: str):
    super().__init__(message)
    self.status, self.message = status, message


@dataclasses.dataclass(eq=False)
class Request:
  prompt_ids: list[int]
  params: object  # lm.engine.engine.SamplingParams
  loop: asyncio.AbstractEventLoop
  outputs: asyncio.Queue  # Output objects, the last one finished; or one Failure.
  engine_id: int | None = None  # Set by the engine's thread once added.


def _one_line(error: BaseException) -> str:
  text = ' '.join(str(error).split())
  return f'{type(error).__name__}: {text}' if text else type(error).__name__


class Runner:
  """Owns `engine` on a thread of its own (`start`, `close`); see the module docstring."""

  def __init__(self, engine):
    self.engine = engine
    self._commands = queue.SimpleQueue()
    self._active: dict[int, Request] = {}  # engine id -> request, until it finishes.
    self._thread = threading.Thread(target=self._serve, name='lm-engine', daemon=True)

  def start(self) -> 'Runner':
    self._thread.start()
    return self

  def close(self, timeout: float = 30.0) -> None:
    """Fails what is in flight with 503 and ends the thread."""
    if self._thread.is_alive():
      self._commands.put(('close',))
      self._thread.join(timeout)

  # The event loop's side.

  def submit(self, prompt_ids: list[int], params) -> Request:
    """Queues a request; call from the event loop that will read its outputs."""
    request = Request(list(prompt_ids), params, asyncio.get_running_loop(), asyncio.Queue())
    self._commands.put(('add', request))
    return request

  def cancel(self, request: Request) -> None:
    self._commands.put(('cancel', request))

  def call(self, function) -> concurrent.futures.Future:
    """function(engine) run on the engine's thread between steps (the engine is not
    thread-safe); its result or exception in the future."""
    future = concurrent.futures.Future()
    self._commands.put(('call', function, future))
    return future

  async def generate(self, prompt_ids: list[int], params):
    """The request's Outputs as they come, the last one finished; raises Failure. Leaving
    early (break, an exception, the task cancelled) cancels the request."""
    request = self.submit(prompt_ids, params)
    finished = False
    try:
      while not finished:
        item = await request.outputs.get()
        if isinstance(item, Failure):
          finished = True  # Nothing left in the engine to cancel.
          raise item
        finished = item.finished
        yield item
    finally:
      if not finished:
        self.cancel(request)

  # The engine's thread.

  def _serve(self) -> None:
    while True:
      busy = bool(self._active) and self._engine_call(self.engine.has_work, False)
      commands = [] if busy else [self._commands.get()]  # Idle: wait for a command.
      while True:
        try:
          commands.append(self._commands.get_nowait())
        except queue.Empty:
          break
      for command in commands:
        if command[0] == 'close':
          for request in self._active.values():
            self._deliver(request, Failure(503, 'the server is shutting down'))
          return
        self._run_command(command)
      if self._active and self._engine_call(self.engine.has_work, False):
        self._step()

  def _engine_call(self, function, failed_value):
    try:
      return function()
    except Exception as error:  # pylint: disable=broad-except
      _LOG.exception('the engine failed in %s', getattr(function, '__name__', function))
      self._fail_all(error)
      return failed_value

  def _run_command(self, command) -> None:
    kind = command[0]
    if kind == 'add':
      request = command[1]
      try:
        request.engine_id = self.engine.add(request.prompt_ids, request.params)
      except ValueError as error:  # The engine's refusal: a one-line message.
        self._deliver(request, Failure(400, ' '.join(str(error).split())))
        return
      except Exception as error:  # pylint: disable=broad-except
        _LOG.exception('the engine failed to add a request')
        self._deliver(request, Failure(500, f'the engine failed: {_one_line(error)}'))
        return
      self._active[request.engine_id] = request
    elif kind == 'cancel':
      request = command[1]
      if self._active.get(request.engine_id) is request:
        del self._active[request.engine_id]
        try:
          self.engine.cancel(request.engine_id)
        except Exception:  # pylint: disable=broad-except
          _LOG.exception('the engine failed to cancel request %s', request.engine_id)
    elif kind == 'call':
      _, function, future = command
      try:
        future.set_result(function(self.engine))
      except Exception as error:  # pylint: disable=broad-except
        future.set_exception(error)

  def _step(self) -> None:
    try:
      outputs = self.engine.step()
    except Exception as error:  # pylint: disable=broad-except
      _LOG.exception('the engine failed in step()')
      self._fail_all(error)
      return
    for output in outputs:
      request = self._active.get(output.request_id)
      if request is None:  # Cancelled while this step ran.
        continue
      if output.finished:
        del self._active[output.request_id]
      self._deliver(request, output)

  def _fail_all(self, error: Exception) -> None:
    """Every request in flight ends with a 500; their pages are given back if the engine
    still can."""
    failure = Failure(500, f'the engine failed: {_one_line(error)}')
    for engine_id, request in list(self._active.items()):
      self._deliver(request, failure)
      try:
        self.engine.cancel(engine_id)
      except Exception:  # pylint: disable=broad-except
        pass
    self._active.clear()

  def _deliver(self, request: Request, item) -> None:
    try:
      request.loop.call_soon_threadsafe(request.outputs.put_nowait, item)
    except RuntimeError:  # Its loop is closed: nobody is reading.
      if request.engine_id in self._active and not isinstance(item, Failure):
        self._run_command(('cancel', request))
