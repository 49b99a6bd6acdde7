"""The tokenizer of a Hugging Face checkpoint: `HuggingFaceTokenizer`, its `tokenizers`
tokenizer.json, with the special tokens, stop ids and chat template its other files give
(`read_checkpoint_settings`; lm/tokenizer.py's `from_hf_directory` gives them to a
checkpoint's bare sentencepiece tokenizer.model too). `byte_tokenizer_json` is lm's byte
tokenizer as a tokenizer.json, for export.

A Hugging Face checkpoint brings its own ids, read from its files:

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

`encode` turns a special token's text into its id, as transformers does
(`matches_special_tokens`), and `to_dict` holds the whole tokenizer.json.
"""

import json
import os
from typing import Iterable

import numpy as np
import tokenizers

from lm.errors import ConfigError
from lm.tokenizer_base import BOS_ID, PromptIds

# The named special tokens transformers passes to a chat template (`special_tokens_map`).
SPECIAL_TOKEN_NAMES = ('bos_token', 'eos_token', 'unk_token', 'sep_token', 'pad_token',
                       'cls_token', 'mask_token')


class HuggingFaceTokenizer(PromptIds):
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
    settings = read_checkpoint_settings(directory)
    tokenizer = cls(tokenizer_json, settings['special_tokens'], stop_ids=settings['stop_ids'],
                    chat_template=settings['chat_template'], source=json_path,
                    add_bos_token=settings['add_bos_token'],
                    bos_token_id=settings['bos_token_id'])
    tokenizer.chat_template_source = settings['chat_template_source']
    return tokenizer

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


def read_checkpoint_settings(directory: str) -> dict:
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
  template_source = template_path if os.path.isfile(template_path) else config_path
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
          'bos_token_id': bos_token_id,
          'chat_template_source': template_source if chat_template is not None else None}


def byte_tokenizer_json() -> str:
  """A tokenizer.json (for the `tokenizers` library and transformers) that encodes and
  decodes UTF-8 text exactly as lm/tokenizer.py's `ByteTokenizer`: byte b -> b + 3,
  <pad>=0, <s>=1, </s>=2, byte-level BPE with no merges; `tokenizer(text)` puts <s> in
  front, as lm trains. As in every Hugging Face tokenizer, the text '<s>' etc. encodes as
  the special id."""
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
