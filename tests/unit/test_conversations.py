"""Conversations as post-training data: rendered by the chat template, targets on the
assistant's turns only; the SFT runs on them are in tests/integration/
test_conversation_runs.py."""

import json

import numpy as np
import pytest

from lm import tokenizer as tokenizer_lib
from lm.data import pipeline, sources
from lm.errors import ConfigError

BYTES = tokenizer_lib.ByteTokenizer()
CONVERSATION = [
    {'role': 'system', 'content': 'Be terse.'},
    {'role': 'user', 'content': 'Add 2 and 3.'},
    {'role': 'assistant', 'content': '5'},
    {'role': 'user', 'content': 'And 4 more?'},
    {'role': 'assistant', 'content': '9, café ✓'},
]


def targets(tokens, loss_mask) -> list[str]:
  """The decoded runs of consecutive target tokens, eos shown as '</s>'."""
  runs, current = [], []
  for token, target in zip(tokens, loss_mask):
    if target:
      current.append(int(token))
    elif current:
      runs.append(current)
      current = []
  if current:
    runs.append(current)
  show = lambda run: BYTES.decode(run) + ('</s>' if run[-1] == BYTES.eos_id else '')
  return [show(run) for run in runs]


def test_a_conversation_trains_on_every_assistant_turn_and_its_end_only():
  tokens, loss_mask = pipeline.prompt_and_response(BYTES, CONVERSATION, None)
  assert targets(tokens, loss_mask) == ['5</s>', '9, café ✓</s>']
  assert list(tokens).count(BYTES.bos_id) == 1 and tokens[0] == BYTES.bos_id


def test_a_conversational_pair_trains_on_the_answer_only_with_one_bos_and_no_seam():
  """TRL's conversational preference format: prompt as messages, the answer as an
  assistant message; only the answer is a target (not the prompt's assistant turn)."""
  for answer in ('7', [{'role': 'assistant', 'content': '7'}]):
    tokens, loss_mask = pipeline.prompt_and_response(BYTES, CONVERSATION[:3], answer)
    assert targets(tokens, loss_mask) == ['7</s>']
    assert list(tokens).count(BYTES.bos_id) == 1
    whole, _ = pipeline.prompt_and_response(BYTES, CONVERSATION[:3] + [
        {'role': 'assistant', 'content': '7'}], None)
    np.testing.assert_array_equal(tokens, whole)  # The same text as one conversation.


def test_plain_strings_keep_their_rendering():
  tokens, loss_mask = pipeline.prompt_and_response(BYTES, 'def f():', '  return 1\n', 64)
  expected = [BYTES.bos_id, *BYTES.encode('def f():'), *BYTES.encode('  return 1\n'),
              BYTES.eos_id]
  assert list(tokens) == expected
  assert targets(tokens, loss_mask) == ['  return 1\n</s>']


def test_the_built_in_conversations_ask_for_a_function_then_its_docstring():
  source = sources.stdlib_chats()
  conversations = [example['messages'] for index in range(3) for example in source[index]]
  assert conversations
  for messages in conversations:
    assert [m['role'] for m in messages] == ['user', 'assistant', 'user', 'assistant']
    signature = messages[1]['content'].splitlines()[0]
    assert messages[3]['content'].startswith(signature) and '"""' in messages[3]['content']
    assert '"""' not in messages[1]['content'].splitlines()[1]


def write_lines(path, records):
  path.write_text(''.join(json.dumps(record) + '\n' for record in records))
  return str(path)


@pytest.mark.parametrize('record, named', [
    ({'messages': []}, "field 'messages' is not a non-empty list"),
    ({'messages': [{'role': 'robot', 'content': 'x'}]}, 'message 0'),
    ({'messages': [{'role': 'user', 'content': 1}]}, 'message 0'),
    ({'messages': [{'role': 'user', 'content': 'x'}]}, 'no assistant message'),
])
def test_a_bad_conversation_is_named_at_file_and_line(tmp_path, record, named):
  path = write_lines(tmp_path / 'chats.jsonl', [{'messages': CONVERSATION}, record])
  with pytest.raises(ConfigError, match=f'{path}:2') as error:
    sources.JsonLines([path], ('prompt', 'response'), conversations=True, messages=True)
  assert named in str(error.value)


def test_messages_lines_are_for_sft_only(tmp_path):
  """DPO reads prompt, chosen and rejected: a bare 'messages' line lacks them."""
  path = write_lines(tmp_path / 'pairs.jsonl', [{'messages': CONVERSATION}])
  with pytest.raises(ConfigError, match="has no field 'prompt'"):
    sources.JsonLines([path], ('prompt', 'chosen', 'rejected'), conversations=True)


def test_a_conversation_s_prompt_is_its_turns_before_the_first_reply_rendered():
  """What the end-of-run sample continues (Objective.sample_prompt): the template's text
  up to the assistant's first turn, opened, without the bos the sampler adds."""
  from lm import chat  # pylint: disable=import-outside-toplevel
  from lm.objectives import base  # pylint: disable=import-outside-toplevel
  rendered = chat.render_text(BYTES, CONVERSATION[:2], add_generation_prompt=True)
  text = base.prompt_text({'messages': CONVERSATION}, BYTES)
  assert text == rendered.removeprefix('<s>') and 'Add 2 and 3.' in text and '5' not in text
  assert base.prompt_text({'prompt': CONVERSATION[:2], 'response': 'x'}, BYTES) == text
  assert base.prompt_text({'prompt': 'def f():', 'response': 'x'}, BYTES) == 'def f():'
