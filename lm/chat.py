"""Chat templates: a conversation -> text, token ids and a mask of the assistant's tokens.

`render` fills the tokenizer's Jinja chat template (a Hugging Face checkpoint's own), or
`DEFAULT_TEMPLATE` for lm's byte and sentencepiece tokenizers, the way transformers'
`apply_chat_template` does: a sandboxed environment with trim_blocks, lstrip_blocks and
loop controls; `raise_exception`, `strftime_now` and a `tojson` filter that does not escape
HTML; variables `messages`, `add_generation_prompt`, `tools=None`, `documents=None` and
the tokenizer's named special tokens (`bos_token`, `eos_token`, ...). The text is then
tokenized whole with no bos or eos added (the template writes them), so `ids` equal
`apply_chat_template(messages, tokenize=True, add_generation_prompt=...)`.

Special tokens. The template writes special tokens as text (`{{ eos_token }}`,
'<|eot_id|>'). A Hugging Face tokenizer matches their text itself; for lm's own tokenizers,
which encode every character as text, the text is split at the special tokens' strings
(for the byte tokenizer '<s>', '</s>', '<pad>') and each becomes its id. As in
transformers, a message that contains such a string gets the special id too.

The assistant mask. For each assistant message i, the template renders the conversation
up to message i with the generation prompt (the text up to where the assistant writes)
and up to and including message i; both must be prefixes of the whole rendering (a
template that rewrites earlier turns, such as one that drops past reasoning, breaks this
and is refused), and the characters between them are the message's span. A token is
marked if its characters overlap a span (transformers' rule for `{% generation %}`
blocks: a token that joins the header's last characters to the content's first is
marked), except the tokens after the span's last special token: ChatML writes a newline
after <|im_end|> inside the message, but generation stops at <|im_end|>, so that newline
belongs to the framing of the next turn. The mask is True on each assistant content and
its end-of-turn token(s), never on a role header.

`DEFAULT_TEMPLATE`, for models trained here:

  <s><|system|>
  You are terse.</s>
  <|user|>
  Hi</s>
  <|assistant|>
  Hello.</s>

A template is a program from a checkpoint: it runs sandboxed (no attribute of Python's
internals, no file), within `MAX_SECONDS` per rendering and `MAX_CHARS` of output (and of
any string or list its `*` and `+` build), and any way it fails is one ConfigError naming
its file.

Each turn is a role line, the content, and eos as a real token (the end of a turn is the
end of a document, which every model here has learned to emit); the generation prompt is
'<|assistant|>\\n'. Generation stops at `tokenizer.stop_ids` (see `end_of_turn_ids`).
"""

import ctypes
import dataclasses
import datetime
import functools
import json
import re
import threading
import time

import jinja2
import jinja2.ext
import jinja2.sandbox
import numpy as np

from lm.errors import ConfigError

DEFAULT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}")


@dataclasses.dataclass(frozen=True)
class Rendered:
  text: str
  ids: np.ndarray  # int32 [T]: feed these to generation as they are (they hold bos).
  assistant_mask: np.ndarray  # bool [T]: each assistant content and its end-of-turn.


# A real template renders a conversation in well under a millisecond, into about as many
# characters as the conversation holds.
MAX_SECONDS = 5.0
MAX_CHARS = 1 << 24


class _TooLong(Exception):
  pass


class _TooSlow(BaseException):
  """Raised inside a rendering thread by `_Watchdog`; a BaseException, so no `except
  Exception` in the template's runtime swallows it."""


class _Sandbox(jinja2.sandbox.ImmutableSandboxedEnvironment):
  """jinja2's sandbox, whose `*`, `**` and `+` refuse results past MAX_CHARS before
  building them ('x' * 10**10 would take the memory of the machine)."""
  intercepted_binops = frozenset({'*', '**', '+'})

  def call_binop(self, context, operator, left, right):
    sized = lambda x: isinstance(x, (str, list, tuple))
    if operator == '*' and (sized(left) or sized(right)):
      sequence, times = (left, right) if sized(left) else (right, left)
      if isinstance(times, int) and len(sequence) * times > MAX_CHARS:
        raise _TooLong(f'{operator!r} would make {len(sequence) * times:,} items')
    if operator == '+' and sized(left) and sized(right) and len(left) + len(right) > MAX_CHARS:
      raise _TooLong(f"'+' would make {len(left) + len(right):,} items")
    if operator == '**' and isinstance(right, int) and abs(right) > 1024:
      raise _TooLong(f"'**' with exponent {right}")
    return super().call_binop(context, operator, left, right)


class _Watchdog:
  """Stops renderings past MAX_SECONDS (nested loops that write nothing) by raising
  _TooSlow in their thread: they run in the data pipeline's threads too, where no signal
  reaches. A rendering registers its thread and deadline; the watchdog fires at most once
  per registration, and leaving clears an exception fired too late to land inside."""

  def __init__(self):
    self.lock = threading.Lock()
    self.deadlines: dict[int, float] = {}
    self.thread = None

  def __enter__(self):
    with self.lock:
      self.deadlines[threading.get_ident()] = time.monotonic() + MAX_SECONDS
      if self.thread is None:
        self.thread = threading.Thread(target=self._watch, daemon=True, name='chat-watchdog')
        self.thread.start()

  def __exit__(self, *exc):
    ident = threading.get_ident()
    with self.lock:
      self.deadlines.pop(ident, None)
      ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(ident), None)

  def _watch(self):
    while True:
      time.sleep(0.05)
      with self.lock:
        now = time.monotonic()
        for ident in [i for i, deadline in self.deadlines.items() if deadline < now]:
          del self.deadlines[ident]
          ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(ident),
                                                     ctypes.py_object(_TooSlow))


_WATCHDOG = _Watchdog()


@functools.lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
  def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)

  def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)

  environment = _Sandbox(trim_blocks=True, lstrip_blocks=True,
                         extensions=[jinja2.ext.loopcontrols])
  environment.filters['tojson'] = tojson
  environment.globals['raise_exception'] = raise_exception
  environment.globals['strftime_now'] = lambda format: datetime.datetime.now().strftime(format)
  return environment.from_string(template)


def _template_of(tokenizer) -> tuple[str, str]:
  """(template, what to call it in an error: its file where the tokenizer knows it)."""
  if tokenizer.chat_template is None:
    return DEFAULT_TEMPLATE, 'lm.chat.DEFAULT_TEMPLATE'
  source = getattr(tokenizer, 'chat_template_source', None)
  return tokenizer.chat_template, (f'the chat template {source}' if source else
                                   f"the {tokenizer.kind} tokenizer's chat_template")


def render_text(tokenizer, messages: list[dict], *, add_generation_prompt: bool = False) -> str:
  """The template's text for `messages` ({'role', 'content'} dicts)."""
  template, name = _template_of(tokenizer)
  chunks, size = [], 0
  try:
    try:
      with _WATCHDOG:
        for chunk in _compile(template).generate(
            messages=[dict(message) for message in messages],
            add_generation_prompt=add_generation_prompt, tools=None, documents=None,
            **tokenizer.special_tokens):
          size += len(chunk)
          if size > MAX_CHARS:
            raise _TooLong(f'its output passed {MAX_CHARS:,} characters')
          chunks.append(chunk)
    except _TooSlow as error:
      raise _TooLong(f'it ran past {MAX_SECONDS:g} s') from error
  except (_TooLong, jinja2.TemplateError) as error:
    raise ConfigError(f'{name} failed on this conversation: {error}') from error
  except (RecursionError, MemoryError) as error:
    raise ConfigError(f'{name} failed on this conversation: {type(error).__name__}') from error
  except Exception as error:  # pylint: disable=broad-except (1 // 0, [] + 1, ...)
    raise ConfigError(f'{name} failed on this conversation: {type(error).__name__}:'
                      f' {str(error)[:200]}') from error
  if messages and not any(chunks):
    raise ConfigError(f'{name} renders nothing for this conversation')
  return ''.join(chunks)


def _check_messages(messages) -> None:
  if not isinstance(messages, (list, tuple)) or not messages:
    raise ConfigError(f'a conversation is a non-empty list of messages, not {messages!r:.80}')
  for i, message in enumerate(messages):
    if not (isinstance(message, dict) and isinstance(message.get('role'), str)
            and isinstance(message.get('content'), str)):
      raise ConfigError(f'message {i} must be a dict with string "role" and "content",'
                        f' not {message!r:.80}')


def _encode(tokenizer, text: str) -> tuple[np.ndarray, np.ndarray]:
  """(ids [T], offsets [T, 2]) of rendered text, its special tokens' strings as their ids."""
  if tokenizer.matches_special_tokens:
    return tokenizer.encode_with_offsets(text)
  special = {token: tokenizer.token_to_id(token) for token in tokenizer.special_tokens.values()}
  special = {token: i for token, i in special.items() if i in tokenizer.special_ids}
  pattern = '|'.join(map(re.escape, sorted(special, key=len, reverse=True)))
  ids, offsets, start = [], [], 0
  for match in re.finditer(pattern, text) if pattern else ():
    if match.start() > start:
      piece_ids, piece_offsets = tokenizer.encode_with_offsets(text[start:match.start()])
      ids.append(piece_ids)
      offsets.append(piece_offsets + start)
    ids.append(np.asarray([special[match.group()]], np.int32))
    offsets.append(np.asarray([[match.start(), match.end()]], np.int32))
    start = match.end()
  if start < len(text):
    piece_ids, piece_offsets = tokenizer.encode_with_offsets(text[start:])
    ids.append(piece_ids)
    offsets.append(piece_offsets + start)
  if not ids:
    return np.zeros(0, np.int32), np.zeros((0, 2), np.int32)
  return np.concatenate(ids).astype(np.int32), np.concatenate(offsets).astype(np.int32)


def _assistant_spans(tokenizer, messages, text: str) -> list[tuple[int, int]]:
  """[(start, end)] characters of `text` of each assistant message and its end-of-turn."""
  _, name = _template_of(tokenizer)
  spans = []
  for i, message in enumerate(messages):
    if message['role'] != 'assistant':
      continue
    before = render_text(tokenizer, messages[:i], add_generation_prompt=True)
    through = render_text(tokenizer, messages[:i + 1])
    if not (text.startswith(before) and text.startswith(through)
            and len(before) <= len(through)):
      raise ConfigError(
          f'{name} does not render the conversation up to message {i} as a prefix of the'
          ' whole conversation, so the assistant\'s tokens cannot be located')
    spans.append((len(before), len(through)))
  return spans


def render(tokenizer, messages: list[dict], *, add_generation_prompt: bool = False) -> Rendered:
  """`messages` ({'role': 'system'|'user'|'assistant', 'content': str}) rendered and
  tokenized, with the assistant mask (see the module docstring). With
  `add_generation_prompt`, `ids` end where the assistant's reply begins."""
  _check_messages(messages)
  text = render_text(tokenizer, messages, add_generation_prompt=add_generation_prompt)
  ids, offsets = _encode(tokenizer, text)
  starts = offsets[:, 0]
  ends = np.maximum(offsets[:, 1], starts + 1)  # A token with no characters covers its place.
  mask = np.zeros(len(ids), np.bool_)
  for start, end in _assistant_spans(tokenizer, messages, text):
    inside = np.flatnonzero((starts < end) & (ends > start))
    special = inside[np.isin(ids[inside], list(tokenizer.special_ids))]
    if len(special):
      inside = inside[inside <= special[-1]]
    mask[inside] = True
  return Rendered(text=text, ids=ids, assistant_mask=mask)


def prompt_text(tokenizer, messages: list[dict]) -> str:
  """`messages` rendered with the assistant's turn opened, as text for a sampler or scorer
  that encodes it with `prompt_ids`: without the template's leading bos text where the
  tokenizer adds bos itself (so there is one bos, as transformers' apply_chat_template)."""
  text = render_text(tokenizer, messages, add_generation_prompt=True)
  bos = tokenizer.special_tokens.get('bos_token') or ''
  return text[len(bos):] if tokenizer.adds_bos and bos and text.startswith(bos) else text


def end_of_turn_ids(tokenizer) -> tuple[int, ...]:
  """`tokenizer.stop_ids` and the special tokens that end an assistant turn in its
  template (found by rendering a probe conversation): what stops a chat reply."""
  probe = [{'role': 'user', 'content': 'Hi'}, {'role': 'assistant', 'content': 'Hello'}]
  rendered = render(tokenizer, probe)
  ends = [int(i) for i in rendered.ids[rendered.assistant_mask] if int(i) in tokenizer.special_ids]
  return tuple(dict.fromkeys((*tokenizer.stop_ids, *ends[-1:])))
