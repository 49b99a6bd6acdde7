"""Latency through the OpenAI-compatible server (lm/serving): time to first token (TTFT),
inter-token latency (ITL) and generated tokens/s at several numbers of concurrent
clients, as a table.

  python -m experiments.benchmark_serve [--clients=1,8,32 --requests_per_client=8]
      [--max_tokens=128 --prompt_tokens=64 --slots=32 --chunk=64]
      [--config.model.num_layers=12 --config.model.embed_dim=768 ...]

The server runs in a subprocess (this module with --serve_only: its own interpreter, so
the clients' Python does not share its GIL) on a free port of 127.0.0.1, over the
config's model freshly initialised (random weights: speed does not depend on them) with
the byte tokenizer, the engine of lm/engine with --slots slots and a context of
--prompt_tokens + --max_tokens. It compiles the engine's programs before it reports
ready, and is stopped at the end, however the benchmark ends.

Each client is the official `openai` client (AsyncOpenAI, its own connection pool)
issuing --requests_per_client streaming requests to /v1/completions one after another:
a prompt of --prompt_tokens random printable-byte token ids (each request its own, so
no prefix is found cached), temperature 0 (greedy), no stop string, max_tokens fixed
(default 128; only the tokenizer's end of text could end one sooner, and the table says
if one did). Per request:
- TTFT: from just before the request is sent to the first chunk with text;
- ITL: the mean gap between the chunks with text after that one. A chunk is a token
  (greedy random weights repeat a printable byte), but the first: the engine's step that
  ends a prompt's prefill also decodes its first token, so the first chunk brings two
  (TTFT is to the first two tokens) and max_tokens - 1 chunks come in all; the table
  says if a request streamed fewer (bytes of one character, ids with no text);
and, per concurrency, tokens/s: completion tokens (the usage chunk's) of every request
over the wall time from the first request sent to the last one done. Before timing,
one full-length request per client of the largest concurrency warms every shape the
engine compiles (page tables widen with a request's length) and the HTTP path.
"""

import asyncio
import json
import logging
import os
import select
import socket
import subprocess
import sys
import threading
import time

from absl import app, flags
from ml_collections import config_flags
import numpy as np

_CONFIG = config_flags.DEFINE_config_file(
    'config', 'experiments/configs/default.py', 'Config whose model to serve; override '
    'fields as --config.model.FIELD=VALUE for a larger model.')
_CLIENTS = flags.DEFINE_list('clients', ['1', '8', '32'], 'Concurrent clients, each a row.')
_REQUESTS = flags.DEFINE_integer('requests_per_client', 8,
                                 'Requests each client sends, one after another.')
_MAX_TOKENS = flags.DEFINE_integer('max_tokens', 128, 'Tokens each request generates.')
_PROMPT_TOKENS = flags.DEFINE_integer('prompt_tokens', 64, 'Token ids of each prompt.')
_SLOTS = flags.DEFINE_integer('slots', 32, "The engine's slots (requests run at once).")
_PAGE_SIZE = flags.DEFINE_integer('page_size', 16, "The engine's page size.")
_CHUNK = flags.DEFINE_integer('chunk', 64, "The engine's prefill chunk (the server's default).")
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of the prompts.')
_DTYPE = flags.DEFINE_string('dtype', 'auto', 'Compute dtype (auto: bf16 on GPU/TPU).')
_STARTUP = flags.DEFINE_integer('startup_timeout', 300,
                                'Seconds the server may take to compile and listen.')
_SERVE_ONLY = flags.DEFINE_bool(
    'serve_only', False, 'Only run the server (what the benchmark starts in its subprocess):'
    ' print `ready {json}` with its port once compiled, serve until stdin closes or SIGTERM.')

_MODEL = 'random'
_PRINTABLE = (3 + 32, 3 + 127)  # The byte tokenizer's ids of printable ASCII: [low, high).


# The server's side (--serve_only).

def serve() -> None:
  import flax.linen as nn  # pylint: disable=import-outside-toplevel (the server's alone)
  import jax  # pylint: disable=import-outside-toplevel
  import uvicorn  # pylint: disable=import-outside-toplevel
  from lm import config as config_lib  # pylint: disable=import-outside-toplevel
  from lm import models, sharding  # pylint: disable=import-outside-toplevel
  from lm.engine.engine import Engine, SamplingParams  # pylint: disable=import-outside-toplevel
  from lm.serving import openai_api  # pylint: disable=import-outside-toplevel
  from lm.serving.runner import Runner  # pylint: disable=import-outside-toplevel
  from lm.tokenizer import ByteTokenizer  # pylint: disable=import-outside-toplevel

  config = _CONFIG.value
  dtype = config.model.dtype = config_lib.resolve_dtype(_DTYPE.value)
  max_length = _PROMPT_TOKENS.value + _MAX_TOKENS.value
  config.model.max_seq_len = max(config.model.max_seq_len, max_length)
  mesh = sharding.make_mesh({'data': 1, 'fsdp': 1, 'tensor': 1}, jax.devices()[:1])
  model = models.build(config.model)
  params = nn.meta.unbox(models.init_variables(model, jax.random.key(0))['params'])
  tokenizer = ByteTokenizer()
  engine = Engine(model, params, tokenizer, slots=_SLOTS.value, page_size=_PAGE_SIZE.value,
                  max_length=max_length, chunk=_CHUNK.value)
  engine.generate([[tokenizer.prefix_id]], SamplingParams(max_tokens=2))  # Compiles.
  served = openai_api.Served(_MODEL, model, params, tokenizer, mesh, max_length)
  runner = Runner(engine).start()
  sock = socket.socket()
  sock.bind(('127.0.0.1', 0))
  server = uvicorn.Server(uvicorn.Config(openai_api.make_app(runner, served),
                                         log_level='warning', timeout_graceful_shutdown=5))

  def stop_when_stdin_closes():  # The benchmark ended, however it ended.
    sys.stdin.read()
    server.should_exit = True
  threading.Thread(target=stop_when_stdin_closes, daemon=True).start()
  ready = {'port': sock.getsockname()[1], 'params': sum(x.size for x in jax.tree.leaves(params)),
           'dtype': str(dtype), 'device': jax.devices()[0].device_kind}
  print(f'ready {json.dumps(ready)}', flush=True)
  try:
    server.run(sockets=[sock])
  except KeyboardInterrupt:
    pass
  finally:
    runner.close()


class Server:
  """This module with --serve_only in a subprocess; `ready` its JSON line once listening.
  Leaving the `with` closes its stdin (it stops), then terminates, then kills it."""

  def __enter__(self) -> 'Server':
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, 'PYTHONPATH': os.pathsep.join(
        p for p in (root, os.environ.get('PYTHONPATH')) if p)}
    self.process = subprocess.Popen(
        [sys.executable, '-m', 'experiments.benchmark_serve', *sys.argv[1:], '--serve_only'],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    try:
      self.ready = self._wait_ready()
    except BaseException:
      self._stop()
      raise
    return self

  def _wait_ready(self) -> dict:
    deadline = time.monotonic() + _STARTUP.value
    while True:
      left = deadline - time.monotonic()
      if left <= 0:
        raise RuntimeError(f'the server was not ready within {_STARTUP.value} s')
      if not select.select([self.process.stdout], [], [], left)[0]:
        continue
      line = self.process.stdout.readline()
      if not line:
        raise RuntimeError(f'the server exited (status {self.process.wait()}) before it was'
                           ' ready; its stderr is above')
      if line.startswith('ready '):
        threading.Thread(target=self._forward, daemon=True).start()
        return json.loads(line[len('ready '):])
      sys.stderr.write(line)

  def _forward(self) -> None:
    """Whatever the server prints once ready goes on to stderr: its pipe never fills."""
    for line in self.process.stdout:
      sys.stderr.write(line)

  def _stop(self) -> None:
    try:
      self.process.stdin.close()
    except OSError:
      pass
    for stop, seconds in ((None, 30), (self.process.terminate, 10), (self.process.kill, 10)):
      if stop is not None:
        stop()
      try:
        self.process.wait(seconds)
        return
      except subprocess.TimeoutExpired:
        pass

  def __exit__(self, *exc_info) -> None:
    self._stop()


# The clients' side.

async def one_request(api, prompt: list[int]) -> dict:
  """One streamed completion: its TTFT, ITL (None with under two chunks), tokens, chunks."""
  sent = time.perf_counter()
  stream = await api.completions.create(
      model=_MODEL, prompt=prompt, max_tokens=_MAX_TOKENS.value, temperature=0, stream=True,
      stream_options={'include_usage': True})
  times, tokens = [], None
  async for chunk in stream:
    if chunk.choices and chunk.choices[0].text:
      times.append(time.perf_counter())
    if chunk.usage is not None:
      tokens = chunk.usage.completion_tokens
  if not times or tokens is None:
    raise RuntimeError(f'a request streamed {len(times)} chunks of text, usage {tokens}')
  return {'ttft': times[0] - sent, 'itl': float(np.mean(np.diff(times))) if len(times) > 1
          else None, 'tokens': tokens, 'chunks': len(times), 'done': times[-1]}


async def run_clients(base_url: str, prompts: list[list[list[int]]]) -> tuple[list[dict], float]:
  """prompts[client][request]: each client sends its own one after another, all clients at
  once. (Every request's result, wall seconds from the first sent to the last done.)"""
  import openai  # pylint: disable=import-outside-toplevel (the clients' alone)
  apis = [openai.AsyncOpenAI(base_url=base_url, api_key='unused', max_retries=0)
          for _ in prompts]

  async def client(api, own):
    return [await one_request(api, prompt) for prompt in own]

  try:
    start = time.perf_counter()
    per_client = await asyncio.gather(*(client(a, p) for a, p in zip(apis, prompts)))
    seconds = time.perf_counter() - start
  finally:
    for api in apis:
      await api.close()
  return [r for results in per_client for r in results], seconds


def main(argv):
  del argv
  if _SERVE_ONLY.value:
    serve()
    return
  for name in ('httpx', 'httpx2'):  # Not a line per request (openai's client: httpx2).
    logging.getLogger(name).setLevel(logging.WARNING)
  clients = [int(c) for c in _CLIENTS.value]
  if min(clients) < 1 or _REQUESTS.value < 1 or _MAX_TOKENS.value < 1 or _PROMPT_TOKENS.value < 1:
    raise app.UsageError('--clients, --requests_per_client, --max_tokens and --prompt_tokens'
                         ' must be at least 1')
  rng = np.random.default_rng(_SEED.value)

  def prompts(count: int, each: int) -> list[list[list[int]]]:
    """Fresh random prompts: each request its own, so none finds a prefix cached."""
    return [[[int(t) for t in rng.integers(*_PRINTABLE, size=_PROMPT_TOKENS.value)]
             for _ in range(each)] for _ in range(count)]

  rows, short, fewer_chunks = [], 0, 0
  with Server() as server:
    base_url = f'http://127.0.0.1:{server.ready["port"]}/v1'
    # Warm-up: one full-length request per client of the most clients.
    asyncio.run(run_clients(base_url, prompts(max(clients), 1)))
    for count in clients:
      results, seconds = asyncio.run(run_clients(base_url, prompts(count, _REQUESTS.value)))
      ttft = np.asarray([r['ttft'] for r in results]) * 1e3
      itl = np.asarray([r['itl'] for r in results if r['itl'] is not None]) * 1e3
      tokens = sum(r['tokens'] for r in results)
      short += sum(r['tokens'] < _MAX_TOKENS.value for r in results)
      fewer_chunks += sum(r['chunks'] < r['tokens'] - 1 for r in results)
      rows.append((count, len(results), *np.percentile(ttft, [50, 90]),
                   *(np.percentile(itl, [50, 90]) if itl.size else (np.nan, np.nan)),
                   tokens / seconds, seconds))
  ready = server.ready
  print(f'/v1/completions streamed, prompts of {_PROMPT_TOKENS.value} token ids, max_tokens='
        f'{_MAX_TOKENS.value} (greedy, no stop string), {_REQUESTS.value} requests per client,'
        f' {_SLOTS.value} slots, chunk {_CHUNK.value}, {ready["params"]:,} params (random),'
        f' {ready["dtype"]}, {ready["device"]}')
  print('| clients | requests | TTFT p50 ms | TTFT p90 ms | ITL p50 ms | ITL p90 ms '
        '| tokens/s | wall s |')
  print('|---|---|---|---|---|---|---|---|')
  for count, requests, ttft50, ttft90, itl50, itl90, rate, seconds in rows:
    print(f'| {count} | {requests} | {ttft50:.1f} | {ttft90:.1f} | {itl50:.2f} | {itl90:.2f} '
          f'| {rate:,.0f} | {seconds:.1f} |')
  if short:
    print(f'note: {short} requests ended before max_tokens (the end-of-text id)')
  if fewer_chunks:
    print(f'note: {fewer_chunks} requests streamed fewer chunks of text than tokens - 1 (bytes'
          ' of one character, or ids with no text): their ITL is per chunk, not per token')


if __name__ == '__main__':
  app.run(main)
