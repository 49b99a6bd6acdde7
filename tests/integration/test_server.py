"""The OpenAI-compatible server on conftest's `trained_run`: a real uvicorn server on a free
port (in a thread here, so the tests can read the engine's pages; and once as the real
`python -m experiments.serve` process) answering the official `openai` client and
lm-evaluation-harness's `local-completions` model, checked against lm's static sampler
and lm's own scorer."""

import concurrent.futures
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import types

import httpx
import jax
import pytest
import uvicorn

from lm import sampling, sharding
from lm.engine.engine import Engine
from lm.evaluation import scoring
from lm.serving import openai_api
from lm.serving.runner import Runner
from lm.training import checkpointing

from helpers import ROOT

openai = pytest.importorskip('openai')  # In the test extra; skipped only without it.

PROMPTS = ['the cat', 'a dog ran', 'small blue', 'near quiet rivers and', 'big red trees',
           'the mat', 'while dogs', 'far away from']


@pytest.fixture(scope='module')
def server(trained_run):
  mesh = sharding.make_mesh({'data': 1, 'fsdp': 1, 'tensor': 1}, jax.devices()[:1])
  run = checkpointing.restore_for_inference(str(trained_run['workdir']), mesh=mesh,
                                            kv_cache_dtype='')
  max_length = scoring.context_length(run.config, run.tokenizer.trained_here)
  engine = Engine(run.model, run.params, run.tokenizer, slots=4, page_size=8,
                  max_length=max_length, chunk=16)
  runner = Runner(engine).start()
  served = openai_api.Served('tiny', run.model, run.params, run.tokenizer, mesh, max_length)
  sock = socket.socket()
  sock.bind(('127.0.0.1', 0))
  uvicorn_server = uvicorn.Server(uvicorn.Config(openai_api.make_app(runner, served),
                                                 log_level='warning'))
  thread = threading.Thread(target=uvicorn_server.run, kwargs={'sockets': [sock]}, daemon=True)
  thread.start()
  deadline = time.monotonic() + 60
  while not uvicorn_server.started:
    assert time.monotonic() < deadline and thread.is_alive(), 'the server did not start'
    time.sleep(0.05)
  base_url = f'http://127.0.0.1:{sock.getsockname()[1]}'
  yield types.SimpleNamespace(base_url=base_url, engine=engine, runner=runner, run=run,
                              mesh=mesh, max_length=max_length)
  uvicorn_server.should_exit = True
  thread.join(30)
  runner.close()


def client(server, **options):
  return openai.OpenAI(base_url=f'{server.base_url}/v1', api_key='unused', max_retries=0,
                       **options)


def reference(server, prompt: str, max_tokens: int) -> str:
  """Greedy text from lm's static sampler (lm.sampling), the prompt encoded as the API does."""
  with sharding.activate(server.mesh):
    return sampling.complete(server.run.model, server.run.params, server.run.tokenizer,
                             [prompt], max_new_tokens=max_tokens)[0]


def all_pages_free(server, timeout: float = 20.0) -> bool:
  """Whether the engine gets back to no work and every page free within `timeout`."""
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    idle = server.runner.call(lambda engine: (not engine.has_work(), engine.pool.available(),
                                              engine.pool.num_pages)).result()
    if idle[0] and idle[1] == idle[2] - 1:  # Page 0 is the engine's null page.
      return True
    time.sleep(0.1)
  return False


def test_completions_chat_and_streams_through_the_openai_client(server):
  api = client(server)
  completion = api.completions.create(model='tiny', prompt=PROMPTS[0], max_tokens=12,
                                      temperature=0)
  assert completion.choices[0].text == reference(server, PROMPTS[0], 12)
  assert completion.usage.prompt_tokens == len(
      sampling.prompt_ids(server.run.tokenizer, PROMPTS[0]))
  streamed = api.completions.create(model='tiny', prompt=PROMPTS[0], max_tokens=12,
                                    temperature=0, stream=True)
  assert ''.join(chunk.choices[0].text for chunk in streamed) == completion.choices[0].text

  messages = [{'role': 'user', 'content': 'the cat'}]
  reply = api.chat.completions.create(model='tiny', messages=messages, max_tokens=10,
                                      temperature=0)
  assert reply.choices[0].message.role == 'assistant'
  assert reply.choices[0].finish_reason in ('stop', 'length')
  streamed = api.chat.completions.create(model='tiny', messages=messages, max_tokens=10,
                                         temperature=0, stream=True,
                                         stream_options={'include_usage': True})
  chunks = list(streamed)
  assert ''.join(c.choices[0].delta.content or '' for c in chunks if c.choices) == (
      reply.choices[0].message.content)
  assert chunks[-1].usage.completion_tokens == reply.usage.completion_tokens
  assert [m.id for m in api.models.list()] == ['tiny']


def test_concurrent_clients_get_the_text_each_gets_alone(server):
  api = client(server)

  def ask(prompt):
    return api.completions.create(model='tiny', prompt=prompt, max_tokens=16,
                                  temperature=0).choices[0].text

  alone = [ask(prompt) for prompt in PROMPTS]
  with concurrent.futures.ThreadPoolExecutor(len(PROMPTS)) as pool:
    together = list(pool.map(ask, PROMPTS * 2))
  assert together == alone * 2
  assert alone == [reference(server, prompt, 16) for prompt in PROMPTS]
  assert all_pages_free(server)


def test_bad_requests_are_answered_4xx_and_the_server_goes_on(server):
  api = client(server)
  with pytest.raises(openai.NotFoundError, match='does not exist'):
    api.completions.create(model='gpt-4', prompt='a', max_tokens=2)
  with pytest.raises(openai.BadRequestError, match='max_tokens'):
    api.completions.create(model='tiny', prompt='a', max_tokens=-1)
  with pytest.raises(openai.BadRequestError, match='context'):
    api.completions.create(model='tiny', prompt='a' * server.max_length, max_tokens=1)
  with pytest.raises(openai.BadRequestError, match='temperature'):
    api.chat.completions.create(model='tiny', messages=[{'role': 'user', 'content': 'a'}],
                                temperature=5)
  raw = httpx.post(f'{server.base_url}/v1/completions', content=b'{"model": "tiny", "pro',
                   headers={'Content-Type': 'application/json'})
  assert raw.status_code == 400 and raw.json()['error']['type'] == 'invalid_request_error'
  assert api.completions.create(model='tiny', prompt='a', max_tokens=2).choices


def slow_engine(server, seconds: float):
  """Each engine step takes `seconds` longer, so a request is still running when its
  client leaves; records the ids the engine cancels. Undo with the returned function."""
  cancelled = []

  def install(engine):
    step, cancel = engine.step, engine.cancel

    def slow_step():
      time.sleep(seconds)
      return step()

    def recorded_cancel(request_id):
      cancelled.append(request_id)
      return cancel(request_id)

    engine.step, engine.cancel = slow_step, recorded_cancel

    def undo(engine):
      del engine.step, engine.cancel  # The instance attributes: the class's again.
    return undo

  undo = server.runner.call(install).result()
  return cancelled, lambda: server.runner.call(undo).result()


def test_a_client_that_leaves_mid_stream_cancels_its_request_and_frees_its_pages(server):
  cancelled, undo = slow_engine(server, 0.05)
  try:
    with httpx.stream('POST', f'{server.base_url}/v1/completions', json={
        'model': 'tiny', 'prompt': PROMPTS[0], 'max_tokens': 40, 'temperature': 0,
        'stream': True}, timeout=30) as response:
      for line in response.iter_lines():
        if line.startswith('data: ') and json.loads(line[6:])['choices'][0]['text']:
          break  # Some text came; leave.
    assert all_pages_free(server)
    assert len(cancelled) == 1
    # A client that leaves a whole (not streamed) request cancels it too.
    with pytest.raises(httpx.ReadTimeout):
      httpx.post(f'{server.base_url}/v1/completions', json={
          'model': 'tiny', 'prompt': PROMPTS[1], 'max_tokens': 40, 'temperature': 0},
                 timeout=0.5)
    assert all_pages_free(server)
    assert len(cancelled) == 2
  finally:
    undo()


def test_lm_evaluation_harness_local_completions_scores_as_lms_scorer(server):
  lm_eval_completions = pytest.importorskip('lm_eval.models.openai_completions')
  from lm_eval.api.instance import Instance  # pylint: disable=import-outside-toplevel
  model = lm_eval_completions.LocalCompletionsAPI(
      base_url=f'{server.base_url}/v1/completions', model='tiny', max_length=server.max_length,
      max_retries=1)
  assert model.tokenizer_backend == 'remote'  # Found the server's /tokenizer_info itself.
  pairs = [('the cat sat on', ' a mat'), ('dogs ran far', ' away'), ('big red', ' trees and'),
           ('small', ' blue houses near quiet rivers')]
  results = model.loglikelihood([Instance('loglikelihood', {}, pair, i)
                                 for i, pair in enumerate(pairs)])
  # lm's own scorer on the same ids: the harness asks /tokenize without special tokens.
  tokenizer = server.run.tokenizer
  ids = [([int(t) for t in tokenizer.encode(context)], [int(t) for t in tokenizer.encode(more)])
         for context, more in pairs]
  scorer = scoring.Scorer.for_run(server.run, max_length=server.max_length)
  with sharding.activate(server.mesh):
    scores = scorer.score([c + m for c, m in ids], [len(c) for c, _ in ids])
  for (log_likelihood, greedy), score in zip(results, scores):
    assert log_likelihood == pytest.approx(score.log_likelihood, abs=1e-4)
    assert greedy == score.greedy

  [generated] = model.generate_until([Instance(
      'generate_until', {}, ('the cat', {'until': ['.'], 'max_gen_toks': 12}), 0)])
  with sharding.activate(server.mesh):
    expected = sampling.complete_ids(server.run.model, server.run.params, tokenizer,
                                     [[int(t) for t in tokenizer.encode('the cat')]],
                                     max_new_tokens=12)[0]
  assert generated == scoring.cut_at_stops(expected, ('.',))


def test_the_serve_command_answers_and_stops_on_ctrl_c(trained_run, command_env):
  process = subprocess.Popen(
      [sys.executable, '-m', 'experiments.serve', f'--workdir={trained_run["workdir"]}',
       '--port=0', '--slots=2', '--model_name=tiny'], cwd=ROOT, env=command_env,
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    line = process.stdout.readline()
    assert line.startswith("serving 'tiny'"), (line, process.stderr.read()[-3000:]
                                                if process.poll() is not None else '')
    port = int(line.rsplit(':', 1)[1].split('/')[0])
    api = openai.OpenAI(base_url=f'http://127.0.0.1:{port}/v1', api_key='unused', max_retries=0)
    completion = api.completions.create(model='tiny', prompt='the cat', max_tokens=4,
                                        temperature=0)
    assert completion.usage.completion_tokens >= 1
  finally:
    process.send_signal(signal.SIGINT)
    returncode = process.wait(30)
  assert returncode == 0, process.stderr.read()[-3000:]


@pytest.mark.parametrize('flags, culprit', [
    (['--port=70000'], '--port'), (['--slots=0'], '--slots'), (['--page_size=0'], '--page_size'),
    (['--max_length=1'], '--max_length'), (['--max_length=100000'], '--max_length'),
    (['--num_pages=1'], '--num_pages'), (['--num_pages=3'], '--num_pages'),
    (['--chunk=0'], '--chunk'), (['--step=3'], '--step'), (['--model_name='], '--model_name'),
    (['--host=256.1.1.1'], '--host')])
def test_a_bad_serve_flag_is_named_in_one_line(commands, trained_run, flags, culprit):
  result = commands('experiments.serve', f'--workdir={trained_run["workdir"]}', '--port=0',
                    *flags)
  lines = result.stderr.strip().splitlines()
  assert result.returncode == 1 and len(lines) == 1 and lines[0].startswith('error:'), (
      result.stderr[-3000:])
  assert culprit in lines[0] and 'Traceback' not in result.stdout + result.stderr


def test_a_missing_workdir_is_named_in_one_line(commands, tmp_path):
  result = commands('experiments.serve', f'--workdir={tmp_path / "nothing"}')
  assert result.returncode == 1 and result.stderr.strip().splitlines() == [
      f'error: --workdir={tmp_path / "nothing"} does not exist']
  assert os.path.exists(tmp_path)
