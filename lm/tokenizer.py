"""Tokenizers: sentencepiece BPE with byte fallback, a byte-level one for tiny runs, and the
`tokenizers` tokenizer of a Hugging Face checkpoint.

Models trained here use special ids pad=0, bos=1, eos=2 (`ByteTokenizer`, and
`train_sentencepiece`). A Hugging Face checkpoint brings its own ids, read from its files
(`from_hf_directory`):

- bos, eos, pad, unk: the named tokens of tokenizer_config.json (a string, or a dict with
  `content`, or null), overridden by special_tokens_map.json when the config has no
  `added_tokens_decoder` (transformers' order). A checkpoint that names no bos token
  (Qwen2) takes `bos_id` from config.json's `bos_token_id`, else has none (None); one
  without a pad token (Llama 3) gets `pad_id` = eos. The template variables
  (`special_tokens`) hold only the tokens the checkpoint names, so a chat template still
  sees `bos_token` undefined.
- `stop_ids`: eos, then every other `eos_token_id` of generation_config.json (Llama 3
  Instruct ends a turn with <|eot_id|> but its eos is <|end_of_text|>): generation stops
  at any of them.
- `chat_template`: chat_template.jinja, else tokenizer_config.json's `chat_template`.
- `adds_bos`: whether transformers' `tokenizer(text)` puts bos in front (Llama: yes,
  Qwen: no): tokenizer_config.json's `add_bos_token` where it says, else what the
  post-processor of tokenizer.json does (for a bare tokenizer.model, Llama's default: yes).
  `encode` never adds bos; `prompt_ids` is `tokenizer(text)`, what every prompt, document
  and scored context starts from.
- `prefix_id`: the token a sequence with nothing before it is conditioned on (an empty
  context, the first of a document's rolling windows): the named bos, else eos, as
  lm-evaluation-harness's `prefix_token_id`.

Every tokenizer has `kind`, `vocab_size`, `pad_id`, `bos_id`, `eos_id`, `prefix_id`,
`stop_ids`, `special_ids`, `special_tokens` (template variables such as `bos_token`),
`chat_template`, `adds_bos`, `encode` (text only: no bos/eos added), `prompt_ids`,
`decode` (skips special ids), `encode_with_offsets`, `token_to_id` and `to_dict`.
`trained_here`: lm's own byte and sentencepiece tokenizers, which add bos (lm trains every
document as bos, text, eos), against a checkpoint's.
`matches_special_tokens` says whether `encode` turns a special token's text into its id
(a Hugging Face tokenizer does, as transformers does; lm's own tokenizers encode every
character as text, and lm/chat.py maps the special strings a template writes itself).

A tokenizer serialises to a small JSON-able dict (`to_dict`) that is stored in every
checkpoint, so a run is always sampled with the vocabulary it was trained with
(`check_same`); a Hugging Face tokenizer's dict holds its whole tokenizer.json.
"""

import base64
import io
import json
import os
from typing import Iterable

import numpy as np
import sentencepiece as spm
import tokenizers

from lm.errors import ConfigError

PAD_ID, BOS_ID, EOS_ID = 0, 1, 2

# The named special tokens transformers passes to a chat template (`special_tokens_map`).
SPECIAL_TOKEN_NAMES = ('bos_token', 'eos_token', 'unk_token', 'sep_token', 'pad_token',
                       'cls_token', 'mask_token')


def _char_of_byte(text: str) -> np.ndarray:
  """[len(utf-8 bytes) + 1]: the index of the character each byte of `text` belongs to
  (the last entry, len(text), stands for the end)."""
  code_points = np.frombuffer(text.encode('utf-32-le'), np.uint32)
  widths = 1 + (code_points >= 0x80) + (code_points >= 0x800) + (code_points >= 0x10000)
  return np.repeat(np.arange(len(text) + 1), np.append(widths, 1))


def _char_offsets_from_byte_offsets(text: str, byte_offsets) -> np.ndarray:
  """[T, 2] character offsets of tokens given by UTF-8 byte offsets into `text`. A token
  holding part of a character, or none of the input (begin == end), gets that character."""
  byte_offsets = np.asarray(byte_offsets, np.int64).reshape(-1, 2)
  char_of_byte = _char_of_byte(text)
  begin, end = byte_offsets[:, 0], byte_offsets[:, 1]
  start = char_of_byte[begin]
  stop = np.where(end > begin, char_of_byte[np.maximum(end - 1, 0)] + 1,
                  np.minimum(start + 1, len(text)))
  return np.stack([start, stop], axis=1).astype(np.int32)


class _PromptIds:
  """`prompt_ids`, from `adds_bos`, `bos_id` and `encode`."""

  def prompt_ids(self, text: str) -> list[int]:
    """transformers' `tokenizer(text).input_ids`: bos where the tokenizer adds one."""
    return [self.bos_id] * self.adds_bos + [int(i) for i in self.encode(text)]


class ByteTokenizer(_PromptIds):
  """UTF-8 bytes shifted past the special ids: byte b -> b + 3."""
  kind = 'byte'
  vocab_size = 256 + 3
  pad_id, bos_id, eos_id, prefix_id = PAD_ID, BOS_ID, EOS_ID, BOS_ID
  stop_ids = (EOS_ID,)
  special_ids = frozenset((PAD_ID, BOS_ID, EOS_ID))
  # As in `byte_tokenizer_json`, the exported equivalent.
  special_tokens = {'pad_token': '<pad>', 'bos_token': '<s>', 'eos_token': '</s>'}
  chat_template = None
  adds_bos = True  # Every document is trained as bos, text, eos.
  trained_here = True
  matches_special_tokens = False

  def encode(self, text: str) -> np.ndarray:
    return np.frombuffer(text.encode('utf-8'), dtype=np.uint8).astype(np.int32) + 3

  def encode_with_offsets(self, text: str) -> tuple[np.ndarray, np.ndarray]:
    """(ids [T], offsets [T, 2]): each byte's token spans the character it is part of."""
    char_of_byte = _char_of_byte(text)[:-1]
    return self.encode(text), np.stack([char_of_byte, char_of_byte + 1], 1).astype(np.int32)

  def decode(self, ids: Iterable[int]) -> str:
    data = bytes(int(i) - 3 for i in ids if 3 <= int(i) < self.vocab_size)
    return data.decode('utf-8', errors='replace')

  def token_to_id(self, token: str) -> int | None:
    ids = {'<pad>': PAD_ID, '<s>': BOS_ID, '</s>': EOS_ID}
    return ids.get(token)

  def to_dict(self) -> dict:
    return {'kind': self.kind}


class SentencePieceTokenizer(_PromptIds):
  """A sentencepiece model. Special ids are the model's own (pad=0, bos=1, eos=2 for one
  trained here); a model without a pad piece (Llama 2, Mistral) pads with eos. A Hugging
  Face checkpoint's tokenizer_config.json may name other special pieces and bring a chat
  template, and its generation_config.json more stop ids (`from_hf_directory`)."""
  kind = 'sentencepiece'
  matches_special_tokens = False

  def __init__(self, model_proto: bytes, source: str = '<bytes>', *,
               special_tokens: dict | None = None, stop_ids: Iterable[int] = (),
               chat_template: str | None = None, transformers_spaces: bool = False,
               add_bos_token: bool | None = None):
    self.model_proto = model_proto
    # Llama's and Mistral's sentencepiece tokenizers add bos unless told not to; lm's own
    # train with it.
    self.add_bos_token = add_bos_token
    # transformers runs a checkpoint's bare tokenizer.model as a Metaspace BPE that adds
    # the dummy prefix '▁' only to text not starting with a space; sentencepiece always
    # adds it. A checkpoint's tokenizer encodes as transformers does, to match the ids
    # its users' pipelines make; one trained here keeps sentencepiece's own rule.
    self.transformers_spaces = transformers_spaces
    self.trained_here = not transformers_spaces
    self._processor = spm.SentencePieceProcessor()
    try:
      self._processor.LoadFromSerializedProto(model_proto)
    except Exception as error:  # sentencepiece raises bare RuntimeError/OSError.
      raise ConfigError(f'{source} is not a valid sentencepiece model: {error}') from error
    self.vocab_size = self._processor.vocab_size()
    processor = self._processor
    own = {name: processor.id_to_piece(i) for name, i in (
        ('bos_token', processor.bos_id()), ('eos_token', processor.eos_id()),
        ('unk_token', processor.unk_id()), ('pad_token', processor.pad_id())) if i >= 0}
    self._named = {name: token for name, token in (special_tokens or {}).items()
                   if token is not None}
    self.special_tokens = {**own, **self._named}
    ids = {}
    for name, token in self.special_tokens.items():
      ids[name] = self.token_to_id(token)
      if ids[name] is None:
        raise ConfigError(f'{source}: the {name} {token!r} is not a piece of the model')
    if 'eos_token' not in ids:
      raise ConfigError(f'{source}: the model has no eos piece, so generation cannot stop')
    self.eos_id = ids['eos_token']
    self.bos_id = ids.get('bos_token')
    self.prefix_id = ids.get('bos_token', self.eos_id)
    self.adds_bos = self.bos_id is not None and add_bos_token is not False
    self.pad_id = ids.get('pad_token', self.eos_id)
    self.stop_ids = tuple(dict.fromkeys((self.eos_id, *(int(i) for i in stop_ids))))
    self.special_ids = frozenset(i for i in (self.pad_id, self.bos_id, self.eos_id)
                                 if i is not None)
    self.chat_template = chat_template

  @classmethod
  def load(cls, path: str) -> 'SentencePieceTokenizer':
    if not os.path.isfile(path):
      raise ConfigError(f'tokenizer model {path!r} does not exist')
    with open(path, 'rb') as f:
      return cls(f.read(), source=path)

  def _leading_space(self, text: str) -> bool:
    """Whether `text`'s leading space stands for the dummy prefix (transformers_spaces)."""
    return self.transformers_spaces and text.startswith(' ')

  def encode(self, text: str) -> np.ndarray:
    if self._leading_space(text):
      return self.encode_with_offsets(text)[0]
    return np.asarray(self._processor.EncodeAsIds(text), dtype=np.int32)

  def encode_with_offsets(self, text: str) -> tuple[np.ndarray, np.ndarray]:
    """(ids [T], offsets [T, 2]) in characters of `text`; byte-fallback pieces of one
    character all span it."""
    if self._leading_space(text):
      if text == ' ':  # Nothing for the prefix to attach to: the bare '▁'.
        return (np.asarray([self._processor.piece_to_id('▁')], np.int32),
                np.asarray([[0, 1]], np.int32))
      ids, offsets = self._encode_with_offsets(text[1:])
      offsets = offsets + 1
      offsets[:1, 0] = 0  # The first piece's '▁' is the space.
      return ids, offsets
    return self._encode_with_offsets(text)

  def _encode_with_offsets(self, text: str) -> tuple[np.ndarray, np.ndarray]:
    try:
      pieces = self._processor.encode(text, out_type='proto').pieces
    except ValueError:  # sentencepiece before 0.2.3 names it 'immutable_proto'.
      pieces = self._processor.encode(text, out_type='immutable_proto').pieces
    ids = np.asarray([piece.id for piece in pieces], np.int32)
    return ids, _char_offsets_from_byte_offsets(
        text, [(piece.begin, piece.end) for piece in pieces])

  def decode(self, ids: Iterable[int]) -> str:
    return self._processor.DecodeIds([int(i) for i in ids
                                      if 0 <= int(i) < self.vocab_size
                                      and int(i) not in self.special_ids])

  def token_to_id(self, token: str) -> int | None:
    token_id = self._processor.piece_to_id(token)
    return token_id if self._processor.id_to_piece(token_id) == token else None

  def to_dict(self) -> dict:
    data = {'kind': self.kind, 'model_proto': base64.b64encode(self.model_proto).decode('ascii')}
    # Only what a Hugging Face checkpoint adds, so a model trained here keeps its dict.
    if self._named:
      data['special_tokens'] = self._named
    if self.stop_ids != (self.eos_id,):
      data['stop_ids'] = list(self.stop_ids)
    if self.chat_template is not None:
      data['chat_template'] = self.chat_template
    if self.transformers_spaces:
      data['transformers_spaces'] = True
    if self.add_bos_token is not None:
      data['add_bos_token'] = self.add_bos_token
    return data


class HuggingFaceTokenizer(_PromptIds):
  """A `tokenizers` tokenizer.json with the named special tokens, extra stop ids and chat
  template of a Hugging Face checkpoint (see the module docstring for the ids).

  `encode` equals transformers' `tokenizer(text, add_special_tokens=False).input_ids`: it
  adds no bos or eos, and matches the text of added tokens (such as <|eot_id|>).
  """
  kind = 'huggingface'
  matches_special_tokens = True
  trained_here = False  # A checkpoint's (lm exports its own byte tokenizer in this form too).

  def __init__(self, tokenizer_json: str, special_tokens: dict, *, stop_ids: Iterable[int] = (),
               chat_template: str | None = None, source: str = '<string>',
               add_bos_token: bool | None = None, bos_token_id: int | None = None):
    self.tokenizer_json = tokenizer_json
    # The checkpoint's own settings (tokenizer_config.json, config.json), kept as given.
    self.add_bos_token, self.bos_token_id = add_bos_token, bos_token_id
    try:
      self._tokenizer = tokenizers.Tokenizer.from_str(tokenizer_json)
    except Exception as error:  # The Rust library raises a bare Exception.
      raise ConfigError(f'{source} is not a valid tokenizer.json: {_one_line(error)}') from error
    # transformers encodes without the truncation or padding a tokenizer.json may carry.
    self._tokenizer.no_truncation()
    self._tokenizer.no_padding()
    self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)
    self.special_tokens = {name: token for name, token in special_tokens.items()
                           if token is not None}
    ids = {}
    for name, token in self.special_tokens.items():
      ids[name] = self._tokenizer.token_to_id(token)
      if ids[name] is None:
        raise ConfigError(f'{source}: the {name} {token!r} is not in the vocabulary')
    if 'eos_token' not in ids:
      raise ConfigError(f'{source}: no eos_token is named, so generation cannot stop')
    self.eos_id = ids['eos_token']
    if bos_token_id is not None and not 0 <= bos_token_id < self.vocab_size:
      raise ConfigError(f'{source}: bos_token_id={bos_token_id} is not an id of the'
                        f' vocabulary ({self.vocab_size} ids)')
    self.bos_id = ids.get('bos_token', bos_token_id)
    self.prefix_id = ids.get('bos_token', self.eos_id)
    self.pad_id = ids.get('pad_token', self.eos_id)
    self.stop_ids = tuple(dict.fromkeys((self.eos_id, *(int(i) for i in stop_ids))))
    added = self._tokenizer.get_added_tokens_decoder()
    self.special_ids = frozenset(
        {i for i, token in added.items() if token.special} | set(ids.values()))
    self.chat_template = chat_template
    probe = 'a'
    with_specials = self._tokenizer.encode(probe, add_special_tokens=True).ids
    without = self._tokenizer.encode(probe, add_special_tokens=False).ids
    post_processor_adds = ('bos_token' in ids and with_specials[:1] == [self.bos_id]
                           and without[:1] != [self.bos_id])
    # As transformers: a tokenizer that names no bos token adds none, whatever the flag.
    self.adds_bos = (post_processor_adds if add_bos_token is None
                     else add_bos_token and 'bos_token' in ids)

  @classmethod
  def from_directory(cls, path: str) -> 'HuggingFaceTokenizer':
    """From a checkpoint directory, or a tokenizer.json with the other files beside it."""
    directory, json_path = ((path, os.path.join(path, 'tokenizer.json')) if os.path.isdir(path)
                            else (os.path.dirname(path) or '.', path))
    if not os.path.isfile(json_path):
      raise ConfigError(f'{json_path} does not exist')
    tokenizer_json = _read_text(json_path)
    settings = _read_checkpoint_settings(directory)
    return cls(tokenizer_json, settings['special_tokens'], stop_ids=settings['stop_ids'],
               chat_template=settings['chat_template'], source=json_path,
               add_bos_token=settings['add_bos_token'], bos_token_id=settings['bos_token_id'])

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._tokenizer.encode(text, add_special_tokens=False).ids, np.int32)

  def encode_with_offsets(self, text: str) -> tuple[np.ndarray, np.ndarray]:
    """(ids [T], offsets [T, 2]) in characters of `text`, from the `tokenizers` encoding."""
    encoding = self._tokenizer.encode(text, add_special_tokens=False)
    return (np.asarray(encoding.ids, np.int32),
            np.asarray(encoding.offsets, np.int32).reshape(-1, 2))

  def decode(self, ids: Iterable[int]) -> str:
    """transformers' `decode(ids, skip_special_tokens=True)`; ids past the vocabulary (a
    model's padded embedding rows) are skipped too."""
    ids = [int(i) for i in ids if 0 <= int(i) < self.vocab_size]
    return self._tokenizer.decode(ids, skip_special_tokens=True)

  def token_to_id(self, token: str) -> int | None:
    return self._tokenizer.token_to_id(token)

  def to_dict(self) -> dict:
    data = {'kind': self.kind, 'tokenizer_json': self.tokenizer_json,
            'special_tokens': dict(self.special_tokens),
            'bos_id': self.bos_id, 'eos_id': self.eos_id, 'pad_id': self.pad_id,
            'stop_ids': list(self.stop_ids), 'chat_template': self.chat_template}
    # Only where the checkpoint gives them, so an earlier checkpoint's dict still matches.
    if self.add_bos_token is not None:
      data['add_bos_token'] = self.add_bos_token
    if self.bos_token_id is not None:
      data['bos_token_id'] = self.bos_token_id
    return data

  def save_pretrained(self, directory: str, *, model_max_length: int | None = None) -> None:
    """Writes tokenizer.json and tokenizer_config.json, which
    `transformers.AutoTokenizer.from_pretrained(directory)` opens with the same ids,
    special tokens and chat template. The stop ids past eos belong in the model's
    generation_config.json (`eos_token_id`), which the model's exporter writes."""
    os.makedirs(directory, exist_ok=True)
    config = {'tokenizer_class': 'PreTrainedTokenizerFast',
              **{name: self.special_tokens.get(name) for name in ('bos_token', 'eos_token',
                                                                  'pad_token', 'unk_token')}}
    if model_max_length is not None:
      config['model_max_length'] = model_max_length
    if self.chat_template is not None:
      config['chat_template'] = self.chat_template
    _write_text(os.path.join(directory, 'tokenizer.json'), self.tokenizer_json)
    _write_text(os.path.join(directory, 'tokenizer_config.json'),
                json.dumps(config, indent=2, ensure_ascii=False) + '\n')


def _one_line(error: Exception) -> str:
  return ' '.join(str(error).split())


def _read_text(path: str) -> str:
  try:
    with open(path, encoding='utf-8') as f:
      return f.read()
  except (OSError, UnicodeDecodeError) as error:
    raise ConfigError(f'{path} cannot be read: {_one_line(error)}') from error


def _write_text(path: str, text: str) -> None:
  temporary = path + '.tmp'
  with open(temporary, 'w', encoding='utf-8') as f:
    f.write(text)
  os.replace(temporary, path)


def _read_json(path: str) -> dict | None:
  """The JSON object in `path`, or None if there is no such file."""
  if not os.path.isfile(path):
    return None
  try:
    data = json.loads(_read_text(path))
  except json.JSONDecodeError as error:
    raise ConfigError(f'{path} is not valid JSON: {error}') from error
  if not isinstance(data, dict):
    raise ConfigError(f'{path} holds a {type(data).__name__}, not a JSON object')
  return data


def _token_content(value, path: str, name: str) -> str | None:
  """A special token as tokenizer_config.json writes it: a string, {'content': ...} or null."""
  if isinstance(value, dict):
    value = value.get('content')
  if value is not None and not isinstance(value, str):
    raise ConfigError(f'{path}: {name} is {value!r}, not a string or {{"content": ...}}')
  return value


def _read_checkpoint_settings(directory: str) -> dict:
  """{'special_tokens', 'stop_ids', 'chat_template', 'add_bos_token', 'bos_token_id'} from
  a Hugging Face checkpoint's tokenizer_config.json, special_tokens_map.json,
  chat_template.jinja, generation_config.json and config.json (each optional)."""
  config_path = os.path.join(directory, 'tokenizer_config.json')
  config = _read_json(config_path) or {}
  special_tokens = {name: _token_content(config.get(name), config_path, name)
                    for name in SPECIAL_TOKEN_NAMES}
  map_path = os.path.join(directory, 'special_tokens_map.json')
  special_map = _read_json(map_path)
  if special_map is not None and 'added_tokens_decoder' not in config:
    # transformers reads the legacy map only for configs without added_tokens_decoder.
    special_tokens.update({name: _token_content(special_map[name], map_path, name)
                           for name in SPECIAL_TOKEN_NAMES if name in special_map})

  template_path = os.path.join(directory, 'chat_template.jinja')
  chat_template = (_read_text(template_path) if os.path.isfile(template_path)
                   else config.get('chat_template'))
  if isinstance(chat_template, list):  # Several named templates: [{'name', 'template'}].
    named = {entry.get('name'): entry.get('template') for entry in chat_template
             if isinstance(entry, dict)}
    if 'default' not in named:
      raise ConfigError(f'{config_path}: chat_template lists templates {sorted(map(str, named))}'
                        ' but none named "default"')
    chat_template = named['default']
  if chat_template is not None and not isinstance(chat_template, str):
    raise ConfigError(f'{config_path}: chat_template is a {type(chat_template).__name__},'
                      ' not a string')

  generation_path = os.path.join(directory, 'generation_config.json')
  stop_ids = (_read_json(generation_path) or {}).get('eos_token_id')
  stop_ids = [] if stop_ids is None else stop_ids if isinstance(stop_ids, list) else [stop_ids]
  if not all(isinstance(i, int) and not isinstance(i, bool) for i in stop_ids):
    raise ConfigError(f'{generation_path}: eos_token_id must be an integer or a list of them')
  add_bos_token = config.get('add_bos_token')
  if add_bos_token is not None and not isinstance(add_bos_token, bool):
    raise ConfigError(f'{config_path}: add_bos_token is {add_bos_token!r}, not true or false')
  model_path = os.path.join(directory, 'config.json')
  bos_token_id = (_read_json(model_path) or {}).get('bos_token_id')
  if isinstance(bos_token_id, list):  # Some configs list one id per stream.
    bos_token_id = bos_token_id[0] if len(bos_token_id) == 1 else bos_token_id
  if bos_token_id is not None and (not isinstance(bos_token_id, int)
                                   or isinstance(bos_token_id, bool)):
    raise ConfigError(f'{model_path}: bos_token_id is {bos_token_id!r}, not an integer')
  return {'special_tokens': special_tokens, 'stop_ids': stop_ids,
          'chat_template': chat_template, 'add_bos_token': add_bos_token,
          'bos_token_id': bos_token_id}


def from_hf_directory(directory: str):
  """The tokenizer of a Hugging Face checkpoint directory: its tokenizer.json
  (`HuggingFaceTokenizer`), else its sentencepiece tokenizer.model with the special tokens,
  chat template and stop ids of the files beside it."""
  if not os.path.isdir(directory):
    raise ConfigError(f'{directory!r} is not a directory')
  if os.path.isfile(os.path.join(directory, 'tokenizer.json')):
    return HuggingFaceTokenizer.from_directory(directory)
  model_path = os.path.join(directory, 'tokenizer.model')
  if not os.path.isfile(model_path):
    raise ConfigError(f'{directory} has neither tokenizer.json nor tokenizer.model')
  settings = _read_checkpoint_settings(directory)
  with open(model_path, 'rb') as f:
    proto = f.read()
  return SentencePieceTokenizer(proto, source=model_path,
                                special_tokens=settings['special_tokens'],
                                stop_ids=settings['stop_ids'],
                                chat_template=settings['chat_template'],
                                transformers_spaces=True,
                                add_bos_token=settings['add_bos_token'])


def byte_tokenizer_json() -> str:
  """A tokenizer.json (for the `tokenizers` library and transformers) that encodes and
  decodes UTF-8 text exactly as `ByteTokenizer`: byte b -> b + 3, <pad>=0, <s>=1, </s>=2,
  byte-level BPE with no merges; `tokenizer(text)` puts <s> in front, as lm trains. As in
  every Hugging Face tokenizer, the text '<s>' etc. encodes as the special id."""
  # GPT-2's printable stand-in for each byte, which the ByteLevel pre-tokenizer emits.
  printable = [*range(ord('!'), ord('~') + 1), *range(ord('¡'), ord('¬') + 1),
               *range(ord('®'), ord('ÿ') + 1)]
  stand_in, extra = {}, 0
  for byte in range(256):
    if byte in printable:
      stand_in[byte] = chr(byte)
    else:
      stand_in[byte] = chr(256 + extra)
      extra += 1
  specials = ['<pad>', '<s>', '</s>']
  vocab = {**{token: i for i, token in enumerate(specials)},
           **{stand_in[byte]: byte + len(specials) for byte in range(256)}}
  tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=[]))
  tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                use_regex=False)
  tokenizer.decoder = tokenizers.decoders.ByteLevel()
  tokenizer.add_special_tokens([tokenizers.AddedToken(token, special=True, normalized=False)
                                for token in specials])
  tokenizer.post_processor = tokenizers.processors.TemplateProcessing(
      single='<s> $A', pair='<s> $A <s> $B', special_tokens=[('<s>', BOS_ID)])
  return tokenizer.to_str()


def train_sentencepiece(texts: Iterable[str], vocab_size: int, output_path: str,
                        max_sentence_length: int = 4096) -> SentencePieceTokenizer:
  """Trains BPE with byte fallback on `texts` and writes `output_path`.

  Identity normalisation and multi-line training chunks keep newlines and
  indentation as real pieces, which code and prose both need to round-trip.
  """
  chunks = (text[start:start + max_sentence_length]
            for text in texts for start in range(0, len(text), max_sentence_length))
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=(chunk for chunk in chunks if chunk.strip()),
      model_writer=model,
      model_type='bpe',
      vocab_size=vocab_size,
      byte_fallback=True,
      pad_id=PAD_ID, bos_id=BOS_ID, eos_id=EOS_ID, unk_id=3,
      normalization_rule_name='identity',
      add_dummy_prefix=False,
      character_coverage=0.9995,
      split_digits=True,
      # Keep whitespace runs (code indentation) as pieces instead of collapsing them.
      remove_extra_whitespaces=False,
      allow_whitespace_only_pieces=True,
      max_sentence_length=max_sentence_length,
      minloglevel=2,
  )
  os.makedirs(os.path.dirname(os.path.abspath(output_path)), exist_ok=True)
  temporary = output_path + '.tmp'
  with open(temporary, 'wb') as f:
    f.write(model.getvalue())
  os.replace(temporary, output_path)
  return SentencePieceTokenizer(model.getvalue(), source=output_path)


def build(tokenizer_config):
  """From `config.tokenizer`: kind 'byte'; 'sentencepiece' with a .model `path`; or
  'huggingface' with `path` a checkpoint directory (its tokenizer.json, else its
  tokenizer.model: `from_hf_directory`) or a tokenizer.json with the checkpoint's other
  files beside it."""
  kind, path = tokenizer_config.kind, tokenizer_config.path
  if kind == 'byte':
    return ByteTokenizer()
  if kind == 'sentencepiece':
    if not path:
      raise ConfigError('config.tokenizer.path must name a sentencepiece .model file'
                       ' when config.tokenizer.kind="sentencepiece"')
    try:
      return SentencePieceTokenizer.load(path)
    except ConfigError as error:
      raise ConfigError(f'config.tokenizer.path: {error}') from error
  if kind == 'huggingface':
    if not path:
      raise ConfigError('config.tokenizer.path must name a Hugging Face checkpoint directory'
                       ' or tokenizer.json when config.tokenizer.kind="huggingface"')
    try:
      if os.path.isdir(path):
        return from_hf_directory(path)
      if not os.path.exists(path):
        raise ConfigError(f'{path!r} does not exist')
      return HuggingFaceTokenizer.from_directory(path)
    except ConfigError as error:
      raise ConfigError(f'config.tokenizer.path={path!r}: {error}') from error
  raise ConfigError(f'config.tokenizer.kind={kind!r} is not one of'
                   ' "byte", "sentencepiece", "huggingface"')


def from_dict(data: dict):
  if data['kind'] == 'byte':
    return ByteTokenizer()
  if data['kind'] == 'huggingface':
    return HuggingFaceTokenizer(data['tokenizer_json'], data['special_tokens'],
                                stop_ids=data['stop_ids'], chat_template=data['chat_template'],
                                source='checkpoint', add_bos_token=data.get('add_bos_token'),
                                bos_token_id=data.get('bos_token_id'))
  return SentencePieceTokenizer(base64.b64decode(data['model_proto']), source='checkpoint',
                                special_tokens=data.get('special_tokens'),
                                stop_ids=data.get('stop_ids', ()),
                                chat_template=data.get('chat_template'),
                                transformers_spaces=data.get('transformers_spaces', False),
                                add_bos_token=data.get('add_bos_token'))


def check_same(saved: dict, current, where: str) -> None:
  """Raises if the tokenizer stored with a checkpoint differs from the configured one.
  The ids derived from the rest are not compared: an earlier version derived bos
  differently from the same files."""
  derived = ('bos_id', 'eos_id', 'pad_id')
  if ({k: v for k, v in saved.items() if k not in derived}
      != {k: v for k, v in current.to_dict().items() if k not in derived}):
    raise ConfigError(
        f'tokenizer mismatch: the checkpoint in {where} was trained with a'
        f' {saved["kind"]} tokenizer that differs from the configured'
        f' {current.kind} tokenizer (config.tokenizer); use the tokenizer the run was'
        ' trained with')
