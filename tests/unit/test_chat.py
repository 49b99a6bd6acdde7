"""Chat rendering (lm/chat.py) against transformers' apply_chat_template, and the
assistant mask against transformers' own `{% generation %}` tracking."""

import concurrent.futures
import re
import shutil

import numpy as np
import pytest

from lm import chat
from lm import tokenizer as tokenizer_lib
from lm.errors import ConfigError

from test_hf_tokenizer import (LLAMA3_TEMPLATE, QWEN_TEMPLATE, auto_tokenizer,
                               write_llama3_like, write_qwen_like)

# The same templates with transformers' markers around what the assistant writes: its
# content and end-of-turn token (ChatML's newline after <|im_end|> is the next turn's).
LLAMA3_GENERATION_TEMPLATE = (
    "{% for message in messages %}"
    "{% set header = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' %}"
    "{% if loop.index0 == 0 %}{% set header = bos_token + header %}{% endif %}{{ header }}"
    "{% if message['role'] == 'assistant' %}{% generation %}"
    "{{ message['content'] | trim + '<|eot_id|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] | trim + '<|eot_id|>' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}")
QWEN_GENERATION_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}"
    "{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}{{ '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

CONVERSATIONS = [
    [{'role': 'system', 'content': 'You answer in one line.'},
     {'role': 'user', 'content': 'What is 2 + 2?'},
     {'role': 'assistant', 'content': 'It is 4.'},
     {'role': 'user', 'content': 'And in words? 🙂'},
     {'role': 'assistant', 'content': 'Four — vier, 四.'}],
    [{'role': 'user', 'content': 'Write a function.'},
     {'role': 'assistant', 'content': '\n\ndef f(x):\n    return x + 1\n'},  # Starts with
     {'role': 'user', 'content': '  and   spaces\t'}],                   # newlines.
    [{'role': 'user', 'content': 'Hi'},
     {'role': 'assistant', 'content': ' leading space, then a tail   '},
     {'role': 'user', 'content': 'ok'},
     {'role': 'assistant', 'content': 'x'}],
]


@pytest.fixture(scope='module')
def checkpoints(tmp_path_factory):
  return {'llama3': (write_llama3_like(tmp_path_factory.mktemp('llama3')), LLAMA3_TEMPLATE,
                     LLAMA3_GENERATION_TEMPLATE, '<|eot_id|>'),
          'qwen': (write_qwen_like(tmp_path_factory.mktemp('qwen')), QWEN_TEMPLATE,
                   QWEN_GENERATION_TEMPLATE, '<|im_end|>')}


@pytest.fixture(params=['llama3', 'qwen'])
def checkpoint(request, checkpoints):
  directory, template, generation_template, end_of_turn = checkpoints[request.param]
  return (tokenizer_lib.from_hf_directory(directory), auto_tokenizer(directory),
          generation_template, end_of_turn)


def runs(mask: np.ndarray) -> list[tuple[int, int]]:
  """[(start, end)] of each run of True."""
  edges = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
  return list(zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)))


@pytest.mark.parametrize('add_generation_prompt', [False, True])
@pytest.mark.parametrize('conversation', range(len(CONVERSATIONS)))
def test_render_equals_apply_chat_template(checkpoint, conversation, add_generation_prompt):
  tokenizer, auto, _, _ = checkpoint
  messages = CONVERSATIONS[conversation]
  rendered = chat.render(tokenizer, messages, add_generation_prompt=add_generation_prompt)
  assert rendered.text == auto.apply_chat_template(
      messages, tokenize=False, add_generation_prompt=add_generation_prompt)
  assert rendered.ids.dtype == np.int32 and rendered.ids.tolist() == auto.apply_chat_template(
      messages, tokenize=True, return_dict=False, add_generation_prompt=add_generation_prompt)
  assert rendered.assistant_mask.dtype == np.bool_
  assert rendered.assistant_mask.shape == rendered.ids.shape


@pytest.mark.parametrize('conversation', range(len(CONVERSATIONS)))
def test_assistant_mask_equals_transformers_generation_tracking(checkpoint, conversation):
  tokenizer, auto, generation_template, end_of_turn = checkpoint
  messages = CONVERSATIONS[conversation]
  rendered = chat.render(tokenizer, messages)
  assert auto.apply_chat_template(messages, chat_template=generation_template,
                                  tokenize=False) == rendered.text  # The same template.
  want = auto.apply_chat_template(messages, chat_template=generation_template, tokenize=True,
                                  return_dict=True, return_assistant_tokens_mask=True)
  assert rendered.assistant_mask.astype(int).tolist() == want['assistant_masks']
  # Each run of the mask is one assistant message and its end-of-turn token.
  replies = [m['content'] for m in messages if m['role'] == 'assistant']
  spans = runs(rendered.assistant_mask)
  assert len(spans) == len(replies)
  for (start, end), reply in zip(spans, replies):
    assert rendered.ids[end - 1] == tokenizer.token_to_id(end_of_turn)
    decoded = auto.decode(rendered.ids[start:end].tolist())
    written = (reply.strip() if '| trim' in generation_template else reply) + end_of_turn
    assert decoded.endswith(written)
    assert decoded[:-len(written)].strip() == ''  # At most a header's newline joined in.


def test_generation_prompt_ids_end_where_the_reply_begins(checkpoint):
  tokenizer, _, _, end_of_turn = checkpoint
  messages = CONVERSATIONS[0]
  prompt = chat.render(tokenizer, messages[:-1], add_generation_prompt=True)
  whole = chat.render(tokenizer, messages)
  assert whole.ids[:len(prompt.ids)].tolist() == prompt.ids.tolist()
  assert not prompt.assistant_mask[-3:].any()  # The assistant's header.
  last = len(whole.ids) - 1 - whole.ids[::-1].tolist().index(tokenizer.token_to_id(end_of_turn))
  assert whole.assistant_mask[len(prompt.ids):last + 1].all()  # The reply and its end...
  assert not whole.assistant_mask[last + 1:].any()  # ...but not ChatML's newline after it.
  assert tokenizer.token_to_id(end_of_turn) in chat.end_of_turn_ids(tokenizer)
  assert set(tokenizer.stop_ids) <= set(chat.end_of_turn_ids(tokenizer))


def test_default_template_with_the_byte_tokenizer_ends_turns_with_the_eos_id():
  tokenizer = tokenizer_lib.ByteTokenizer()
  messages = CONVERSATIONS[0]
  rendered = chat.render(tokenizer, messages, add_generation_prompt=True)
  assert rendered.text == (
      '<s><|system|>\nYou answer in one line.</s>\n<|user|>\nWhat is 2 + 2?</s>\n'
      '<|assistant|>\nIt is 4.</s>\n<|user|>\nAnd in words? 🙂</s>\n'
      '<|assistant|>\nFour — vier, 四.</s>\n<|assistant|>\n')
  # Built by hand: text as bytes, bos and eos as their ids, the mask on the replies.
  want_ids, want_mask = [tokenizer.bos_id], [False]
  for message in messages:
    header = tokenizer.encode(f'<|{message["role"]}|>\n').tolist()
    content = tokenizer.encode(message['content']).tolist()
    reply = message['role'] == 'assistant'
    want_ids += header + content + [tokenizer.eos_id] + tokenizer.encode('\n').tolist()
    want_mask += [False] * len(header) + [reply] * (len(content) + 1) + [False]
  want_ids += tokenizer.encode('<|assistant|>\n').tolist()
  want_mask += [False] * (len(want_ids) - len(want_mask))
  assert rendered.ids.tolist() == want_ids
  assert rendered.assistant_mask.tolist() == want_mask
  assert chat.end_of_turn_ids(tokenizer) == (tokenizer.eos_id,)
  for start, end in runs(rendered.assistant_mask):
    assert rendered.ids[end - 1] == tokenizer.eos_id
    assert tokenizer.decode(rendered.ids[start:end]) in ('It is 4.', 'Four — vier, 四.')


def test_default_template_with_a_sentencepiece_model_trained_here(tmp_path):
  tokenizer = tokenizer_lib.train_sentencepiece(
      ['<|user|>\nHello there</s>\n<|assistant|>\nGeneral Kenobi.\n'] * 20, vocab_size=300,
      output_path=str(tmp_path / 'sp.model'))
  messages = [{'role': 'user', 'content': 'Hello there'},
              {'role': 'assistant', 'content': 'General Kenobi.'}]
  rendered = chat.render(tokenizer, messages)
  assert rendered.ids[0] == tokenizer.bos_id
  assert (rendered.ids == tokenizer.eos_id).sum() == 2  # The text '</s>' became the id.
  (start, end), = runs(rendered.assistant_mask)
  assert rendered.ids[end - 1] == tokenizer.eos_id
  assert tokenizer.decode(rendered.ids[start:end]) == 'General Kenobi.'
  assert tokenizer.decode(rendered.ids) == rendered.text.replace('<s>', '').replace('</s>', '')


def test_a_hugging_face_tokenizer_without_a_template_uses_the_default(checkpoints):
  directory = checkpoints['llama3'][0]
  tokenizer = tokenizer_lib.from_hf_directory(directory)
  plain = tokenizer_lib.from_dict({**tokenizer.to_dict(), 'chat_template': None})
  rendered = chat.render(plain, [{'role': 'user', 'content': 'Hi'},
                                 {'role': 'assistant', 'content': 'Yo'}])
  assert rendered.text == '<|begin_of_text|><|user|>\nHi<|eot_id|>\n<|assistant|>\nYo<|eot_id|>\n'
  assert rendered.ids[0] == tokenizer.bos_id
  assert tokenizer.decode(rendered.ids[rendered.assistant_mask]) == 'Yo'
  assert rendered.ids[rendered.assistant_mask][-1] == tokenizer.eos_id


def test_a_template_that_rewrites_earlier_turns_is_refused():
  tokenizer = tokenizer_lib.ByteTokenizer()
  tokenizer.chat_template = ("{% for m in messages %}{{ m['content'] }}"
                             "{% if loop.last %}!{% endif %}{% endfor %}")
  with pytest.raises(ConfigError, match='prefix of the whole conversation'):
    chat.render(tokenizer, CONVERSATIONS[0])


def test_template_errors_and_bad_messages_are_config_errors():
  tokenizer = tokenizer_lib.ByteTokenizer()
  tokenizer.chat_template = "{{ raise_exception('roles must alternate') }}"
  with pytest.raises(ConfigError, match='chat_template failed.*roles must alternate'):
    chat.render(tokenizer, CONVERSATIONS[0])
  tokenizer.chat_template = '{% for m in messages %}'
  with pytest.raises(ConfigError, match='chat_template failed'):
    chat.render(tokenizer, CONVERSATIONS[0])
  tokenizer = tokenizer_lib.ByteTokenizer()
  for messages in ([], [{'role': 'user'}], [{'role': 'user', 'content': 3}], 'hi'):
    with pytest.raises(ConfigError, match='conversation|message 0'):
      chat.render(tokenizer, messages)


@pytest.mark.parametrize('template, message', [
    ('{{ 1 // 0 }}', 'ZeroDivisionError'),
    ('{% macro f(x) %}{{ f(x) }}{% endmacro %}{{ f(1) }}', 'RecursionError'),
    ('{{ range(10**9) | list }}', 'Range too big'),
    ('{% if false %}x{% endif %}', 'renders nothing for this conversation'),
    ("{{ 'x' * 10**10 }}", "'\\*' would make 10,000,000,000 items"),
    ('{{ [0] * 10**10 }}', "'\\*' would make 10,000,000,000 items"),
    ("{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}"
     '{% endfor %}{{ ns.s }}', "'\\+' would make 33,554,432 items"),
    ("{% for i in range(100000) %}{{ 'y' * 1000 }}{% endfor %}",
     'its output passed 16,777,216 characters'),
    ('{{ 2 ** 100000000 }}', "'\\*\\*' with exponent 100000000"),
    ('{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}',
     'it ran past 0.5 s'),
])
def test_a_template_is_bounded_and_its_failures_are_one_config_error(template, message,
                                                                      monkeypatch):
  monkeypatch.setattr(chat, 'MAX_SECONDS', 0.5)
  tokenizer = tokenizer_lib.ByteTokenizer()
  tokenizer.chat_template = template
  tokenizer.chat_template_source = '/models/x/chat_template.jinja'
  with pytest.raises(ConfigError, match='the chat template /models/x/chat_template.jinja'
                                        f' (failed on this conversation: .*)?{message}'):
    chat.render(tokenizer, CONVERSATIONS[0])
  # The watchdog leaves nothing behind: the next rendering, in the same thread, is whole.
  tokenizer.chat_template = None
  assert chat.render(tokenizer, CONVERSATIONS[0]).text.startswith('<s>')


def test_the_watchdog_stops_a_rendering_in_any_thread(monkeypatch):
  """The data pipeline renders in grain's threads, where no signal reaches."""
  monkeypatch.setattr(chat, 'MAX_SECONDS', 0.3)
  tokenizer = tokenizer_lib.ByteTokenizer()
  tokenizer.chat_template = ('{% for i in range(100000) %}{% for j in range(100000) %}'
                             '{% endfor %}{% endfor %}')
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    futures = [pool.submit(chat.render, tokenizer, CONVERSATIONS[0]) for _ in range(2)]
    for future in futures:
      with pytest.raises(ConfigError, match='it ran past 0.3 s'):
        future.result(timeout=60)


def test_a_templates_file_is_named(checkpoints, tmp_path):
  directory = tmp_path / 'llama3'
  shutil.copytree(checkpoints['llama3'][0], directory)
  (directory / 'chat_template.jinja').write_text('{{ 1 // 0 }}')
  tokenizer = tokenizer_lib.from_hf_directory(str(directory))
  with pytest.raises(ConfigError, match=re.escape(
      f'the chat template {directory / "chat_template.jinja"} failed')):
    chat.render(tokenizer, CONVERSATIONS[0])
