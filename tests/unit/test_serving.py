"""lm/serving: the OpenAI API app (FastAPI's TestClient, in process) over the real engine
on a small random model with byte tokens: request checks and OpenAI's error shape, SSE
framing, usage, completions and chat against lm.sampling's static sampler, n and seeds,
stop strings, echo/logprobs against the model's own log-softmax and lm's scorer, and an
engine failure answered 500 while the server goes on."""

import json
import types

from fastapi.testclient import TestClient
import jax
import numpy as np
import pytest

from lm import chat, sampling, sharding
from lm.engine.engine import Engine
from lm.evaluation import scoring
from lm.serving import openai_api
from lm.serving.runner import Runner
from lm.tokenizer import ByteTokenizer

from helpers import init_model, small_model_config

CONTEXT = 128
PROMPT = 'def add(a, b):'


@pytest.fixture(scope='module')
def server():
  config = small_model_config(vocab_size=259, max_seq_len=CONTEXT)
  model, params = init_model(config, seed=3)
  tokenizer = ByteTokenizer()
  mesh = sharding.inference_mesh(config.embed_dim, jax.devices()[:1])
  engine = Engine(model, params, tokenizer, slots=4, page_size=8, max_length=CONTEXT, chunk=16)
  runner = Runner(engine).start()
  served = openai_api.Served('tiny', model, params, tokenizer, mesh, CONTEXT)
  with TestClient(openai_api.make_app(runner, served)) as client:
    yield types.SimpleNamespace(client=client, engine=engine, runner=runner, model=model,
                                params=params, tokenizer=tokenizer, mesh=mesh)
  runner.close()


def reference(server, ids, max_tokens, stop_ids=None, **options) -> str:
  """What lm's static sampler (lm.sampling) completes `ids` with."""
  return sampling.complete_ids(server.model, server.params, server.tokenizer, [ids],
                               max_new_tokens=max_tokens, stop_ids=stop_ids, **options)[0]


def complete(server, **body):
  return server.client.post('/v1/completions', json={'model': 'tiny', **body})


def test_models_lists_the_served_model(server):
  response = server.client.get('/v1/models')
  assert response.status_code == 200
  assert [m['id'] for m in response.json()['data']] == ['tiny']
  assert response.json()['data'][0]['max_model_len'] == CONTEXT


def test_a_greedy_completion_is_what_the_static_sampler_gives_with_its_usage(server):
  response = complete(server, prompt=PROMPT, max_tokens=12, temperature=0)
  assert response.status_code == 200, response.text
  body = response.json()
  ids = sampling.prompt_ids(server.tokenizer, PROMPT)
  assert body['object'] == 'text_completion' and body['model'] == 'tiny'
  [choice] = body['choices']
  assert choice['text'] == reference(server, ids, 12)
  assert choice['finish_reason'] in ('stop', 'length')
  usage = body['usage']
  assert usage['prompt_tokens'] == len(ids)
  if choice['finish_reason'] == 'length':
    assert usage['completion_tokens'] == 12
  assert usage['total_tokens'] == usage['prompt_tokens'] + usage['completion_tokens']


def test_token_id_prompts_and_several_prompts_give_one_choice_each(server):
  first, second = (sampling.prompt_ids(server.tokenizer, p) for p in ('x = ', 'import '))
  body = complete(server, prompt=[first, second], max_tokens=5, temperature=0).json()
  assert [c['index'] for c in body['choices']] == [0, 1]
  assert [c['text'] for c in body['choices']] == [reference(server, first, 5),
                                                 reference(server, second, 5)]
  assert body['usage']['prompt_tokens'] == len(first) + len(second)


def test_n_choices_are_requests_with_seeds_one_apart(server):
  body = complete(server, prompt=PROMPT, max_tokens=8, temperature=1.0, n=3, seed=11).json()
  texts = [c['text'] for c in body['choices']]
  alone = complete(server, prompt=PROMPT, max_tokens=8, temperature=1.0, seed=12).json()
  assert texts[1] == alone['choices'][0]['text']
  assert len(set(texts)) > 1  # Three samples at temperature 1 from a random model.


def test_a_stop_string_cuts_the_text_before_it(server):
  whole = complete(server, prompt=PROMPT, max_tokens=20, temperature=0).json()
  text = whole['choices'][0]['text']
  stop = next((text[i:i + 2] for i in range(3, len(text) - 2)
               if '\ufffd' not in text[i:i + 2] and text.find(text[i:i + 2]) == i), None)
  if stop is None:
    pytest.skip(f'no two-character stop string in {text!r}')
  cut = complete(server, prompt=PROMPT, max_tokens=20, temperature=0, stop=[stop, 'zzzz']).json()
  assert cut['choices'][0]['text'] == text[:text.find(stop)]
  assert cut['choices'][0]['finish_reason'] == 'stop'


def sse_events(response) -> list[str]:
  """The data of each server-sent event, checking the framing: 'data: ...' then a blank
  line, nothing else."""
  raw = response.text
  assert raw.endswith('\n\n'), raw[-200:]
  events = raw[:-2].split('\n\n')
  assert all(e.startswith('data: ') and '\n' not in e for e in events), raw[:500]
  return [e[len('data: '):] for e in events]


def test_streaming_sends_the_same_text_in_sse_chunks_ending_done_with_usage(server):
  whole = complete(server, prompt=PROMPT, max_tokens=16, temperature=0).json()
  with server.client.stream('POST', '/v1/completions', json={
      'model': 'tiny', 'prompt': PROMPT, 'max_tokens': 16, 'temperature': 0, 'stream': True,
      'stream_options': {'include_usage': True}}) as response:
    response.read()
  assert response.status_code == 200
  assert response.headers['content-type'].startswith('text/event-stream')
  events = sse_events(response)
  assert events[-1] == '[DONE]'
  chunks = [json.loads(e) for e in events[:-1]]
  assert all(c['object'] == 'text_completion' and c['id'] == chunks[0]['id'] for c in chunks)
  text = ''.join(choice['text'] for c in chunks for choice in c['choices'])
  assert text == whole['choices'][0]['text']
  reasons = [choice['finish_reason'] for c in chunks for choice in c['choices']]
  assert reasons[-1] == whole['choices'][0]['finish_reason'] and not any(reasons[:-1])
  assert chunks[-1]['choices'] == [] and chunks[-1]['usage'] == whole['usage']


def test_chat_renders_the_template_and_stops_at_the_end_of_turn(server):
  messages = [{'role': 'system', 'content': 'Be terse.'}, {'role': 'user', 'content': 'Hi'}]
  response = server.client.post('/v1/chat/completions', json={
      'model': 'tiny', 'messages': messages, 'max_tokens': 10, 'temperature': 0})
  assert response.status_code == 200, response.text
  body = response.json()
  ids = [int(i) for i in chat.render(server.tokenizer, messages, add_generation_prompt=True).ids]
  expected = reference(server, ids, 10, stop_ids=chat.end_of_turn_ids(server.tokenizer))
  assert body['object'] == 'chat.completion'
  assert body['choices'][0]['message'] == {'role': 'assistant', 'content': expected}
  assert body['usage']['prompt_tokens'] == len(ids)

  with server.client.stream('POST', '/v1/chat/completions', json={
      'model': 'tiny', 'messages': messages, 'max_tokens': 10, 'temperature': 0,
      'stream': True}) as response:
    response.read()
  events = sse_events(response)
  chunks = [json.loads(e) for e in events[:-1]]
  assert events[-1] == '[DONE]' and chunks[0]['choices'][0]['delta']['role'] == 'assistant'
  assert all(c['object'] == 'chat.completion.chunk' for c in chunks)
  assert ''.join(c['choices'][0]['delta'].get('content', '') for c in chunks) == expected


def model_log_probs(server, ids) -> np.ndarray:
  """log p(ids[t+1] | ids[:t+1]) and the log-softmax [T, V], from the model's logits in
  numpy (float64)."""
  tokens = np.asarray([ids], np.int32)
  logits = server.model.apply({'params': server.params}, tokens, np.ones_like(tokens),
                              np.arange(len(ids))[None])[0]
  logits = np.asarray(logits, np.float64)
  log_softmax = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(
      -1, keepdims=True)) - logits.max(-1, keepdims=True)
  return log_softmax


def test_echo_logprobs_are_the_prompt_tokens_log_probs_as_the_harness_reads_them(server):
  ids = sampling.prompt_ids(server.tokenizer, PROMPT)
  response = complete(server, prompt=ids, max_tokens=1, temperature=0, logprobs=3, echo=True)
  assert response.status_code == 200, response.text
  [choice] = response.json()['choices']
  logprobs = choice['logprobs']
  generated = len(logprobs['tokens']) - len(ids)
  assert generated == 1 and response.json()['usage']['completion_tokens'] == 1
  assert logprobs['token_logprobs'][0] is None and logprobs['top_logprobs'][0] is None
  assert choice['text'].startswith(PROMPT)
  # The tokens' texts are the echoed text (bos is '<s>', which the text does not hold).
  assert logprobs['tokens'][0] == '<s>'
  assert ''.join(logprobs['tokens'][1:]) == choice['text']
  assert logprobs['text_offset'][1:len(ids)] == list(range(len(PROMPT)))

  all_ids = ids + [server.tokenizer.encode(choice['text'][len(PROMPT):])[0]
                   if choice['text'][len(PROMPT):] else None]
  log_softmax = model_log_probs(server, ids)
  expected = [log_softmax[t, ids[t + 1]] for t in range(len(ids) - 1)]
  np.testing.assert_allclose(logprobs['token_logprobs'][1:len(ids)], expected, atol=2e-5)
  for t in range(1, len(ids) + 1):
    top = logprobs['top_logprobs'][t]
    assert len(top) == 3
    np.testing.assert_allclose(sorted(top.values(), reverse=True),
                               np.sort(log_softmax[t - 1])[::-1][:3], atol=2e-5)
  del all_ids

  # As lm-evaluation-harness's local-completions parses it: the continuation is the last
  # four prompt tokens; against lm's own scorer on the same ids.
  context = len(ids) - 4
  total = sum(logprobs['token_logprobs'][context:-1])
  greedy = all(lp == max(top.values()) for lp, top in zip(
      logprobs['token_logprobs'][context:-1], logprobs['top_logprobs'][context:-1]))
  scorer = scoring.Scorer(server.model, server.params, server.tokenizer, max_length=CONTEXT)
  with sharding.activate(server.mesh):
    [score] = scorer.score([ids], [context])
  assert total == pytest.approx(score.log_likelihood, abs=1e-4)
  assert greedy == score.greedy


def test_logprobs_without_echo_cover_the_completion_and_max_tokens_zero_echoes(server):
  ids = sampling.prompt_ids(server.tokenizer, PROMPT)
  body = complete(server, prompt=PROMPT, max_tokens=4, temperature=0, logprobs=0).json()
  logprobs = body['choices'][0]['logprobs']
  assert len(logprobs['token_logprobs']) == body['usage']['completion_tokens']
  assert all(top == {} for top in logprobs['top_logprobs'])
  body = complete(server, prompt=PROMPT, max_tokens=0, echo=True, logprobs=1).json()
  [choice] = body['choices']
  assert choice['text'] == PROMPT and choice['finish_reason'] == 'length'
  assert len(choice['logprobs']['tokens']) == len(ids)
  assert body['usage'] == {'prompt_tokens': len(ids), 'completion_tokens': 0,
                           'total_tokens': len(ids)}


def test_the_tokenizer_endpoints_read_special_tokens_as_vllm_does(server):
  client = server.client
  assert client.get('/tokenizer_info').json()['eos_token'] == '</s>'
  ids = client.post('/tokenize', json={'prompt': '</s>ab', 'add_special_tokens': False}).json()
  assert ids['tokens'] == [server.tokenizer.eos_id, *server.tokenizer.encode('ab').tolist()]
  with_bos = client.post('/tokenize', json={'prompt': 'ab'}).json()['tokens']
  assert with_bos == sampling.prompt_ids(server.tokenizer, 'ab')
  assert client.post('/detokenize', json={'tokens': with_bos}).json()['prompt'] == 'ab'


LONG = 'x' * CONTEXT
BAD_REQUESTS = [  # (path, body, status, param)
    ('/v1/completions', b'{"model": "tiny", "prompt": ', 400, None),
    ('/v1/completions', b'[1, 2]', 400, None),
    ('/v1/completions', {'prompt': 'a'}, 400, 'model'),
    ('/v1/completions', {'model': 'gpt-4', 'prompt': 'a'}, 404, 'model'),
    ('/v1/completions', {'model': 'tiny'}, 400, 'prompt'),
    ('/v1/completions', {'model': 'tiny', 'prompt': []}, 400, 'prompt'),
    ('/v1/completions', {'model': 'tiny', 'prompt': [1, 'a']}, 400, 'prompt'),
    ('/v1/completions', {'model': 'tiny', 'prompt': [1, 999]}, 400, 'prompt'),
    ('/v1/completions', {'model': 'tiny', 'prompt': 'a', 'max_tokens': -1}, 400, 'max_tokens'),
    ('/v1/completions', {'model': 'tiny', 'prompt': 'a', 'max_tokens': 1.5}, 400, 'max_tokens'),
    ('/v1/completions', {'model': 'tiny', 'prompt': 'a', 'max_tokens': '3'}, 400, 'max_tokens'),
    ('/v1/completions', {'model': 'tiny', 'prompt': 'a', 'max_tokens': True}, 400, 'max_tokens'),
    ('/v1/completions', {'model': 'tiny', 'prompt': LONG, 'max_tokens': 1}, 400, 'prompt'),
    ('/v1/completions', {'model': 'tiny', 'prompt': 'a', 'max_tokens': CONTEXT}, 400, 'prompt'),
    ('/v1/completions', {'model': 'tiny', 'prompt': 'a', 'temperature': -0.5}, 400,
     'temperature'),
    ('/v1/completions', {'model': 'tiny', 'prompt': 'a', 'temperature': 'hot'}, 400,
     'temperature'),
    ('/v1/completions', {'model': 'tiny', 'prompt': 'a', 'temperature': 3}, 400, 'temperature'),
    ('/v1/completions', {'model': 'tiny', 'prompt': 'a', 'top_p': 0}, 400, 'top_p'),
    ('/v1/completions', {'model': 'tiny', 'prompt': 'a', 'top_p': 1.5}, 400, 'top_p'),
    ('/v1/completions', {'model': 'tiny', 'prompt': 'a', 'top_k': -2}, 400, 'top_k'),
    ('/v1/completions', {'model': 'tiny', 'prompt': 'a', 'n': 0}, 400, 'n'),
    ('/v1/completions', {'model': 'tiny', 'prompt': 'a', 'stop': ['']}, 400, 'stop'),
    ('/v1/completions', {'model': 'tiny', 'prompt': 'a', 'stop': 7}, 400, 'stop'),
    ('/v1/completions', {'model': 'tiny', 'prompt': 'a', 'logprobs': 21}, 400, 'logprobs'),
    ('/v1/completions', {'model': 'tiny', 'prompt': 'a', 'logprobs': 1, 'stream': True}, 400,
     'logprobs'),
    ('/v1/completions', {'model': 'tiny', 'prompt': 'a', 'stream': 'yes'}, 400, 'stream'),
    ('/v1/completions', {'model': 'tiny', 'prompt': 'a', 'stream_options': {}}, 400,
     'stream_options'),
    ('/v1/completions', {'model': 'tiny', 'prompt': 'a', 'presence_penalty': 1}, 400,
     'presence_penalty'),
    ('/v1/completions', {'model': 'tiny', 'prompt': 'a', 'best_of': 3}, 400, 'best_of'),
    ('/v1/completions', {'model': 'tiny', 'prompt': 'a\ud800'}, 400, None),
    ('/v1/chat/completions', {'model': 'tiny'}, 400, 'messages'),
    ('/v1/chat/completions', {'model': 'tiny', 'messages': 'hi'}, 400, 'messages'),
    ('/v1/chat/completions', {'model': 'tiny', 'messages': [{'role': 'user'}]}, 400,
     'messages'),
    ('/v1/chat/completions', {'model': 'tiny', 'messages': [{'role': 'user', 'content': 'a'}],
                              'max_tokens': 0}, 400, 'max_tokens'),
    ('/v1/chat/completions', {'model': 'tiny', 'messages': [{'role': 'user', 'content': LONG}]},
     400, 'messages'),
    ('/v1/chat/completions', {'model': 'tiny', 'messages': [{'role': 'user', 'content': 'a'}],
                              'logprobs': True}, 400, 'logprobs'),
    ('/v1/nowhere', {}, 404, None),
]


@pytest.mark.parametrize('path, body, status, param', BAD_REQUESTS)
def test_a_bad_request_is_answered_in_openais_error_shape_and_the_server_goes_on(
    server, path, body, status, param):
  content = body if isinstance(body, bytes) else json.dumps(body).encode()
  response = server.client.post(path, content=content,
                                headers={'Content-Type': 'application/json'})
  assert response.status_code == status, response.text
  error = response.json()['error']
  assert set(error) == {'message', 'type', 'param', 'code'}
  assert error['type'] == 'invalid_request_error' and error['code'] is None
  assert error['param'] == param
  assert error['message'] and '\n' not in error['message'] and 'Traceback' not in error['message']
  assert complete(server, prompt='a', max_tokens=2, temperature=0).status_code == 200


def test_an_engine_failure_is_a_500_and_the_next_request_is_served(server):
  original = server.engine.step

  def broken():
    server.engine.step = original
    raise RuntimeError('injected\nfailure')

  server.runner.call(lambda engine: setattr(engine, 'step', broken)).result()
  response = complete(server, prompt=PROMPT, max_tokens=4, temperature=0)
  assert response.status_code == 500
  error = response.json()['error']
  assert error['type'] == 'server_error' and 'injected failure' in error['message']
  again = complete(server, prompt=PROMPT, max_tokens=4, temperature=0)
  assert again.status_code == 200
  pool = server.runner.call(lambda engine: engine.pool).result()
  assert server.runner.call(lambda engine: engine.pool.available()).result() == (
      pool.num_pages - 1)
