"""Tokenizers: sentencepiece BPE with byte fallback, and a byte-level one for tiny runs.

Both fix the special ids: pad=0, bos=1, eos=2. A tokenizer serialises to a small
JSON-able dict (`to_dict`) that is stored in every checkpoint, so a run is always
sampled with the vocabulary it was trained with (`check_same`).
"""

import base64
import io
import os
from typing import Iterable

import numpy as np
import sentencepiece as spm

from lm.errors import ConfigError

PAD_ID, BOS_ID, EOS_ID = 0, 1, 2


class ByteTokenizer:
  """UTF-8 bytes shifted past the special ids: byte b -> b + 3."""
  kind = 'byte'
  vocab_size = 256 + 3
  pad_id, bos_id, eos_id = PAD_ID, BOS_ID, EOS_ID

  def encode(self, text: str) -> np.ndarray:
    return np.frombuffer(text.encode('utf-8'), dtype=np.uint8).astype(np.int32) + 3

  def decode(self, ids: Iterable[int]) -> str:
    data = bytes(int(i) - 3 for i in ids if 3 <= int(i) < self.vocab_size)
    return data.decode('utf-8', errors='replace')

  def to_dict(self) -> dict:
    return {'kind': self.kind}


class SentencePieceTokenizer:
  kind = 'sentencepiece'
  pad_id, bos_id, eos_id = PAD_ID, BOS_ID, EOS_ID

  def __init__(self, model_proto: bytes, source: str = '<bytes>'):
    self.model_proto = model_proto
    self._processor = spm.SentencePieceProcessor()
    try:
      self._processor.LoadFromSerializedProto(model_proto)
    except Exception as error:  # sentencepiece raises bare RuntimeError/OSError.
      raise ConfigError(f'{source} is not a valid sentencepiece model: {error}') from error
    ids = (self._processor.pad_id(), self._processor.bos_id(), self._processor.eos_id())
    if ids != (PAD_ID, BOS_ID, EOS_ID):
      raise ConfigError(
          f'{source}: special ids (pad, bos, eos) are {ids}, expected'
          f' {(PAD_ID, BOS_ID, EOS_ID)}; train it with `python -m experiments.train_tokenizer`')
    self.vocab_size = self._processor.vocab_size()

  @classmethod
  def load(cls, path: str) -> 'SentencePieceTokenizer':
    if not os.path.isfile(path):
      raise ConfigError(f'tokenizer model {path!r} does not exist')
    with open(path, 'rb') as f:
      return cls(f.read(), source=path)

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._processor.EncodeAsIds(text), dtype=np.int32)

  def decode(self, ids: Iterable[int]) -> str:
    return self._processor.DecodeIds([int(i) for i in ids])

  def to_dict(self) -> dict:
    return {'kind': self.kind, 'model_proto': base64.b64encode(self.model_proto).decode('ascii')}


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
  """From `config.tokenizer`: kind 'byte', or 'sentencepiece' with a model `path`."""
  if tokenizer_config.kind == 'byte':
    return ByteTokenizer()
  if tokenizer_config.kind == 'sentencepiece':
    if not tokenizer_config.path:
      raise ConfigError('config.tokenizer.path must name a sentencepiece .model file'
                       ' when config.tokenizer.kind="sentencepiece"')
    try:
      return SentencePieceTokenizer.load(tokenizer_config.path)
    except ConfigError as error:
      raise ConfigError(f'config.tokenizer.path: {error}') from error
  raise ConfigError(f'config.tokenizer.kind={tokenizer_config.kind!r} is not one of'
                   ' "byte", "sentencepiece"')


def from_dict(data: dict):
  if data['kind'] == 'byte':
    return ByteTokenizer()
  return SentencePieceTokenizer(base64.b64decode(data['model_proto']), source='checkpoint')


def check_same(saved: dict, current, where: str) -> None:
  """Raises if the tokenizer stored with a checkpoint differs from the configured one."""
  if saved != current.to_dict():
    raise ConfigError(
        f'tokenizer mismatch: the checkpoint in {where} was trained with a'
        f' {saved["kind"]} tokenizer that differs from the configured'
        f' {current.kind} tokenizer (config.tokenizer); use the tokenizer the run was'
        ' trained with')
