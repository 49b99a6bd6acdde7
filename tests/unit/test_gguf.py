"""lm/interop/gguf.py without llama.cpp: the architecture each model is written as, what
is refused, the tokenizer mapping, the RoPE permutation and the tensor types.
(tests/integration/test_gguf_runs.py runs the files in llama.cpp.)"""

import gguf as gguf_py
import numpy as np
import pytest
import tokenizers

from lm import chat
from lm import tokenizer as tokenizer_lib
from lm.errors import ConfigError
from lm.interop import gguf, hf_tokenizer
from lm.models import layers

from helpers import init_model, small_model_config


@pytest.mark.parametrize('fields, arch', [
    ({}, 'llama'),
    (dict(qkv_bias=True), 'qwen2'),
    (dict(qkv_bias=True, attention_out_bias=True), 'llama'),
    (dict(qkv_bias=True, head_dim=16), 'llama'),  # qwen2 assumes N * H == D.
    (dict(qkv_bias=True, rope_scaling=dict(layers.NO_ROPE_SCALING, kind='llama3')), 'llama'),
    (dict(qk_norm=True), 'qwen3'),
    (dict(qk_norm=True, qkv_bias=True), 'qwen3'),
    (dict(sliding_window=64), 'llama'),  # As long as the context: it never binds.
])
def test_models_are_written_as_the_architecture_that_loads_their_tensors(fields, arch):
  assert gguf.architecture(small_model_config(**fields)) == arch


@pytest.mark.parametrize('fields, message', [
    (dict(layer_pattern='mamba'), 'export Mamba with --to_hf'),
    (dict(layer_pattern='mamba,attention'), 'no architecture for a hybrid'),
    (dict(sliding_window=8), 'outputs would differ past 8 tokens'),
    (dict(qk_norm=True, qkv_bias=True, attention_out_bias=True),
     'qwen3 loads no bias on the attention output'),
    (dict(qk_norm=True, rope_scaling=dict(layers.NO_ROPE_SCALING, kind='llama3')),
     'qwen3 has no llama3 RoPE scaling'),
])
def test_what_llama_cpp_does_not_compute_is_refused_in_one_line(fields, message):
  with pytest.raises(ConfigError, match=message) as error:
    gguf.architecture(small_model_config(**fields))
  assert '\n' not in str(error.value)


def test_an_unknown_type_is_refused_before_anything_is_written(tmp_path):
  with pytest.raises(ConfigError, match="--gguf_type='q5_k' is not one of f32, f16, q8_0, q4_0"):
    gguf.write(str(tmp_path / 'm.gguf'), small_model_config(), {}, tokenizer_lib.ByteTokenizer(),
               'q5_k', np.asarray)
  assert not (tmp_path / 'm.gguf').exists()


def test_a_write_that_fails_midway_leaves_no_file_and_other_processes_only_gather(tmp_path):
  config = small_model_config(vocab_size=264)
  _, params = init_model(config)
  gathered = []

  def to_host(array):  # The fourth tensor cannot be gathered.
    gathered.append(array)
    if len(gathered) == 4:
      raise RuntimeError('gather failed')
    return np.asarray(array)

  with pytest.raises(RuntimeError, match='gather failed'):
    gguf.write(str(tmp_path / 'm.gguf'), config, params, tokenizer_lib.ByteTokenizer(), 'f16',
               to_host)
  assert not (tmp_path / 'm.gguf').exists()
  assert gguf.write(str(tmp_path / 'm.gguf'), config, params, tokenizer_lib.ByteTokenizer(),
                    'f16', np.asarray) == {'F32': 5, 'F16': 16}
  gathered.clear()
  # Processes other than 0 gather every tensor (a collective) and write nothing.
  assert gguf.write(None, config, params, tokenizer_lib.ByteTokenizer(), 'f16',
                    lambda array: gathered.append(array) or np.asarray(array)) \
      == {'F32': 5, 'F16': 16}
  assert len(gathered) == 21
  with pytest.raises(ConfigError, match='m.gguf exists; give a new file path'):
    gguf.write(str(tmp_path / 'm.gguf'), config, params, tokenizer_lib.ByteTokenizer(), 'f16',
               np.asarray)


def test_interleaving_turns_rotate_half_rope_into_llama_cpp_pairs():
  """RoPE by halves on q equals RoPE on interleaved pairs of the permuted q, per head."""
  heads, head_dim, position, theta = 2, 8, 5.0, 10_000.0
  rng = np.random.default_rng(0)
  rows = rng.normal(size=(heads * head_dim, 3))
  angles = position * theta ** -(np.arange(0, head_dim, 2) / head_dim)
  cos, sin = np.cos(angles), np.sin(angles)

  def halves(x):  # [H]
    x1, x2 = x[:head_dim // 2], x[head_dim // 2:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin])

  def pairs(x):
    even, odd = x[0::2], x[1::2]
    return np.stack([even * cos - odd * sin, odd * cos + even * sin], -1).reshape(-1)

  interleave = gguf._interleave  # pylint: disable=protected-access
  permuted = interleave(rows, heads)
  for head in range(heads):
    block = slice(head * head_dim, (head + 1) * head_dim)
    for column in range(rows.shape[1]):
      rotated = halves(rows[block, column])
      # The same values in the same permuted order, for q and k: scores are unchanged.
      np.testing.assert_allclose(pairs(permuted[block, column]),
                                 interleave(rotated[:, None], 1)[:, 0])


def test_byte_tokenizer_is_byte_tokens_with_the_space_as_llama_cpps_marker():
  fields = gguf.vocabulary(tokenizer_lib.ByteTokenizer(), 264)
  assert fields['model'] == 'llama' and not fields['add_space_prefix']
  tokens, types = fields['tokens'], fields['types']
  assert len(tokens) == len(types) == 264
  assert tokens[:3] == ['<pad>', '<s>', '</s>'] and types[:3] == [gguf_py.TokenType.CONTROL] * 3
  assert tokens[3 + ord('A')] == '<0x41>' and types[3 + ord('A')] == gguf_py.TokenType.BYTE
  assert tokens[3 + ord(' ')] == '▁' and types[3 + ord(' ')] == gguf_py.TokenType.NORMAL
  assert tokens[259:] == [f'[PAD{i}]' for i in range(259, 264)]
  assert set(types[259:]) == {gguf_py.TokenType.UNUSED}
  assert (fields['bos_id'], fields['eos_id'], fields['pad_id']) == (1, 2, 0)
  assert fields['add_bos']
  assert fields['chat_template'] == chat.DEFAULT_TEMPLATE and fields['eot_id'] is None


def test_the_byte_tokenizer_exported_and_imported_again_is_still_byte_tokens():
  imported = hf_tokenizer.HuggingFaceTokenizer(
      hf_tokenizer.byte_tokenizer_json(), tokenizer_lib.ByteTokenizer.special_tokens)
  fields = gguf.vocabulary(imported, 264)
  assert fields == gguf.vocabulary(tokenizer_lib.ByteTokenizer(), 264)


def test_a_vocabulary_larger_than_the_model_is_refused():
  with pytest.raises(ConfigError, match='259 ids, more than config.model.vocab_size=200'):
    gguf.vocabulary(tokenizer_lib.ByteTokenizer(), 200)


def test_sentencepiece_pieces_keep_their_scores_and_types(tmp_path):
  texts = ['the cat sat on the mat, 123 times.\n  indented'] * 20
  tokenizer = tokenizer_lib.train_sentencepiece(texts, 300, str(tmp_path / 'sp.model'))
  fields = gguf.vocabulary(tokenizer, 304)
  assert fields['model'] == 'llama' and not fields['add_space_prefix']
  assert fields['tokens'][1:3] == ['<s>', '</s>'] and fields['unk_id'] == 3
  assert fields['tokens'][4:6] == ['<0x00>', '<0x01>']
  assert fields['types'][4] == gguf_py.TokenType.BYTE
  piece = fields['tokens'][tokenizer.encode('the')[0]]
  assert piece in ('the', 't') and fields['scores'][300:] == [0.0] * 4


TEMPLATE = "{% for m in messages %}{{ m['content'] }}<eos>{% endfor %}"


def _bpe_tokenizer(pre_tokenizer, **bpe) -> hf_tokenizer.HuggingFaceTokenizer:
  model = tokenizers.Tokenizer(tokenizers.models.BPE(
      vocab={'a': 0, 'b': 1, 'ab': 2, '<eos>': 3}, merges=[('a', 'b')], **bpe))
  model.pre_tokenizer = pre_tokenizer
  model.decoder = tokenizers.decoders.ByteLevel()
  model.add_special_tokens([tokenizers.AddedToken('<eos>', special=True)])
  return hf_tokenizer.HuggingFaceTokenizer(model.to_str(), {'eos_token': '<eos>'},
                                           chat_template=TEMPLATE)


def test_byte_level_bpe_names_its_pre_tokenizer_and_keeps_its_merges():
  pre = tokenizers.pre_tokenizers
  plain = gguf.vocabulary(_bpe_tokenizer(pre.ByteLevel(add_prefix_space=False)), 8)
  assert (plain['model'], plain['pre'], plain['merges']) == ('gpt2', 'gpt-2', ['a b'])
  assert plain['tokens'][:4] == ['a', 'b', 'ab', '<eos>'] and plain['chat_template'] == TEMPLATE
  assert plain['types'][2:5] == [gguf_py.TokenType.NORMAL, gguf_py.TokenType.CONTROL,
                                 gguf_py.TokenType.UNUSED]
  assert (plain['bos_id'], plain['eos_id'], plain['add_bos']) == (None, 3, False)
  qwen = pre.Sequence([pre.Split(tokenizers.Regex(gguf.QWEN2_SPLIT), 'isolated'),
                       pre.ByteLevel(add_prefix_space=False, use_regex=False)])
  assert gguf.vocabulary(_bpe_tokenizer(qwen), 4)['pre'] == 'qwen2'
  llama3 = pre.Sequence([pre.Split(tokenizers.Regex(gguf.LLAMA3_SPLIT), 'isolated'),
                         pre.ByteLevel(add_prefix_space=False, use_regex=False)])
  assert gguf.vocabulary(_bpe_tokenizer(llama3, ignore_merges=True), 4)['pre'] == 'llama-bpe'
  with pytest.raises(ConfigError, match="ignore_merges=False, but llama.cpp's 'llama-bpe'"):
    gguf.vocabulary(_bpe_tokenizer(llama3), 4)
  with pytest.raises(ConfigError, match='is not one llama.cpp splits text by'):
    gguf.vocabulary(_bpe_tokenizer(pre.Whitespace()), 4)
  with pytest.raises(ConfigError, match='import the checkpoint with its tokenizer.model'):
    gguf.vocabulary(_bpe_tokenizer(pre.Metaspace(), byte_fallback=True), 4)
  with pytest.raises(ConfigError, match='is not one llama.cpp splits text by'):
    gguf.vocabulary(_bpe_tokenizer(pre.ByteLevel(add_prefix_space=True)), 4)


@pytest.mark.parametrize('name, shape, gguf_type, stored', [
    ('blk.0.attn_q.weight', (64, 64), 'q8_0', 'Q8_0'),
    ('blk.0.ffn_down.weight', (64, 48), 'q8_0', 'F16'),  # Rows of 48 do not fill 32-blocks.
    ('blk.0.attn_norm.weight', (64,), 'q4_0', 'F32'),
    ('blk.0.attn_q.bias', (64,), 'f16', 'F32'),
    ('blk.0.attn_q.weight', (64, 64), 'q4_0', 'Q4_0'),
    ('token_embd.weight', (64, 64), 'q4_0', 'Q8_0'),
    ('output.weight', (64, 64), 'f16', 'F16'),
])
def test_matrices_take_the_type_and_vectors_stay_float32(name, shape, gguf_type, stored):
  array = np.random.default_rng(0).normal(size=shape).astype(np.float32)
  data, kind = gguf.encode_tensor(name, array, gguf_type)
  assert kind.name == stored
  back = gguf_py.quants.dequantize(data, kind).reshape(shape)
  # Q4_0 rounds to 16 steps of a block's largest magnitude / 8; Q8_0 to 256.
  np.testing.assert_allclose(back, array, atol=np.abs(array).max() / (8 if stored == 'Q4_0'
                                                                     else 100))
