"""config.json checks of the Hugging Face import (lm/interop/hf.py `model_config`): every
field read is checked before use and a bad one is named in one line with the file and
its value; an absent one takes the default of transformers' own config class."""

import math
import re

import pytest
import transformers

from experiments.configs import default
from lm.errors import ConfigError
from lm.interop import hf

PATH = 'ckpt/config.json'
LLAMA = dict(architectures=['LlamaForCausalLM'], model_type='llama', vocab_size=300,
             hidden_size=64, num_hidden_layers=2, intermediate_size=96, num_attention_heads=4,
             num_key_value_heads=2)
MAMBA = dict(architectures=['MambaForCausalLM'], model_type='mamba', vocab_size=300,
             hidden_size=64, num_hidden_layers=2)
LLAMA3_ROPE = dict(rope_type='llama3', factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=16)


def model_config(config_json: dict):
  return hf.model_config(config_json, default.get_config().model, PATH)


def without(config_json: dict, field: str) -> dict:
  return {key: value for key, value in config_json.items() if key != field}


@pytest.mark.parametrize('base, field', [
    *[(LLAMA, field) for field in ('vocab_size', 'hidden_size', 'num_hidden_layers',
                                   'intermediate_size', 'num_attention_heads')],
    *[(MAMBA, field) for field in ('vocab_size', 'hidden_size', 'num_hidden_layers')],
])
def test_a_missing_required_field_is_named_with_the_file(base, field):
  with pytest.raises(ConfigError) as error:
    model_config(without(base, field))
  assert str(error.value) == f'{PATH}: "{field}" is missing'


@pytest.mark.parametrize('change, message', [
    (dict(num_hidden_layers='2'), '"num_hidden_layers": "2" must be a positive integer'),
    (dict(hidden_size=64.0), '"hidden_size": 64.0 must be a positive integer'),
    (dict(vocab_size=True), '"vocab_size": true must be a positive integer'),
    (dict(intermediate_size=0), '"intermediate_size": 0 must be a positive integer'),
    (dict(num_attention_heads=-4), '"num_attention_heads": -4 must be a positive integer'),
    (dict(num_hidden_layers=None), '"num_hidden_layers": null must be a positive integer'),
    (dict(rms_norm_eps='1e-5'), '"rms_norm_eps": "1e-5" must be a positive number'),
    (dict(rms_norm_eps=True), '"rms_norm_eps": true must be a positive number'),
    (dict(rope_theta=-1.0), '"rope_theta": -1.0 must be a positive number'),
    (dict(max_position_embeddings=4096.0),
     '"max_position_embeddings": 4096.0 must be a positive integer'),
    (dict(head_dim='16'), '"head_dim": "16" must be a positive integer'),
    (dict(tie_word_embeddings=1), '"tie_word_embeddings": 1 must be true or false'),
    (dict(attention_bias='false'), '"attention_bias": "false" must be true or false'),
    (dict(mlp_bias=None), '"mlp_bias": null must be true or false'),
    (dict(hidden_act=['silu']), '"hidden_act": ["silu"] must be a string'),
    (dict(torch_dtype=16), '"torch_dtype": 16 must be a string'),
    (dict(rope_scaling='llama3'), '"rope_scaling": "llama3" must be an object'),
    (dict(layer_types='full_attention'),
     '"layer_types": "full_attention" must be a list of "full_attention" and'
     ' "sliding_attention"'),
    (dict(layer_types=['full_attention']),
     '"layer_types" lists 1 layers, "num_hidden_layers" is 2'),
    (dict(num_key_value_heads=3),
     '"num_key_value_heads": 3 must divide "num_attention_heads": 4'),
    (dict(hidden_size=66, num_key_value_heads=None),
     '"hidden_size": 66 is not a multiple of "num_attention_heads": 4, and no "head_dim" is'
     ' given'),
    (dict(architectures=['MistralForCausalLM'], model_type='mistral', sliding_window='4096'),
     '"sliding_window": "4096" must be a positive integer'),
    (dict(architectures=['MistralForCausalLM'], model_type='mistral', sliding_window=0),
     '"sliding_window": 0 must be a positive integer'),
    (dict(architectures=['Qwen2ForCausalLM'], model_type='qwen2', use_sliding_window=1),
     '"use_sliding_window": 1 must be true or false'),
    (dict(architectures=['Qwen2ForCausalLM'], model_type='qwen2', use_sliding_window=True,
          max_window_layers=-1), '"max_window_layers": -1 must be a non-negative integer'),
    # Qwen2's default of 32 key/value heads (a file that has none) does not divide 4.
    (dict(architectures=['Qwen2ForCausalLM'], model_type='qwen2', num_key_value_heads=...),
     '"num_key_value_heads": 32 (the qwen2 default) must divide "num_attention_heads": 4'),
])
def test_a_field_of_the_wrong_type_or_sign_is_named_with_its_value(change, message):
  config_json = {**LLAMA, **change}
  config_json = {key: value for key, value in config_json.items() if value is not ...}
  with pytest.raises(ConfigError) as error:
    model_config(config_json)
  assert str(error.value) == f'{PATH}: {message}'
  assert '\n' not in str(error.value)


@pytest.mark.parametrize('rope_field', ['rope_scaling', 'rope_parameters'])
@pytest.mark.parametrize('key', ['factor', 'low_freq_factor', 'high_freq_factor'])
def test_a_llama3_rope_without_a_factor_is_named_by_key(rope_field, key):
  rope = {name: value for name, value in LLAMA3_ROPE.items() if name != key}
  with pytest.raises(ConfigError) as error:
    model_config({**LLAMA, rope_field: rope})
  assert str(error.value) == f'{PATH}: "{rope_field}.{key}" is missing'


@pytest.mark.parametrize('key, value, expected', [
    ('factor', '8', 'a positive number'), ('low_freq_factor', None, 'a positive number'),
    ('original_max_position_embeddings', 16.5, 'a positive integer'),
    ('rope_theta', 'big', 'a positive number'),
])
def test_a_llama3_rope_key_of_the_wrong_type_is_named(key, value, expected):
  rope = {**LLAMA3_ROPE, key: value}
  with pytest.raises(ConfigError) as error:
    model_config({**LLAMA, 'rope_scaling': rope})
  shown = {'8': '"8"', None: 'null', 16.5: '16.5', 'big': '"big"'}[value]
  assert str(error.value) == f'{PATH}: "rope_scaling.{key}": {shown} must be {expected}'


@pytest.mark.parametrize('change, message', [
    (dict(state_size='16'), '"state_size": "16" must be a positive integer'),
    (dict(expand=2.5), '"expand": 2.5 must be a positive integer'),
    (dict(time_step_rank='big'), '"time_step_rank": "big" must be "auto" or a positive integer'),
    (dict(layer_norm_epsilon=0), '"layer_norm_epsilon": 0 must be a positive number'),
    (dict(use_conv_bias='yes'), '"use_conv_bias": "yes" must be true or false'),
    (dict(max_position_embeddings=-1), '"max_position_embeddings": -1 must be a positive integer'),
])
def test_a_bad_mamba_field_is_named_with_its_value(change, message):
  with pytest.raises(ConfigError) as error:
    model_config({**MAMBA, **change})
  assert str(error.value) == f'{PATH}: {message}'


REQUIRED_ONLY = dict(vocab_size=300, hidden_size=64, num_hidden_layers=2, intermediate_size=96,
                     num_attention_heads=32)


@pytest.mark.parametrize('architecture', sorted(hf.LLAMA_LIKE))
def test_absent_fields_take_the_defaults_of_transformers_config_classes(architecture):
  model_type = hf.LLAMA_LIKE[architecture]
  theirs = transformers.AutoConfig.for_model(model_type, **REQUIRED_ONLY)
  ours = model_config(dict(architectures=[architecture], **REQUIRED_ONLY))
  assert ours.num_kv_heads == theirs.num_key_value_heads
  head_dim = getattr(theirs, 'head_dim', None) or REQUIRED_ONLY['hidden_size'] // 32
  assert ours.head_dim == head_dim
  assert ours.max_seq_len == theirs.max_position_embeddings
  assert ours.tie_embeddings == theirs.tie_word_embeddings
  assert ours.norm_eps == theirs.rms_norm_eps
  assert ours.rope_theta == theirs.rope_parameters['rope_theta']
  # Mistral's 4096; none for Qwen (use_sliding_window is false) and Llama (no field).
  assert ours.sliding_window == (getattr(theirs, 'sliding_window', None) or 0)
  assert ours.qkv_bias == (model_type == 'qwen2') and not ours.attention_out_bias


def test_absent_mamba_fields_take_transformers_defaults():
  theirs = transformers.MambaConfig(**without(MAMBA, 'architectures'))
  ours = model_config(MAMBA)
  assert (ours.mamba_state_dim, ours.mamba_expand, ours.mamba_conv_width, ours.mamba_dt_rank) == (
      theirs.state_size, theirs.expand, theirs.conv_kernel, theirs.time_step_rank)
  assert ours.norm_eps == theirs.layer_norm_epsilon and ours.tie_embeddings
  assert ours.mamba_dt_rank == math.ceil(64 / 16)


@pytest.mark.parametrize('rope_field', ['rope_scaling', 'rope_parameters'])
def test_a_llama3_rope_without_its_pretraining_length_takes_transformers_default(rope_field):
  """transformers fills original_max_position_embeddings from max_position_embeddings."""
  rope = {key: value for key, value in LLAMA3_ROPE.items()
          if key != 'original_max_position_embeddings'}
  config_json = {**LLAMA, 'max_position_embeddings': 4096, rope_field: rope}
  theirs = transformers.LlamaConfig(**without(config_json, 'architectures'))
  ours = model_config(config_json)
  assert ours.rope_scaling.kind == 'llama3'
  assert ours.rope_scaling.original_max_len == 4096 == (
      theirs.rope_parameters['original_max_position_embeddings'])
  assert ours.rope_scaling.factor == theirs.rope_parameters['factor']


def test_rope_scaling_is_read_over_rope_parameters_as_transformers_does():
  config_json = {**LLAMA, 'rope_scaling': LLAMA3_ROPE,
                 'rope_parameters': dict(rope_type='default', rope_theta=7.0)}
  theirs = transformers.LlamaConfig(**without(config_json, 'architectures'))
  ours = model_config(config_json)
  assert theirs.rope_parameters['rope_type'] == ours.rope_scaling.kind == 'llama3'
  assert ours.rope_theta == theirs.rope_parameters['rope_theta']


@pytest.mark.parametrize('change, message', [
    (dict(architectures=['LlamaForCausalLM', 'MistralForCausalLM']),
     "architectures=['LlamaForCausalLM', 'MistralForCausalLM'] is not supported: lm imports"
     ' one model; name one'),
    (dict(vocab_size=10**12), 'vocab_size=1000000000000 is not supported: token ids are int32'),
])
def test_two_architectures_and_a_vocabulary_past_int32_are_refused(change, message):
  with pytest.raises(ConfigError, match=re.escape(f'{PATH}: {message}')):
    model_config({**LLAMA, **change})


def test_per_layer_rope_is_refused():
  config_json = {**LLAMA, 'rope_parameters': {'full_attention': dict(rope_theta=1e4)}}
  with pytest.raises(ConfigError, match=re.escape("rope_parameters=['full_attention']")):
    model_config(config_json)


def test_mistral_ignores_attention_bias_as_transformers_does():
  config_json = {**LLAMA, 'architectures': ['MistralForCausalLM'], 'model_type': 'mistral',
                 'attention_bias': True, 'sliding_window': None}
  ours = model_config(config_json)
  assert not ours.qkv_bias and not ours.attention_out_bias and ours.sliding_window == 0
