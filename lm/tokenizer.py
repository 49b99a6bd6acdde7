"""lm's tokenizers, sentencepiece BPE with byte fallback and a byte-level one for tiny runs,
and the one place that picks a tokenizer (`build` from the config, `from_dict` from a
checkpoint, `from_hf_directory` from a Hugging Face checkpoint), the tokenizer.json one of
lm/interop/hf_tokenizer.py included.

Models trained here use special ids pad=0, bos=1, eos=2 (`ByteTokenizer`, and
`train_sentencepiece`; lm/tokenizer_base.py). A Hugging Face checkpoint brings its own ids,
read from its files (`from_hf_directory`: its tokenizer.json, else its tokenizer.model;
lm/interop/hf_tokenizer.py says how each id is read).

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
import os
from typing import Iterable

import numpy as np
import sentencepiece as spm

from lm.errors import ConfigError
from lm.interop import hf_tokenizer
from lm.tokenizer_base import BOS_ID, EOS_ID, PAD_ID, PromptIds


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


class ByteTokenizer(PromptIds):
  """UTF-8 bytes shifted past the special ids: byte b -> b + 3."""
  kind = 'byte'
  vocab_size = 256 + 3
  pad_id, bos_id, eos_id, prefix_id = PAD_ID, BOS_ID, EOS_ID, BOS_ID
  stop_ids = (EOS_ID,)
  special_ids = frozenset((PAD_ID, BOS_ID, EOS_ID))
  # As in lm/interop/hf_tokenizer.py's `byte_tokenizer_json`, the exported equivalent.
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


class SentencePieceTokenizer(PromptIds):
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


def from_hf_directory(directory: str):
  """The tokenizer of a Hugging Face checkpoint directory: its tokenizer.json
  (`HuggingFaceTokenizer`), else its sentencepiece tokenizer.model with the special tokens,
  chat template and stop ids of the files beside it."""
  if not os.path.isdir(directory):
    raise ConfigError(f'{directory!r} is not a directory')
  if os.path.isfile(os.path.join(directory, 'tokenizer.json')):
    return hf_tokenizer.HuggingFaceTokenizer.from_directory(directory)
  model_path = os.path.join(directory, 'tokenizer.model')
  if not os.path.isfile(model_path):
    raise ConfigError(f'{directory} has neither tokenizer.json nor tokenizer.model')
  settings = hf_tokenizer.read_checkpoint_settings(directory)
  with open(model_path, 'rb') as f:
    proto = f.read()
  tokenizer = SentencePieceTokenizer(proto, source=model_path,
                                     special_tokens=settings['special_tokens'],
                                     stop_ids=settings['stop_ids'],
                                     chat_template=settings['chat_template'],
                                     transformers_spaces=True,
                                     add_bos_token=settings['add_bos_token'])
  tokenizer.chat_template_source = settings['chat_template_source']
  return tokenizer


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
      return hf_tokenizer.HuggingFaceTokenizer.from_directory(path)
    except ConfigError as error:
      raise ConfigError(f'config.tokenizer.path={path!r}: {error}') from error
  raise ConfigError(f'config.tokenizer.kind={kind!r} is not one of'
                   ' "byte", "sentencepiece", "huggingface"')


def from_dict(data: dict):
  if data['kind'] == 'byte':
    return ByteTokenizer()
  if data['kind'] == 'huggingface':
    return hf_tokenizer.HuggingFaceTokenizer(
        data['tokenizer_json'], data['special_tokens'], stop_ids=data['stop_ids'],
        chat_template=data['chat_template'], source='checkpoint',
        add_bos_token=data.get('add_bos_token'), bos_token_id=data.get('bos_token_id'))
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
