"""Serve a run's checkpoint over HTTP with the OpenAI API (lm/serving; docs/serving.md):

  python -m experiments.serve --workdir=/tmp/lm_default [--port=8000 --slots=8]

  curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \
      -d '{"model": "lm_default", "prompt": "def main(", "max_tokens": 32, "temperature": 0}'

The generation engine (lm/engine: continuous batching over a paged KV cache, on one
device) runs on a thread of its own; requests come and go as the engine steps. The model
is named after the workdir (--model_name), and reads a context of --max_length tokens,
prompt and completion together (default: its own, as experiments.evaluate scores: a model
trained here, the rows it was trained on). Ctrl-C stops it.
"""

import os
import socket

from absl import flags
import jax

from experiments import cli
from lm import sharding
from lm.engine.engine import Engine, SamplingParams
from lm.errors import ConfigError, check
from lm.evaluation import inputs, scoring
from lm.serving import openai_api
from lm.serving.runner import Runner
from lm.training import checkpointing

_WORKDIR, _STEP = cli.checkpoint_flags()
_HOST = flags.DEFINE_string('host', '127.0.0.1', 'Address to listen on (0.0.0.0: every one).')
_PORT = flags.DEFINE_integer('port', 8000, 'Port to listen on (0: any free one, printed).')
_SLOTS = flags.DEFINE_integer('slots', 8, 'Requests the engine runs at once; more wait.')
_PAGE_SIZE = flags.DEFINE_integer('page_size', 16, 'Tokens per page of the KV cache.')
_NUM_PAGES = flags.DEFINE_integer(
    'num_pages', None, 'Pages of the KV cache (default: every slot a whole context, and one).')
_CHUNK = flags.DEFINE_integer('chunk', 64, 'Prompt tokens each slot prefills per step.')
_MAX_LENGTH = flags.DEFINE_integer(
    'max_length', None, "Tokens of prompt and completion a request may have (default: the"
    " model's context, as experiments.evaluate reads it).")
_MODEL_NAME = flags.DEFINE_string('model_name', None,
                                  'The model\'s name in the API (default: the workdir\'s).')


def check_flags() -> None:
  """Every flag that needs no checkpoint, before one is loaded; all problems in one line."""
  inputs.check_all([
      inputs.workdir_check(_WORKDIR.value),
      (0 <= _PORT.value < 2**16, f'--port={_PORT.value} must be in [0, 65535]'),
      (bool(_HOST.value), '--host is empty'),
      (_SLOTS.value >= 1, f'--slots={_SLOTS.value} must be at least 1'),
      (_PAGE_SIZE.value >= 1, f'--page_size={_PAGE_SIZE.value} must be at least 1'),
      (_NUM_PAGES.value is None or _NUM_PAGES.value >= 2,
       f'--num_pages={_NUM_PAGES.value} must be at least 2'),
      (_CHUNK.value >= 1, f'--chunk={_CHUNK.value} must be at least 1'),
      (_MAX_LENGTH.value is None or _MAX_LENGTH.value >= 2,
       f'--max_length={_MAX_LENGTH.value} must be at least 2'),
      (_MODEL_NAME.value is None or _MODEL_NAME.value.strip() != '',
       '--model_name is empty'),
  ])


def listen() -> socket.socket:
  """The listening socket, bound before the checkpoint loads: a port in use is named in
  one line, not found after a minute of loading."""
  try:
    family = socket.AF_INET6 if ':' in _HOST.value else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((_HOST.value, _PORT.value))
  except (OSError, OverflowError) as error:
    raise ConfigError(f'--host={_HOST.value} --port={_PORT.value}: cannot listen there'
                      f' ({getattr(error, "strerror", None) or error})') from error
  sock.listen(2048)
  sock.set_inheritable(True)
  return sock


def main():
  check_flags()
  import uvicorn  # pylint: disable=import-outside-toplevel (after the flags: a slow import)
  sock = listen()
  # One device: the engine's pages and slots live on one chip.
  mesh = sharding.make_mesh({'data': 1, 'fsdp': 1, 'tensor': 1}, jax.devices()[:1])
  # The engine's pages hold the compute dtype: an int8 decoding cache is an option of
  # lm.sampling's cache, not of these.
  run = checkpointing.restore_for_inference(_WORKDIR.value, _STEP.value, keep_quantized=True,
                                            mesh=mesh, kv_cache_dtype='')
  max_length = scoring.context_length(run.config, run.tokenizer.trained_here, _MAX_LENGTH.value)
  check(_NUM_PAGES.value is None or _NUM_PAGES.value - 1 >= -(-max_length // _PAGE_SIZE.value),
        f'--num_pages={_NUM_PAGES.value} cannot hold one request of --max_length={max_length}'
        f' tokens in pages of {_PAGE_SIZE.value} (and page 0, which is never used)')
  try:
    engine = Engine(run.model, run.params, run.tokenizer, slots=_SLOTS.value,
                    page_size=_PAGE_SIZE.value, num_pages=_NUM_PAGES.value,
                    max_length=max_length, chunk=_CHUNK.value)
    # Compiles the engine's two programs now, not in the first client's wait.
    engine.generate([[run.tokenizer.prefix_id]], SamplingParams(max_tokens=2))
  except ValueError as error:
    raise ConfigError(f'the engine refused these settings: {error}') from error
  name = _MODEL_NAME.value or os.path.basename(os.path.normpath(_WORKDIR.value))
  served = openai_api.Served(name, run.model, run.params, run.tokenizer, mesh, max_length)
  runner = Runner(engine).start()
  host, port = sock.getsockname()[:2]
  print(f'serving {name!r} (step {run.step}, a context of {max_length} tokens, {_SLOTS.value}'
        f' slots) at http://{host}:{port}/v1', flush=True)
  server = uvicorn.Server(uvicorn.Config(openai_api.make_app(runner, served), log_level='warning',
                                         timeout_graceful_shutdown=5))
  try:
    server.run(sockets=[sock])
  except KeyboardInterrupt:  # uvicorn shut down on Ctrl-C (SIGINT), then re-raised it.
    pass
  finally:
    runner.close()
  print('stopped', flush=True)


if __name__ == '__main__':
  cli.run(main)
