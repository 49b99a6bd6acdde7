"""GGUF files that llama.cpp runs, written with `gguf` (llama.cpp's own Python writer).

`write` turns an attention model of `lm` (trained here or imported) with its tokenizer and
chat template into one file that llama.cpp needs nothing beside:

- Architecture: 'qwen3' for query/key norms (with or without q/k/v biases; it loads no
  output bias), 'qwen2' for q/k/v biases alone (when num_heads * head_dim == embed_dim,
  which llama.cpp's qwen2 assumes, and RoPE is unscaled), else 'llama'
  (optional q/k/v and output biases, any head_dim, llama3 RoPE scaling as its
  `rope_freqs` tensor). llama.cpp's 'llama' rotates interleaved pairs (2i, 2i+1) where lm
  (like transformers) rotates halves (i, i + H/2); qwen2/qwen3 rotate halves. So for
  'llama' each head's query and key rows (weights and biases) are permuted, as llama.cpp's
  convert_hf_to_gguf.py does: attention scores are unchanged, RoPE matches.
- Tensors: hf.hf_tensors' Hugging Face layout (lm's sqrt(D) embedding scale folded into
  an untied input table), renamed by gguf's own tensor map, gathered and written one at
  a time. Norms, biases and other 1-D
  tensors stay float32; f16, q8_0 and q4_0 cast or quantize the matrices with gguf.quants.
  A matrix whose rows are not a multiple of the 32-value block falls back to f16, and q4_0
  keeps the embedding and output head at q8_0 (llama.cpp's quantizer keeps its output head
  at higher precision too).
- Tokenizer: the byte tokenizer (or its tokenizer.json form, from --to_hf) as
  sentencepiece-style 'llama' with byte tokens <0xNN>
  (llama.cpp writes spaces as '▁' before it looks tokens up, so byte 0x20's token is '▁':
  a literal '▁' in a text becomes one token here, three bytes in lm); a sentencepiece
  model as 'llama' with its pieces, scores and types; a tokenizer.json byte-level BPE as
  'gpt2' with its merges and the pre-tokenizer name llama.cpp splits text by ('gpt-2',
  'llama-bpe', 'qwen2'). Rows of the embedding past the tokenizer's ids are unused tokens.
- The special ids, whether bos is added, the end-of-turn token, and the chat template lm
  renders conversations with (the tokenizer's own, else lm.chat.DEFAULT_TEMPLATE).

Refused in one line, before the file is opened: Mamba and hybrid blocks, a sliding window
shorter than the context, settings an architecture does not load, a tokenizer llama.cpp
would split differently, an unknown type.
"""

import json
import os

import gguf
import numpy as np

from lm import chat
from lm.errors import ConfigError, check
from lm.interop import hf, hf_tokenizer
from lm.models import decoder, layers

# --gguf_type -> (the matrices' type, the file type llama.cpp reports).
TYPES = {
    'f32': (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
    'f16': (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
    'q8_0': (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
    'q4_0': (gguf.GGMLQuantizationType.Q4_0, gguf.LlamaFileType.MOSTLY_Q4_0),
}
_ARCHITECTURES = {'llama': gguf.MODEL_ARCH.LLAMA, 'qwen2': gguf.MODEL_ARCH.QWEN2,
                  'qwen3': gguf.MODEL_ARCH.QWEN3}

# The regular expressions of the Split pre-tokenizers llama.cpp knows by name, as
# tokenizer.json files write them (Llama 3's, Qwen2's); a bare ByteLevel splits by GPT-2's.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
               r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
SPLIT_PRE_TOKENIZERS = {LLAMA3_SPLIT: 'llama-bpe', QWEN2_SPLIT: 'qwen2'}
# llama.cpp takes a whole word that is a token as it is (tokenizers' ignore_merges) for these.
_IGNORES_MERGES = {'llama-bpe'}


def architecture(model) -> str:
  """The llama.cpp architecture of `config.model`; what none computes is refused."""
  kinds = set(decoder.layer_kinds(model))
  if kinds == {'mamba'}:
    raise ConfigError(f'config.model.layer_pattern={model.layer_pattern!r}: --to_gguf writes'
                      ' attention models; export Mamba with --to_hf and convert that with'
                      ' llama.cpp\'s convert_hf_to_gguf.py')
  check(kinds == {'attention'},
        f'config.model.layer_pattern={model.layer_pattern!r}: llama.cpp has no architecture'
        ' for a hybrid of attention and Mamba layers')
  check(not 0 < model.sliding_window < model.max_seq_len,
        f'config.model.sliding_window={model.sliding_window}: llama.cpp\'s llama, qwen2 and'
        ' qwen3 attend to every earlier token, so outputs would differ past'
        f' {model.sliding_window} tokens (max_seq_len={model.max_seq_len})')
  if model.qk_norm:
    check(not model.attention_out_bias,
          'config.model.qk_norm with attention_out_bias: llama.cpp\'s qwen3 loads no bias on'
          ' the attention output')
    check(model.rope_scaling.kind == 'none',
          f'config.model.rope_scaling.kind={model.rope_scaling.kind!r} with qk_norm:'
          ' llama.cpp\'s qwen3 has no llama3 RoPE scaling')
    return 'qwen3'
  if (model.qkv_bias and not model.attention_out_bias and model.rope_scaling.kind == 'none'
      and model.num_heads * model.head_dim == model.embed_dim):
    return 'qwen2'
  return 'llama'  # Which loads the same biases too, and llama3 RoPE scaling.


def _interleave(rows: np.ndarray, heads: int) -> np.ndarray:
  """[heads * H, ...] rows of rotate-half heads -> each head's rows in interleaved pairs:
  row j and j + H/2 of a head go to 2j and 2j + 1."""
  return (rows.reshape(heads, 2, rows.shape[0] // heads // 2, *rows.shape[1:])
          .swapaxes(1, 2).reshape(rows.shape))


def tensors(model, params, to_host, arch: str):
  """(GGUF name, float32 array in PyTorch's [out, in] layout) pairs, one at a time."""
  names = gguf.get_tensor_name_map(_ARCHITECTURES[arch], model.num_layers)
  for hf_name, array in hf.hf_tensors(model, params, to_host):
    array = np.asarray(array, np.float32)
    if arch == 'llama' and '.self_attn.q_proj.' in hf_name:
      array = _interleave(array, model.num_heads)
    elif arch == 'llama' and '.self_attn.k_proj.' in hf_name:
      array = _interleave(array, model.num_kv_heads)
    name = names.get_name(hf_name, try_suffixes=('.weight', '.bias'))
    if name is None:  # A bug, not bad input: the map must cover the model.
      raise AssertionError(f'no GGUF name for {hf_name} in {arch}')
    yield name, array
  if model.rope_scaling.kind == 'llama3':
    # llama.cpp divides each RoPE frequency by its factor from this tensor.
    plain = np.asarray(layers.rope_frequencies(model.head_dim, model.rope_theta))
    scaled = np.asarray(layers.rope_frequencies(model.head_dim, model.rope_theta,
                                                model.rope_scaling))
    yield gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + '.weight', \
        (plain / scaled).astype(np.float32)


def tensor_type(name: str, shape: tuple, gguf_type: str):
  """The type the tensor `name` of `shape` is stored in for `gguf_type`: 1-D tensors and
  norms float32; q4_0's embedding and output head q8_0; a matrix whose rows do not fill
  its type's blocks f16, as llama.cpp's converter does."""
  if len(shape) <= 1 or name.endswith('_norm.weight'):
    return gguf.GGMLQuantizationType.F32
  kind = TYPES[gguf_type][0]
  if gguf_type == 'q4_0' and name.split('.')[0] in ('token_embd', 'output'):
    kind = gguf.GGMLQuantizationType.Q8_0
  if shape[-1] % gguf.GGML_QUANT_SIZES[kind][0]:
    kind = gguf.GGMLQuantizationType.F16
  return kind


def encode_tensor(name: str, array: np.ndarray, gguf_type: str):
  """(data, its type): `array` cast or quantized by gguf.quants to its tensor_type."""
  kind = tensor_type(name, array.shape, gguf_type)
  return gguf.quants.quantize(array, kind), kind


def _padded(tokens, scores, types, vocab_size: int, source: str):
  """The token lists grown to the model's vocab_size with unused tokens."""
  check(len(tokens) <= vocab_size,
        f'{source} has {len(tokens)} ids, more than config.model.vocab_size={vocab_size}')
  extra = range(len(tokens), vocab_size)
  return ([*tokens, *(f'[PAD{i}]' for i in extra)], [*scores, *(0.0 for _ in extra)],
          [*types, *(gguf.TokenType.UNUSED for _ in extra)])


def _byte_vocabulary(tokenizer) -> dict:
  specials = ['<pad>', '<s>', '</s>']
  assert [tokenizer.token_to_id(token) for token in specials] == [0, 1, 2]
  tokens = [*specials, *(f'<0x{byte:02X}>' for byte in range(256))]
  types = [gguf.TokenType.CONTROL] * 3 + [gguf.TokenType.BYTE] * 256
  space = len(specials) + ord(' ')
  # llama.cpp's sentencepiece tokenizer looks spaces up as '▁'.
  tokens[space], types[space] = '▁', gguf.TokenType.NORMAL
  return dict(model='llama', tokens=tokens, scores=[0.0] * len(tokens), types=types,
              add_space_prefix=False)


def _sentencepiece_vocabulary(tokenizer) -> dict:
  from sentencepiece import sentencepiece_model_pb2  # pylint: disable=import-outside-toplevel
  proto = sentencepiece_model_pb2.ModelProto()
  proto.ParseFromString(tokenizer.model_proto)
  normalizer, trainer = proto.normalizer_spec, proto.trainer_spec
  source = 'the run\'s sentencepiece tokenizer'
  check(trainer.model_type == trainer.BPE,
        f'{source} is a {trainer.ModelType.Name(trainer.model_type)} model; llama.cpp\'s'
        ' sentencepiece tokenizer merges BPE pieces by score, which splits others differently')
  check(normalizer.name in ('identity', '') and not normalizer.precompiled_charsmap,
        f'{source} normalizes text ({normalizer.name!r}), which llama.cpp does not')
  check(not normalizer.remove_extra_whitespaces,
        f'{source} removes extra whitespace, which llama.cpp\'s tokenizer does not')
  piece = proto.SentencePiece
  types = {piece.NORMAL: gguf.TokenType.NORMAL, piece.UNKNOWN: gguf.TokenType.UNKNOWN,
           piece.CONTROL: gguf.TokenType.CONTROL, piece.USER_DEFINED: gguf.TokenType.USER_DEFINED,
           piece.UNUSED: gguf.TokenType.UNUSED, piece.BYTE: gguf.TokenType.BYTE}
  return dict(model='llama', tokens=[piece.piece for piece in proto.pieces],
              scores=[piece.score for piece in proto.pieces],
              types=[types[piece.type] for piece in proto.pieces],
              add_space_prefix=bool(normalizer.add_dummy_prefix),
              unk_id=proto.trainer_spec.unk_id if proto.trainer_spec.unk_id >= 0 else None)


def bpe_pre_tokenizer(pre_tokenizer, source: str) -> str:
  """llama.cpp's name for a tokenizer.json byte-level pre-tokenizer (a dict)."""
  def byte_level(step, use_regex):
    return (isinstance(step, dict) and step.get('type') == 'ByteLevel'
            and not step.get('add_prefix_space', False)
            and step.get('use_regex', True) == use_regex)
  if byte_level(pre_tokenizer, True):
    return 'gpt-2'
  steps = (pre_tokenizer or {}).get('pretokenizers') or []
  if (len(steps) == 2 and steps[0].get('type') == 'Split' and byte_level(steps[1], False)
      and steps[0].get('behavior') == 'Isolated' and not steps[0].get('invert')):
    pattern = (steps[0].get('pattern') or {}).get('Regex')
    if pattern in SPLIT_PRE_TOKENIZERS:
      return SPLIT_PRE_TOKENIZERS[pattern]
  shown = json.dumps(pre_tokenizer)
  raise ConfigError(f'{source}: its pre-tokenizer ({shown[:60]}{"..." if len(shown) > 60 else ""})'
                    ' is not one llama.cpp splits text by here (GPT-2\'s ByteLevel, Llama 3\'s'
                    ' or Qwen2\'s Split)')


def _bpe_vocabulary(tokenizer) -> dict:
  source = 'the run\'s tokenizer.json'
  data = json.loads(tokenizer.tokenizer_json)
  if data == json.loads(hf_tokenizer.byte_tokenizer_json()):
    # lm's byte tokenizer as --to_hf writes it (a model exported and imported again): a
    # BPE without merges, which llama.cpp's BPE cannot load.
    return _byte_vocabulary(tokenizer)
  model = data.get('model') or {}
  check(not model.get('byte_fallback'),
        f'{source}: a sentencepiece-style BPE (byte fallback) has no GGUF form here: import'
        ' the checkpoint with its tokenizer.model and without tokenizer.json, then export')
  check(model.get('type') == 'BPE',
        f'{source}: a {model.get("type")} model has no GGUF form here; llama.cpp reads'
        ' byte-level BPE (GPT-2, Llama 3, Qwen2)')
  check((data.get('decoder') or {}).get('type') == 'ByteLevel',
        f'{source}: its decoder is not ByteLevel, so it is not a byte-level BPE')
  normalizer = data.get('normalizer')
  check(normalizer is None or normalizer.get('type') == 'NFC',
        f'{source}: its normalizer ({normalizer.get("type") if normalizer else None}) is not'
        ' one llama.cpp applies')
  pre = bpe_pre_tokenizer(data.get('pre_tokenizer'), source)
  check(bool(model.get('ignore_merges')) == (pre in _IGNORES_MERGES),
        f'{source}: ignore_merges={bool(model.get("ignore_merges"))}, but llama.cpp\'s'
        f' {pre!r} pre-tokenizer has it {pre in _IGNORES_MERGES}')
  by_id = {int(i): token for token, i in model['vocab'].items()}
  kinds = {int(i): gguf.TokenType.NORMAL for i in by_id}
  for added in data.get('added_tokens') or []:
    by_id[added['id']] = added['content']
    kinds[added['id']] = (gguf.TokenType.CONTROL if added.get('special')
                          else gguf.TokenType.USER_DEFINED)
  size = tokenizer.vocab_size
  tokens = [by_id.get(i, f'[PAD{i}]') for i in range(size)]
  types = [kinds.get(i, gguf.TokenType.UNUSED) for i in range(size)]
  merges = [merge if isinstance(merge, str) else ' '.join(merge) for merge in model['merges']]
  check(merges, f'{source} has no merges; llama.cpp needs a BPE with merges')
  return dict(model='gpt2', pre=pre, tokens=tokens, scores=[0.0] * size, types=types,
              merges=merges)


_VOCABULARIES = {'byte': _byte_vocabulary, 'sentencepiece': _sentencepiece_vocabulary,
                 'huggingface': _bpe_vocabulary}


def vocabulary(tokenizer, vocab_size: int) -> dict:
  """The GGUF tokenizer fields of lm's `tokenizer` for a model of `vocab_size` rows."""
  check(tokenizer.kind in _VOCABULARIES, f'a {tokenizer.kind} tokenizer has no GGUF form here')
  fields = _VOCABULARIES[tokenizer.kind](tokenizer)
  fields['tokens'], fields['scores'], fields['types'] = _padded(
      fields['tokens'], fields['scores'], fields['types'], vocab_size,
      f'the run\'s {tokenizer.kind} tokenizer')
  ends = [i for i in chat.end_of_turn_ids(tokenizer) if i != tokenizer.eos_id]
  fields.update(bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id,
                eot_id=ends[0] if ends else None, add_bos=bool(tokenizer.adds_bos),
                chat_template=(tokenizer.chat_template if tokenizer.chat_template is not None
                               else chat.DEFAULT_TEMPLATE))
  return fields


def _add_vocabulary(writer, fields: dict) -> None:
  writer.add_tokenizer_model(fields['model'])
  if 'pre' in fields:
    writer.add_tokenizer_pre(fields['pre'])
  writer.add_token_list(fields['tokens'])
  writer.add_token_scores(fields['scores'])
  writer.add_token_types(fields['types'])
  if 'merges' in fields:
    writer.add_token_merges(fields['merges'])
  if 'add_space_prefix' in fields:
    writer.add_add_space_prefix(fields['add_space_prefix'])
  for key, add in (('bos_id', writer.add_bos_token_id), ('eos_id', writer.add_eos_token_id),
                   ('pad_id', writer.add_pad_token_id), ('eot_id', writer.add_eot_token_id),
                   ('unk_id', writer.add_unk_token_id)):
    if fields.get(key) is not None:
      add(int(fields[key]))
  writer.add_add_bos_token(fields['add_bos'])
  writer.add_add_eos_token(False)
  writer.add_chat_template(fields['chat_template'])


def write(path: str | None, model, params, tokenizer, gguf_type: str, to_host, *,
          name: str = 'lm') -> dict:
  """Writes the GGUF file of `config.model`'s `params` (to_host gathers one array, a
  collective on every process) and `tokenizer` to `path` (None: only gather, on processes
  other than 0); returns {type name: count of tensors stored so}. Everything is checked
  and every tensor's name, shape and type laid out before the file is opened; then the
  tensors are gathered, encoded and written one at a time (host memory holds one), and a
  failed write leaves no file."""
  check(gguf_type in TYPES, f'--gguf_type={gguf_type!r} is not one of {", ".join(TYPES)}')
  check(path is None or not os.path.lexists(path), f'{path} exists; give a new file path')
  arch = architecture(model)
  fields = vocabulary(tokenizer, model.vocab_size)
  writer = gguf.GGUFWriter(None, gguf.MODEL_ARCH_NAMES[_ARCHITECTURES[arch]])
  writer.add_name(name)
  writer.add_context_length(model.max_seq_len)
  writer.add_embedding_length(model.embed_dim)
  writer.add_block_count(model.num_layers)
  writer.add_feed_forward_length(model.mlp_dim)
  writer.add_head_count(model.num_heads)
  writer.add_head_count_kv(model.num_kv_heads)
  writer.add_key_length(model.head_dim)
  writer.add_value_length(model.head_dim)
  writer.add_rope_dimension_count(model.head_dim)
  writer.add_rope_freq_base(float(model.rope_theta))
  writer.add_layer_norm_rms_eps(float(model.norm_eps))
  writer.add_vocab_size(model.vocab_size)
  writer.add_file_type(TYPES[gguf_type][1])
  writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
  _add_vocabulary(writer, fields)
  # The layout from the shapes alone: the same pipeline over zeros, one tensor at a time.
  planned, counts = [], {}
  for tensor_name, array in tensors(model, params, lambda x: np.zeros(x.shape, x.dtype), arch):
    kind = tensor_type(tensor_name, array.shape, gguf_type)
    block, size = gguf.GGML_QUANT_SIZES[kind]
    writer.add_tensor_info(tensor_name, array.shape, np.dtype(np.float32),
                           array.size // block * size, raw_dtype=kind)
    planned.append((tensor_name, kind))
    counts[kind.name] = counts.get(kind.name, 0) + 1
  if path is None:
    for _ in tensors(model, params, to_host, arch):
      pass
    return counts
  try:
    writer.write_header_to_file(path)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for (tensor_name, array), (wanted, kind) in zip(tensors(model, params, to_host, arch),
                                                     planned, strict=True):
      assert tensor_name == wanted, (tensor_name, wanted)
      writer.write_tensor_data(gguf.quants.quantize(array, kind))
  except BaseException:
    writer.close()
    if os.path.isfile(path) and not os.path.islink(path):
      os.remove(path)
    raise
  writer.close()
  return counts
