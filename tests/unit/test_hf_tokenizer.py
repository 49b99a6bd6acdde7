"""Hugging Face tokenizers (lm/interop/hf_tokenizer.py, opened by lm/tokenizer.py's
`from_hf_directory`) against transformers' AutoTokenizer, on checkpoint directories built
here from tokenizers trained on the spot (offline)."""

import inspect
import io
import json
import json.decoder
import os
import random
import shutil

import ml_collections
import numpy as np
import pytest
import sentencepiece as spm
import tokenizers
from tokenizers import pre_tokenizers, processors

from lm import tokenizer as tokenizer_lib
from lm.errors import ConfigError
from lm.interop import hf_tokenizer

import transformers  # noqa: E402 (CI installs it: these tests never skip)

LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
               r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# Meta's Llama 3 Instruct template.
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}")
# Qwen2 Instruct's ChatML template, laid out on lines that only trim_blocks and
# lstrip_blocks (transformers' settings) keep out of the text.
QWEN_TEMPLATE = """{% for message in messages %}
  {% if loop.first and messages[0]['role'] != 'system' %}
{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}
{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}
  {% if add_generation_prompt %}
{{ '<|im_start|>assistant\n' }}{% endif %}
"""


def mixed_lines() -> list[str]:
  """A few hundred lines: code, prose, accents, CJK, emoji and runs of whitespace."""
  code = inspect.getsource(json.decoder).splitlines()
  samples = ['Hello, world!', "It's 3.14159 o'clock; we'll see.", 'naïve café — déjà vu',
             '漢字とかなの混じった文です。', '中文分词测试：你好，世界！', '🙂🚀 emoji 👩‍👩‍👧 ✨',
             '\ttab\tseparated\tvalues', '    four spaces', '  two', 'trailing   ',
             'x  =   1\t\t# comment', 'a\n\nb\n', '\r\nwindows line\r\n', 'ÅÄÖ åäö ß Ω ∑ ∞',
             '𝄞 musical', 'mixed漢字and English', '1234567890 12 345', '', ' ', '\n']
  rng = random.Random(0)
  words = [word for line in samples + code[:60] for word in line.split()]
  glued = [''.join(rng.choice(words) + rng.choice([' ', '  ', '\t', '\n', '   \n', ''])
                   for _ in range(rng.randint(1, 12))) for _ in range(150)]
  return samples + code + glued


LINES = mixed_lines()


def train_bpe(regex: str, specials: list[str], *, nfc: bool = False) -> tokenizers.Tokenizer:
  """A byte-level BPE of about 500 ids pre-tokenized like Llama 3 or Qwen2."""
  tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE())
  if nfc:
    tokenizer.normalizer = tokenizers.normalizers.NFC()
  tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(tokenizers.Regex(regex), behavior='isolated', invert=False),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  tokenizer.decoder = tokenizers.decoders.ByteLevel()
  trainer = tokenizers.trainers.BpeTrainer(
      vocab_size=500, special_tokens=specials, show_progress=False,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  # Whole blocks too, so that newline runs merge (a run can join a chat header to a reply).
  blocks = ['\n\n'.join(LINES[start:start + 5]) for start in range(0, len(LINES), 5)]
  tokenizer.train_from_iterator(LINES * 2 + blocks, trainer)
  return tokenizer


def write_json(path, data) -> None:
  with open(path, 'w', encoding='utf-8') as f:
    json.dump(data, f)


def write_llama3_like(directory) -> str:
  """Llama 3 Instruct's layout: bos <|begin_of_text|> added by the post-processor, eos
  <|eot_id|>, no pad, <|end_of_text|> another stop id in generation_config.json."""
  tokenizer = train_bpe(LLAMA3_REGEX, ['<|begin_of_text|>', '<|end_of_text|>',
                                       '<|start_header_id|>', '<|end_header_id|>',
                                       '<|eot_id|>'])
  bos = tokenizer.token_to_id('<|begin_of_text|>')
  tokenizer.post_processor = processors.Sequence([
      processors.ByteLevel(trim_offsets=False),
      processors.TemplateProcessing(single='<|begin_of_text|> $A',
                                    pair='<|begin_of_text|> $A <|begin_of_text|> $B:1',
                                    special_tokens=[('<|begin_of_text|>', bos)])])
  os.makedirs(directory, exist_ok=True)
  tokenizer.save(os.path.join(directory, 'tokenizer.json'))
  write_json(os.path.join(directory, 'tokenizer_config.json'), {
      'tokenizer_class': 'PreTrainedTokenizerFast', 'model_max_length': 131072,
      'bos_token': {'content': '<|begin_of_text|>', '__type': 'AddedToken'},
      'eos_token': '<|eot_id|>', 'chat_template': LLAMA3_TEMPLATE,
      'clean_up_tokenization_spaces': True})
  write_json(os.path.join(directory, 'generation_config.json'), {
      'bos_token_id': bos,
      'eos_token_id': [tokenizer.token_to_id('<|end_of_text|>'),
                       tokenizer.token_to_id('<|eot_id|>')]})
  return str(directory)


def write_qwen_like(directory) -> str:
  """Qwen2 Instruct's layout: no bos, eos <|im_end|>, pad <|endoftext|>, the ChatML
  template in chat_template.jinja, transformers' own Qwen2Tokenizer class."""
  tokenizer = train_bpe(QWEN2_REGEX, ['<|endoftext|>', '<|im_start|>', '<|im_end|>'], nfc=True)
  tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
  os.makedirs(directory, exist_ok=True)
  tokenizer.save(os.path.join(directory, 'tokenizer.json'))
  write_json(os.path.join(directory, 'tokenizer_config.json'), {
      'tokenizer_class': 'Qwen2Tokenizer', 'bos_token': None, 'eos_token': '<|im_end|>',
      'pad_token': '<|endoftext|>', 'unk_token': None, 'model_max_length': 32768})
  with open(os.path.join(directory, 'chat_template.jinja'), 'w', encoding='utf-8') as f:
    f.write(QWEN_TEMPLATE)
  write_json(os.path.join(directory, 'generation_config.json'), {
      'eos_token_id': [tokenizer.token_to_id('<|im_end|>'),
                       tokenizer.token_to_id('<|endoftext|>')]})
  # Qwen2's config.json names <|endoftext|> as bos though its tokenizer has none.
  write_json(os.path.join(directory, 'config.json'),
             {'bos_token_id': tokenizer.token_to_id('<|endoftext|>')})
  return str(directory)


def write_sentencepiece_like(directory) -> str:
  """Llama 2's layout: a bare sentencepiece tokenizer.model (unk=0, bos=1, eos=2, no pad,
  a dummy prefix) and a LlamaTokenizer config."""
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter([line for line in LINES * 2 if line.strip()]), model_writer=model,
      model_type='bpe', vocab_size=600, byte_fallback=True, unk_id=0, bos_id=1, eos_id=2,
      pad_id=-1, normalization_rule_name='identity', add_dummy_prefix=True,
      remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, split_digits=True,
      character_coverage=0.9995, minloglevel=2)
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, 'tokenizer.model'), 'wb') as f:
    f.write(model.getvalue())
  write_json(os.path.join(directory, 'tokenizer_config.json'), {
      'tokenizer_class': 'LlamaTokenizer', 'bos_token': '<s>', 'eos_token': '</s>',
      'unk_token': '<unk>', 'pad_token': None, 'legacy': False, 'add_bos_token': True})
  return str(directory)


@pytest.fixture(scope='module')
def llama3_dir(tmp_path_factory):
  return write_llama3_like(tmp_path_factory.mktemp('llama3'))


@pytest.fixture(scope='module')
def qwen_dir(tmp_path_factory):
  return write_qwen_like(tmp_path_factory.mktemp('qwen'))


@pytest.fixture(scope='module')
def sentencepiece_dir(tmp_path_factory):
  return write_sentencepiece_like(tmp_path_factory.mktemp('llama2'))


@pytest.fixture(params=['llama3', 'qwen'])
def checkpoint_dir(request, llama3_dir, qwen_dir):
  return {'llama3': llama3_dir, 'qwen': qwen_dir}[request.param]


def auto_tokenizer(directory):
  return transformers.AutoTokenizer.from_pretrained(directory)


def test_encode_and_decode_equal_transformers_on_mixed_text(checkpoint_dir):
  tokenizer, auto = tokenizer_lib.from_hf_directory(checkpoint_dir), auto_tokenizer(checkpoint_dir)
  assert tokenizer.kind == 'huggingface'
  for text in LINES + ['\n'.join(LINES), 'a<|im_end|>b<|eot_id|>c']:
    want = auto(text, add_special_tokens=False).input_ids
    assert tokenizer.encode(text).tolist() == want, text
    assert tokenizer.decode(want) == auto.decode(want, skip_special_tokens=True), text
  ids = tokenizer.encode('\n'.join(LINES))
  assert len(ids) < len('\n'.join(LINES).encode('utf-8')) / 2  # It learned merges.
  assert tokenizer.decode(ids) == '\n'.join(LINES)


def test_decode_skips_special_ids_and_ids_past_the_vocabulary(checkpoint_dir):
  tokenizer, auto = tokenizer_lib.from_hf_directory(checkpoint_dir), auto_tokenizer(checkpoint_dir)
  ids = [tokenizer.prefix_id, *tokenizer.encode('Hello, world!'), tokenizer.eos_id]
  assert tokenizer.decode(ids) == auto.decode(ids, skip_special_tokens=True) == 'Hello, world!'
  assert tokenizer.decode(ids + [tokenizer.vocab_size, 10**6]) == 'Hello, world!'


def test_special_ids_follow_the_checkpoint(llama3_dir, qwen_dir):
  for directory in (llama3_dir, qwen_dir):
    tokenizer, auto = tokenizer_lib.from_hf_directory(directory), auto_tokenizer(directory)
    assert tokenizer.vocab_size == len(auto)
    assert tokenizer.eos_id == auto.eos_token_id
    # No pad (Llama 3): eos stands in. No bos token (Qwen2): config.json's bos_token_id
    # is the bos, eos the prefix a text with no context is conditioned on (the harness's).
    assert tokenizer.prefix_id == (auto.bos_token_id if auto.bos_token is not None
                                   else auto.eos_token_id)
    assert tokenizer.pad_id == (auto.pad_token_id if auto.pad_token is not None else auto.eos_token_id)
    assert tokenizer.special_tokens == auto.special_tokens_map
    added_bos = auto('a').input_ids[:1] == [auto.bos_token_id]
    assert tokenizer.adds_bos == added_bos
    for text in ('a', 'Hello, world!', ''):
      assert tokenizer.prompt_ids(text) == auto(text).input_ids, text
    assert tokenizer.chat_template == auto.chat_template
    assert tokenizer.token_to_id('<|eot_id|>' if directory == llama3_dir else '<|im_end|>') == \
        tokenizer.eos_id
    assert tokenizer.token_to_id('no such token') is None
  llama3, qwen = tokenizer_lib.from_hf_directory(llama3_dir), tokenizer_lib.from_hf_directory(qwen_dir)
  assert llama3.adds_bos and not qwen.adds_bos
  assert 'bos_token' not in qwen.special_tokens and 'pad_token' not in llama3.special_tokens
  assert (llama3.bos_id, llama3.eos_id, llama3.pad_id, llama3.prefix_id) == (0, 4, 4, 0)
  assert (qwen.bos_id, qwen.eos_id, qwen.pad_id, qwen.prefix_id) == (0, 2, 0, 2)


def test_add_bos_token_of_the_config_decides_where_it_is_given(tmp_path, llama3_dir, qwen_dir):
  for directory, add_bos_token in ((llama3_dir, False), (qwen_dir, True)):
    copy = tmp_path / os.path.basename(directory)
    shutil.copytree(directory, copy)
    config = json.loads((copy / 'tokenizer_config.json').read_text())
    (copy / 'tokenizer_config.json').write_text(json.dumps({**config,
                                                            'add_bos_token': add_bos_token}))
    tokenizer = tokenizer_lib.from_hf_directory(str(copy))
    # Qwen's tokenizer names no bos token, so it has none to add.
    assert tokenizer.adds_bos is (add_bos_token and tokenizer.special_tokens.get('bos_token')
                                  is not None)
    assert tokenizer_lib.from_dict(tokenizer.to_dict()).adds_bos is tokenizer.adds_bos
  (copy / 'tokenizer_config.json').write_text(json.dumps({**config, 'add_bos_token': 'yes'}))
  with pytest.raises(ConfigError, match='add_bos_token is .yes., not true or false'):
    tokenizer_lib.from_hf_directory(str(copy))


def test_stop_ids_are_eos_then_the_generation_config_eos_ids(llama3_dir, qwen_dir):
  llama3 = tokenizer_lib.from_hf_directory(llama3_dir)
  assert llama3.stop_ids == (llama3.token_to_id('<|eot_id|>'), llama3.token_to_id('<|end_of_text|>'))
  qwen = tokenizer_lib.from_hf_directory(qwen_dir)
  assert qwen.stop_ids == (qwen.token_to_id('<|im_end|>'), qwen.token_to_id('<|endoftext|>'))


def test_offsets_equal_transformers_offset_mapping(checkpoint_dir):
  tokenizer, auto = tokenizer_lib.from_hf_directory(checkpoint_dir), auto_tokenizer(checkpoint_dir)
  text = '\n'.join(LINES[:40])
  ids, offsets = tokenizer.encode_with_offsets(text)
  want = auto(text, add_special_tokens=False, return_offsets_mapping=True)
  assert ids.tolist() == want.input_ids
  assert offsets.tolist() == [list(pair) for pair in want.offset_mapping]


def test_the_checkpoint_dict_rebuilds_the_same_tokenizer(checkpoint_dir):
  tokenizer = tokenizer_lib.from_hf_directory(checkpoint_dir)
  saved = json.loads(json.dumps(tokenizer.to_dict()))  # As a checkpoint stores it.
  restored = tokenizer_lib.from_dict(saved)
  assert restored.to_dict() == tokenizer.to_dict()
  tokenizer_lib.check_same(saved, restored, 'here')
  for name in ('vocab_size', 'bos_id', 'eos_id', 'pad_id', 'stop_ids', 'special_ids',
               'special_tokens', 'chat_template', 'adds_bos'):
    assert getattr(restored, name) == getattr(tokenizer, name), name
  text = '\n'.join(LINES)
  assert restored.encode(text).tolist() == tokenizer.encode(text).tolist()
  with pytest.raises(ConfigError, match='tokenizer mismatch'):
    tokenizer_lib.check_same(saved, tokenizer_lib.ByteTokenizer(), 'ckpt')


def test_save_pretrained_opens_in_transformers_unchanged(checkpoint_dir, tmp_path):
  tokenizer = tokenizer_lib.from_hf_directory(checkpoint_dir)
  tokenizer.save_pretrained(str(tmp_path / 'saved'), model_max_length=4096)
  auto, original = auto_tokenizer(str(tmp_path / 'saved')), auto_tokenizer(checkpoint_dir)
  text = '\n'.join(LINES)
  assert auto(text).input_ids == original(text).input_ids  # With bos where it adds one.
  assert auto.special_tokens_map == original.special_tokens_map
  assert auto.chat_template == original.chat_template == tokenizer.chat_template
  assert auto.model_max_length == 4096
  reopened = tokenizer_lib.from_hf_directory(str(tmp_path / 'saved'))
  # The stop ids past eos and config.json's bos_token_id are the model exporter's to write.
  without_model_files = lambda data: {k: v for k, v in data.items()
                                      if k not in ('stop_ids', 'bos_id', 'bos_token_id')}
  assert without_model_files(reopened.to_dict()) == without_model_files(tokenizer.to_dict())


def test_build_takes_a_directory_or_a_tokenizer_json(llama3_dir):
  for path in (llama3_dir, os.path.join(llama3_dir, 'tokenizer.json')):
    tokenizer = tokenizer_lib.build(ml_collections.ConfigDict({'kind': 'huggingface', 'path': path}))
    assert tokenizer.to_dict() == tokenizer_lib.from_hf_directory(llama3_dir).to_dict()


def test_bad_paths_give_one_line_errors_naming_the_path_and_file(tmp_path, llama3_dir):
  def build(path):
    return tokenizer_lib.build(ml_collections.ConfigDict({'kind': 'huggingface', 'path': path}))

  def bad(path, *fragments):
    with pytest.raises(ConfigError) as error:
      build(str(path))
    message = str(error.value)
    assert '\n' not in message and 'config.tokenizer.path' in message, message
    for fragment in fragments:
      assert fragment in message, message

  bad(tmp_path / 'missing', 'missing', 'does not exist')
  (tmp_path / 'empty').mkdir()
  bad(tmp_path / 'empty', 'empty', 'neither tokenizer.json nor tokenizer.model')
  bad(tmp_path / 'empty' / 'tokenizer.json', 'tokenizer.json', 'does not exist')
  (tmp_path / 'garbage').mkdir()
  (tmp_path / 'garbage' / 'tokenizer.json').write_text('{"not": "a tokenizer"}')
  bad(tmp_path / 'garbage', 'garbage/tokenizer.json', 'not a valid tokenizer.json')
  (tmp_path / 'binary').mkdir()
  (tmp_path / 'binary' / 'tokenizer.json').write_bytes(b'\xff\xfe\x00garbage')
  bad(tmp_path / 'binary', 'binary/tokenizer.json')
  broken = tmp_path / 'broken_config'
  broken.mkdir()
  (broken / 'tokenizer.json').write_text(open(os.path.join(llama3_dir, 'tokenizer.json')).read())
  (broken / 'tokenizer_config.json').write_text('{"eos_token": ')
  bad(broken, 'broken_config/tokenizer_config.json', 'not valid JSON')
  (broken / 'tokenizer_config.json').write_text('{"eos_token": "<|not in vocab|>"}')
  bad(broken, 'eos_token', '<|not in vocab|>', 'not in the vocabulary')
  (broken / 'tokenizer_config.json').write_text('{}')
  bad(broken, 'no eos_token')
  with pytest.raises(ConfigError, match='config.tokenizer.path must name'):
    build('')
  with pytest.raises(ConfigError, match='not a directory'):
    tokenizer_lib.from_hf_directory(str(tmp_path / 'missing'))


def test_sentencepiece_checkpoint_reads_its_ids_and_matches_transformers(sentencepiece_dir):
  tokenizer = tokenizer_lib.from_hf_directory(sentencepiece_dir)
  auto = auto_tokenizer(sentencepiece_dir)
  assert tokenizer.kind == 'sentencepiece'
  assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (1, 2, 2)  # No pad: eos.
  assert (tokenizer.bos_id, tokenizer.eos_id) == (auto.bos_token_id, auto.eos_token_id)
  assert tokenizer.adds_bos and auto('a').input_ids[0] == auto.bos_token_id
  assert tokenizer.vocab_size == len(auto)
  # transformers 5 runs a bare tokenizer.model as a `tokenizers` Metaspace BPE, which adds
  # the dummy-prefix '▁' only to text that does not start with a space (sentencepiece
  # always adds it): a checkpoint's tokenizer follows it, leading spaces included.
  assert sum(line[:1] == ' ' for line in LINES) > 100
  for text in LINES:
    want = auto(text, add_special_tokens=False).input_ids
    assert tokenizer.encode(text).tolist() == want, text
    ids, offsets = tokenizer.encode_with_offsets(text)
    assert ids.tolist() == want and len(offsets) == len(ids)
    assert tokenizer.decode(want) == auto.decode(want, skip_special_tokens=True)
    if not text[:1].isspace():
      assert tokenizer.decode(want) == text
  restored = tokenizer_lib.from_dict(json.loads(json.dumps(tokenizer.to_dict())))
  assert restored.to_dict() == tokenizer.to_dict() and restored.pad_id == 2
  assert restored.encode(' x').tolist() == tokenizer.encode(' x').tolist()


def test_a_sentencepiece_model_trained_here_keeps_its_checkpoint_dict(trained_here):
  tokenizer = trained_here
  assert set(tokenizer.to_dict()) == {'kind', 'model_proto'}
  assert (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id, tokenizer.stop_ids) == (0, 1, 2, (2,))
  assert tokenizer.chat_template is None
  assert tokenizer.special_tokens['eos_token'] == '</s>' and tokenizer.token_to_id('</s>') == 2


@pytest.fixture(scope='module')
def trained_here(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('sentencepiece') / 'sp.model')
  return tokenizer_lib.train_sentencepiece(LINES, vocab_size=400, output_path=path)


@pytest.mark.parametrize('kind', ['byte', 'sentencepiece'])
def test_offsets_cover_each_token_s_characters(kind, trained_here):
  tokenizer = tokenizer_lib.ByteTokenizer() if kind == 'byte' else trained_here
  text = '\n'.join(LINES[:30]) + ' ∑ 𝄞 漢字 🙂'
  ids, offsets = tokenizer.encode_with_offsets(text)
  assert ids.tolist() == tokenizer.encode(text).tolist()
  assert (np.diff(offsets[:, 0]) >= 0).all() and (offsets[:, 1] > offsets[:, 0]).all()
  covered = np.zeros(len(text), bool)
  for start, end in offsets:
    covered[start:end] = True
  assert covered.all()
  # Decoding the tokens that start in a character range gives exactly those characters.
  for start, end in [(0, 17), (len(text) - 13, len(text))]:
    inside = (offsets[:, 0] >= start) & (offsets[:, 1] <= end)
    assert tokenizer.decode(ids[inside]) == text[start:end]


def test_byte_tokenizer_json_encodes_and_decodes_like_the_byte_tokenizer(tmp_path):
  byte = tokenizer_lib.ByteTokenizer()
  exported = hf_tokenizer.HuggingFaceTokenizer(
      hf_tokenizer.byte_tokenizer_json(), tokenizer_lib.ByteTokenizer.special_tokens)
  assert exported.vocab_size == byte.vocab_size
  assert (exported.pad_id, exported.bos_id, exported.eos_id) == (0, 1, 2)
  text = '\n'.join(LINES) + '\x00\x7f 👩‍👩‍👧  \t\t\n\n   '
  for sample in LINES + [text]:
    assert exported.encode(sample).tolist() == byte.encode(sample).tolist(), sample
  ids = byte.encode(text)
  assert exported.decode(ids) == byte.decode(ids) == text
  cut = byte.encode('a🙂b漢')[:-1].tolist() + byte.encode('c').tolist() + [255 + 3, 0xC3 + 3]
  assert exported.decode(cut) == byte.decode(cut)  # Broken UTF-8: the same replacements.
  exported.save_pretrained(str(tmp_path / 'byte'))
  auto = auto_tokenizer(str(tmp_path / 'byte'))
  assert auto(text).input_ids == [1, *ids.tolist()]  # bos in front, as lm trains.
  assert auto.decode([1, *ids.tolist(), 2], skip_special_tokens=True) == text

