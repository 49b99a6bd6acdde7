"""The OpenAI API over a run, as a FastAPI app (`make_app`; experiments/serve.py serves it
with uvicorn):

  POST /v1/completions       prompt: a string, strings, token ids or lists of them;
                             `echo` and `logprobs` as OpenAI's legacy completions gave them
  POST /v1/chat/completions  messages rendered by the run's chat template (lm/chat.py),
                             stopped at its end of turn
  GET  /v1/models            the one model served
  GET  /tokenizer_info, POST /tokenize, /detokenize   vLLM's tokenizer endpoints, which
                             lm-evaluation-harness's local-completions reads to tokenize
                             as the server does

Both generation endpoints stream (server-sent events, `data: {...}` chunks ending
`data: [DONE]`) or answer whole, with `usage`; `n` choices are each their own engine
request with seed + i; `stop`, `max_tokens`, `temperature`, `top_p`, `seed`, and `top_k`
as an extension. Log-probabilities come from a plain forward pass (lm/serving/logprobs.py),
not the engine.

Every bad request is answered 4xx in OpenAI's error shape, {"error": {"message", "type",
"param", "code"}}, with a one-line message; the server goes on serving. A client that
disconnects cancels its requests, and the engine frees their pages.
"""

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import json
import math
import secrets
import time
import uuid

import fastapi
from fastapi import responses
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException

from lm import chat, sampling
from lm.engine.engine import SamplingParams
from lm.errors import ConfigError, check_utf8
from lm.serving import logprobs as logprobs_lib
from lm.serving.runner import Failure

MAX_CHOICES = 128  # Prompts times n in one request.
MAX_STOPS = 16
_WINDOW = 6  # Tokens of context each token's text is decoded in (see _Pieces).


@dataclasses.dataclass(frozen=True)
class Served:
  """What the app serves: the run's model, params (on `mesh`) and tokenizer under `name`,
  in a context of `max_length` tokens (prompt and completion)."""
  name: str
  model: object
  params: object
  tokenizer: object
  mesh: object
  max_length: int


class ApiError(Exception):
  """A bad request: answered with `status` and OpenAI's error body."""

  def __init__(self, message: str, param: str | None = None, status: int = 400,
               kind: str = 'invalid_request_error'):
    super().__init__(message)
    self.message, self.param, self.status, self.kind = message, param, status, kind


def error_body(message: str, param: str | None = None,
               kind: str = 'invalid_request_error') -> dict:
  return {'error': {'message': ' '.join(message.split()), 'type': kind, 'param': param,
                    'code': None}}


def _error_response(error: ApiError) -> responses.JSONResponse:
  return responses.JSONResponse(error_body(error.message, error.param, error.kind),
                                status_code=error.status)


def _failure_error(failure: Failure) -> ApiError:
  kind = 'invalid_request_error' if failure.status < 500 else 'server_error'
  return ApiError(failure.message, status=failure.status, kind=kind)


# Request fields. A field given as null takes its default, as OpenAI's API does.

def _shown(value) -> str:
  text = json.dumps(value)
  return text if len(text) <= 40 else text[:37] + '...'


def _integer(body: dict, name: str, default, *, at_least=None, at_most=None):
  value = body.get(name)
  if value is None:
    return default
  if isinstance(value, bool) or not isinstance(value, int):
    raise ApiError(f'{name}={_shown(value)} must be an integer', name)
  if at_least is not None and value < at_least:
    raise ApiError(f'{name}={value} must be at least {at_least}', name)
  if at_most is not None and value > at_most:
    raise ApiError(f'{name}={value} must be at most {at_most}', name)
  return value


def _number(body: dict, name: str, default: float, *, at_least=None, above=None,
            at_most=None) -> float:
  value = body.get(name)
  if value is None:
    return default
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
    raise ApiError(f'{name}={_shown(value)} must be a finite number', name)
  if at_least is not None and value < at_least:
    raise ApiError(f'{name}={value} must be at least {at_least}', name)
  if above is not None and value <= above:
    raise ApiError(f'{name}={value} must be above {above}', name)
  if at_most is not None and value > at_most:
    raise ApiError(f'{name}={value} must be at most {at_most}', name)
  return float(value)


def _boolean(body: dict, name: str, default: bool) -> bool:
  value = body.get(name)
  if value is None:
    return default
  if not isinstance(value, bool):
    raise ApiError(f'{name}={_shown(value)} must be true or false', name)
  return value


def _stops(body: dict) -> tuple[str, ...]:
  value = body.get('stop')
  if value is None:
    return ()
  stops = [value] if isinstance(value, str) else value
  if not (isinstance(stops, list) and all(isinstance(s, str) and s for s in stops)):
    raise ApiError(f'stop={_shown(value)} must be a non-empty string or a list of them', 'stop')
  if len(stops) > MAX_STOPS:
    raise ApiError(f'stop holds {len(stops)} strings; at most {MAX_STOPS}', 'stop')
  return tuple(dict.fromkeys(stops))


def _refuse_unsupported(body: dict, names: tuple[str, ...]) -> None:
  """Options this server does not implement are refused when set to anything but their
  neutral value, rather than ignored."""
  neutral = {'presence_penalty': (0, 0.0), 'frequency_penalty': (0, 0.0), 'logit_bias': ({},),
             'suffix': ('',), 'tools': ([],), 'functions': ([],), 'tool_choice': ('none',),
             'response_format': ({'type': 'text'},)}
  for name in names:
    value = body.get(name)
    if value is not None and value not in neutral[name]:
      raise ApiError(f'{name} is not supported by this server', name)


@dataclasses.dataclass
class _Options:
  """What every generation request shares."""
  n: int
  stream: bool
  include_usage: bool
  temperature: float
  top_p: float
  top_k: int
  seed: int
  stops: tuple[str, ...]

  def params(self, max_tokens: int, choice: int, stop_ids=None) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=self.temperature, top_k=self.top_k,
                          top_p=self.top_p, seed=(self.seed + choice) % 2**31, stop=self.stops,
                          stop_ids=stop_ids)


def _options(body: dict, vocab_size: int) -> _Options:
  stream = _boolean(body, 'stream', False)
  stream_options = body.get('stream_options')
  if stream_options is not None and not (stream and isinstance(stream_options, dict)):
    raise ApiError('stream_options must be an object, with stream true', 'stream_options')
  include_usage = _boolean(stream_options or {}, 'include_usage', False)
  top_k = _integer(body, 'top_k', 0, at_least=-1, at_most=vocab_size)  # -1: off, as in vLLM.
  seed = _integer(body, 'seed', None)
  return _Options(
      n=_integer(body, 'n', 1, at_least=1, at_most=MAX_CHOICES), stream=stream,
      include_usage=include_usage,
      temperature=_number(body, 'temperature', 1.0, at_least=0, at_most=2),
      top_p=_number(body, 'top_p', 1.0, above=0, at_most=1), top_k=max(top_k, 0),
      # No seed: a fresh one, so two requests sample differently (as OpenAI's do); the
      # engine's seeds are in [0, 2**31).
      seed=secrets.randbelow(2**31) if seed is None else seed % 2**31, stops=_stops(body))


async def _json_body(request: fastapi.Request) -> dict:
  raw = await request.body()
  try:
    body = json.loads(raw)
  except (ValueError, RecursionError) as error:
    raise ApiError(f'the request body is not valid JSON: {error}') from error
  if not isinstance(body, dict):
    raise ApiError('the request body must be a JSON object')
  try:
    check_utf8('the request body', body)
  except ConfigError as error:
    raise ApiError(str(error)) from error
  return body


class _Pieces:
  """The text of each token in a sequence, as OpenAI's `tokens` and `text_offset` give it:
  each token decoded after the _WINDOW tokens before it (a sentencepiece token's leading
  space shows only after another token; a byte of a longer UTF-8 character is text only
  with the rest), counted by how far it moves the decoded text."""

  def __init__(self, tokenizer):
    self.tokenizer = tokenizer
    self.special = {}
    for text in tokenizer.special_tokens.values():
      token = tokenizer.token_to_id(text)
      if token in tokenizer.special_ids:
        self.special[token] = text

  def alone(self, token: int) -> str:
    """A token's own text where it adds none in context: a special token's name; a byte
    as tiktoken's API names one ('bytes:\\xe2')."""
    if token in self.special:
      return self.special[token]
    text = self.tokenizer.decode([token])
    if '\ufffd' in text and self.tokenizer.kind == 'byte':
      return f'bytes:\\x{token - 3:02x}'
    return text

  def piece(self, before: list[int], token: int) -> tuple[str, int]:
    """(the token's text after `before`, how many characters it adds to the text)."""
    context = self.tokenizer.decode(before[-_WINDOW:])
    grown = self.tokenizer.decode(before[-_WINDOW:] + [token])
    added = grown[len(context):] if grown.startswith(context) else ''
    shown = added if added and '\ufffd' not in added else self.alone(token)
    return shown, len(grown) - len(context)

  def sequence(self, ids: list[int], start: int = 0) -> tuple[list[str], list[int]]:
    """(text of each of ids[start:], its character offset in the decoded ids[start:])."""
    tokens, offsets, offset = [], [], 0
    for i in range(start, len(ids)):
      text, added = self.piece(ids[start:i], ids[i])
      tokens.append(text)
      offsets.append(offset)
      offset += added
    return tokens, offsets


@dataclasses.dataclass
class _Choice:
  token_ids: list[int] = dataclasses.field(default_factory=list)
  text: str = ''
  finish_reason: str | None = None


def make_app(runner, served: Served) -> fastapi.FastAPI:
  """The API over `runner` (a started lm.serving.runner.Runner over the engine) and the
  run in `served`."""
  tokenizer = served.tokenizer
  end_of_turn = chat.end_of_turn_ids(tokenizer)
  pieces = _Pieces(tokenizer)
  # Log-probabilities' forward passes, one at a time, off the event loop.
  forward = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix='lm-logprobs')

  app = fastapi.FastAPI(title='lm', docs_url=None, redoc_url=None, openapi_url=None)

  @app.exception_handler(ApiError)
  async def api_error(request, error: ApiError):
    del request
    return _error_response(error)

  @app.exception_handler(HTTPException)
  async def http_error(request, error: HTTPException):  # Unknown paths, wrong methods.
    del request
    message = f'{error.detail}' if error.status_code != 404 else 'no such endpoint'
    return _error_response(ApiError(message, status=error.status_code))

  @app.exception_handler(RequestValidationError)
  async def validation_error(request, error: RequestValidationError):
    del request
    return _error_response(ApiError(str(error).splitlines()[0]))

  @app.exception_handler(Exception)
  async def server_error(request, error: Exception):
    del request
    return _error_response(ApiError(f'internal error: {type(error).__name__}: {error}',
                                    status=500, kind='server_error'))

  def check_model(body: dict) -> None:
    name = body.get('model')
    if name is None:
      raise ApiError("missing required field 'model'", 'model')
    if name != served.name:
      raise ApiError(f'the model {_shown(name)} does not exist; this server serves'
                     f' {served.name!r}', 'model', status=404)

  def check_length(ids: list[int], max_tokens: int, param: str) -> None:
    if len(ids) + max_tokens > served.max_length:
      raise ApiError(f"this model's context is {served.max_length} tokens: the prompt's"
                     f' {len(ids)} and max_tokens={max_tokens} do not fit', param)

  def model_card() -> dict:
    return {'id': served.name, 'object': 'model', 'created': 0, 'owned_by': 'lm',
            'max_model_len': served.max_length}

  @app.get('/v1/models')
  async def models():
    return {'object': 'list', 'data': [model_card()]}

  @app.get('/v1/models/{name:path}')
  async def model(name: str):
    if name != served.name:
      raise ApiError(f'the model {_shown(name)} does not exist; this server serves'
                     f' {served.name!r}', 'model', status=404)
    return model_card()

  @app.get('/health')
  async def health():
    return {}

  @app.get('/tokenizer_info')
  async def tokenizer_info():
    template = tokenizer.chat_template or chat.DEFAULT_TEMPLATE
    return {**{name: tokenizer.special_tokens.get(name)
               for name in ('bos_token', 'eos_token', 'pad_token')},
            'chat_template': template, 'model_max_length': served.max_length,
            'tokenizer_class': tokenizer.kind}

  @app.post('/tokenize')
  async def tokenize(request: fastapi.Request):
    body = await _json_body(request)
    text = body.get('prompt')
    if not isinstance(text, str):
      raise ApiError('prompt must be a string', 'prompt')
    # Special tokens' strings are their ids, as a Hugging Face tokenizer (vLLM's) reads them.
    ids = [int(i) for i in chat._encode(tokenizer, text)[0]]  # pylint: disable=protected-access
    if _boolean(body, 'add_special_tokens', True) and tokenizer.adds_bos:
      ids = [tokenizer.bos_id] + ids
    return {'tokens': ids, 'count': len(ids), 'max_model_len': served.max_length}

  @app.post('/detokenize')
  async def detokenize(request: fastapi.Request):
    body = await _json_body(request)
    return {'prompt': tokenizer.decode(token_ids(body.get('tokens'), 'tokens'))}

  def token_ids(value, param: str) -> list[int]:
    if not (isinstance(value, list) and all(isinstance(i, int) and not isinstance(i, bool)
                                            for i in value)):
      raise ApiError(f'{param} must be a list of token ids', param)
    bad = [i for i in value if not 0 <= i < tokenizer.vocab_size]
    if bad:
      raise ApiError(f'{param} holds token id {bad[0]}, outside the vocabulary'
                     f' [0, {tokenizer.vocab_size})', param)
    return value

  def prompts_of(body: dict) -> list[tuple[list[int], str]]:
    """(ids, text) of each prompt."""
    prompt = body.get('prompt')
    if prompt is None:
      raise ApiError("missing required field 'prompt'", 'prompt')
    if isinstance(prompt, str):
      return [(sampling.prompt_ids(tokenizer, prompt), prompt)]
    if isinstance(prompt, list) and prompt:
      if all(isinstance(p, str) for p in prompt):
        return [(sampling.prompt_ids(tokenizer, p), p) for p in prompt]
      if all(isinstance(p, int) for p in prompt):
        ids = token_ids(prompt, 'prompt')
        return [(ids, tokenizer.decode(ids))]
      if all(isinstance(p, list) and p for p in prompt):
        return [(token_ids(p, 'prompt'), tokenizer.decode(p)) for p in prompt]
    raise ApiError('prompt must be a string, a list of strings, a list of token ids or a list'
                   ' of non-empty lists of token ids', 'prompt')

  async def merged(jobs):
    """(job index, Output or Failure) of several engine requests as they come; leaving
    early cancels those not finished."""
    queue = asyncio.Queue()

    async def pump(index, ids, params):
      try:
        async with contextlib.aclosing(runner.generate(ids, params)) as outputs:
          async for output in outputs:
            queue.put_nowait((index, output))
      except Failure as failure:
        queue.put_nowait((index, failure))

    tasks = [asyncio.create_task(pump(i, ids, params)) for i, (ids, params) in enumerate(jobs)]
    remaining = len(jobs)
    try:
      while remaining:
        index, item = await queue.get()
        remaining -= isinstance(item, Failure) or item.finished
        yield index, item
    finally:
      for task in tasks:
        task.cancel()

  async def run_whole(request: fastapi.Request, jobs) -> list[_Choice]:
    """Every job to its end, or a 4xx/5xx; a client that leaves cancels them."""
    choices = [_Choice() for _ in jobs]

    async def collect():
      async with contextlib.aclosing(merged(jobs)) as items:
        async for index, item in items:
          if isinstance(item, Failure):
            raise _failure_error(item)
          choice = choices[index]
          choice.token_ids += item.token_ids
          choice.text += item.text
          choice.finish_reason = item.finish_reason if item.finished else None

    task = asyncio.create_task(collect())
    while not task.done():
      await asyncio.wait({task}, timeout=0.5)
      if not task.done() and await request.is_disconnected():
        task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
      await task  # Raises an ApiError it raised.
    return choices

  def usage(prompt_tokens: int, choices) -> dict:
    completion_tokens = sum(len(c.token_ids) for c in choices)
    return {'prompt_tokens': prompt_tokens, 'completion_tokens': completion_tokens,
            'total_tokens': prompt_tokens + completion_tokens}

  def sse(chunk) -> str:
    return f'data: {json.dumps(chunk, ensure_ascii=False)}\n\n'

  def stream_response(events) -> responses.StreamingResponse:
    return responses.StreamingResponse(events, media_type='text/event-stream',
                                       headers={'Cache-Control': 'no-cache'})

  async def stream_events(jobs, head: dict, chunk, prompt_tokens: int, include_usage: bool,
                          first=None):
    """SSE of `jobs`: chunk(index, text, finish_reason) per Output that adds text or
    finishes, `first` chunks before, usage last if asked, then [DONE]."""
    choices = [_Choice() for _ in jobs]
    for item in first or ():
      yield sse({**head, **item})
    async with contextlib.aclosing(merged(jobs)) as items:
      async for index, item in items:
        if isinstance(item, Failure):
          error = _failure_error(item)
          yield sse(error_body(error.message, kind=error.kind))
          break
        choices[index].token_ids += item.token_ids
        if item.text or item.finished:
          yield sse({**head, 'choices': [chunk(index, item.text, item.finish_reason
                                               if item.finished else None)]})
    if include_usage:
      yield sse({**head, 'choices': [], 'usage': usage(prompt_tokens, choices)})
    yield 'data: [DONE]\n\n'

  async def log_probs_of(sequences: list[list[int]]):
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(forward, lambda: logprobs_lib.sequence_log_probs(
        served.model, served.params, served.mesh, sequences, max_length=served.max_length))

  def legacy_logprobs(ids: list[int], start: int, scored, top: int) -> dict:
    """OpenAI's legacy completions `logprobs` of ids[start:] (the first token, with no
    token before it, has null ones)."""
    picked, top_values, top_ids = scored
    tokens, offsets = pieces.sequence(ids, start)
    token_logprobs, top_logprobs = [], []
    for i in range(start, len(ids)):
      if i == 0:
        token_logprobs.append(None)
        top_logprobs.append(None)
        continue
      token_logprobs.append(float(picked[i - 1]))
      alternatives = {}
      for value, token in zip(top_values[i - 1, :top], top_ids[i - 1, :top]):
        alternatives.setdefault(pieces.piece(ids[start:i], int(token))[0], float(value))
      top_logprobs.append(alternatives)
    return {'tokens': tokens, 'token_logprobs': token_logprobs, 'top_logprobs': top_logprobs,
            'text_offset': offsets}

  @app.post('/v1/completions')
  async def completions(request: fastapi.Request):
    body = await _json_body(request)
    check_model(body)
    prompts = prompts_of(body)
    options = _options(body, tokenizer.vocab_size)
    max_tokens = _integer(body, 'max_tokens', 16, at_least=0)
    echo = _boolean(body, 'echo', False)
    top = _integer(body, 'logprobs', None, at_least=0, at_most=logprobs_lib.MAX_TOP)
    _refuse_unsupported(body, ('presence_penalty', 'frequency_penalty', 'logit_bias', 'suffix'))
    best_of = _integer(body, 'best_of', options.n, at_least=1)
    if best_of != options.n:
      raise ApiError('best_of other than n is not supported by this server', 'best_of')
    if len(prompts) * options.n > MAX_CHOICES:
      raise ApiError(f'{len(prompts)} prompts times n={options.n} is more than {MAX_CHOICES}'
                     ' choices', 'n')
    if options.stream and top is not None:
      raise ApiError('logprobs is not supported with stream', 'logprobs')
    for ids, _ in prompts:
      check_length(ids, max_tokens, 'prompt')
    jobs = [(ids, options.params(max_tokens, j)) for ids, _ in prompts for j in range(options.n)]
    texts = [text for _, text in prompts for _ in range(options.n)]
    prompt_tokens = sum(len(ids) for ids, _ in prompts)
    head = {'id': f'cmpl-{uuid.uuid4().hex}', 'object': 'text_completion',
            'created': int(time.time()), 'model': served.name}

    def chunk(index, text, finish_reason):
      return {'index': index, 'text': text, 'logprobs': None, 'finish_reason': finish_reason}

    if options.stream:
      first = [{'choices': [chunk(i, text, None)]} for i, text in enumerate(texts)] if echo else []
      if max_tokens == 0:
        first += [{'choices': [chunk(i, '', 'length')]} for i in range(len(jobs))]
        jobs = []
      return stream_response(stream_events(jobs, head, chunk, prompt_tokens,
                                           options.include_usage, first))
    if max_tokens == 0:
      choices = [_Choice(finish_reason='length') for _ in jobs]
    else:
      choices = await run_whole(request, jobs)
    scored = [None] * len(jobs)
    if top is not None:
      scored = await log_probs_of([ids + c.token_ids for (ids, _), c in zip(jobs, choices)])
    results = []
    for index, ((ids, _), choice, text, score) in enumerate(zip(jobs, choices, texts, scored)):
      logprobs = None
      if top is not None:
        logprobs = legacy_logprobs(ids + choice.token_ids, 0 if echo else len(ids), score, top)
      results.append(chunk(index, (text if echo else '') + choice.text, choice.finish_reason))
      results[-1]['logprobs'] = logprobs
    return {**head, 'choices': results, 'usage': usage(prompt_tokens, choices)}

  def messages_of(body: dict) -> list[dict]:
    messages = body.get('messages')
    if messages is None:
      raise ApiError("missing required field 'messages'", 'messages')
    if not isinstance(messages, list) or not messages:
      raise ApiError('messages must be a non-empty list', 'messages')
    plain = []
    for i, message in enumerate(messages):
      if not isinstance(message, dict) or not isinstance(message.get('role'), str):
        raise ApiError(f'messages[{i}] must be an object with a string role', 'messages')
      content = message.get('content')
      if isinstance(content, list):  # Content parts: only text ones here.
        if not all(isinstance(p, dict) and p.get('type') == 'text'
                   and isinstance(p.get('text'), str) for p in content):
          raise ApiError(f'messages[{i}].content: only text parts are supported', 'messages')
        content = ''.join(p['text'] for p in content)
      if content is None and message['role'] == 'assistant':
        content = ''
      if not isinstance(content, str):
        raise ApiError(f'messages[{i}].content must be a string or a list of text parts',
                       'messages')
      plain.append({'role': message['role'], 'content': content})
    return plain

  @app.post('/v1/chat/completions')
  async def chat_completions(request: fastapi.Request):
    body = await _json_body(request)
    check_model(body)
    messages = messages_of(body)
    options = _options(body, tokenizer.vocab_size)
    _refuse_unsupported(body, ('presence_penalty', 'frequency_penalty', 'logit_bias', 'tools',
                               'functions', 'tool_choice', 'response_format'))
    if _boolean(body, 'logprobs', False):
      raise ApiError('logprobs is not supported for chat completions by this server',
                     'logprobs')
    try:
      ids = [int(i) for i in chat.render(tokenizer, messages, add_generation_prompt=True).ids]
    except ConfigError as error:
      raise ApiError(str(error), 'messages') from error
    name = 'max_completion_tokens' if body.get('max_completion_tokens') is not None else (
        'max_tokens')
    # Default: the rest of the context (at least 1, so a prompt that fills it is refused).
    max_tokens = _integer(body, name, max(served.max_length - len(ids), 1), at_least=1)
    check_length(ids, max_tokens, 'messages')
    jobs = [(ids, options.params(max_tokens, j, end_of_turn)) for j in range(options.n)]
    head = {'id': f'chatcmpl-{uuid.uuid4().hex}', 'object': 'chat.completion',
            'created': int(time.time()), 'model': served.name}
    if options.stream:
      head['object'] = 'chat.completion.chunk'

      def chunk(index, text, finish_reason):
        delta = {'content': text} if text else {}
        return {'index': index, 'delta': delta, 'logprobs': None, 'finish_reason': finish_reason}

      first = [{'choices': [{'index': i, 'delta': {'role': 'assistant', 'content': ''},
                             'logprobs': None, 'finish_reason': None}]} for i in range(len(jobs))]
      return stream_response(stream_events(jobs, head, chunk, len(ids), options.include_usage,
                                           first))
    choices = await run_whole(request, jobs)
    return {**head, 'choices': [
        {'index': i, 'message': {'role': 'assistant', 'content': c.text}, 'logprobs': None,
         'finish_reason': c.finish_reason} for i, c in enumerate(choices)],
            'usage': usage(len(ids), choices)}

  app.state.runner, app.state.served = runner, served
  return app
