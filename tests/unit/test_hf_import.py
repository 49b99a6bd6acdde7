"""Hugging Face import and export settings (lm/interop/hf.py) checked against
transformers' own rules: what the import refuses or derives from a config.json, the
config.json and tokenizer an export writes. (tests/integration/test_hf_import_models.py
imports and exports tiny random models.)"""

import types

import pytest
import transformers

from experiments.configs import default, open_models
from lm import chat
from lm import tokenizer as tokenizer_lib
from lm.errors import ConfigError
from lm.interop import hf, hf_tokenizer


def test_a_hybrid_model_is_refused_by_export_naming_the_field(tmp_path):
  base = default.get_config().model
  base.layer_pattern = 'mamba,attention'
  with pytest.raises(ConfigError, match='config.model.layer_pattern'):
    hf.save_model(str(tmp_path), base, {})


QWEN2 = dict(model_type='qwen2', architectures=['Qwen2ForCausalLM'])


@pytest.mark.parametrize('change, field', [
    (dict(rope_scaling=dict(rope_type='yarn', factor=4.0)), 'rope_type'),
    (dict(hidden_act='gelu'), 'hidden_act'),
    (dict(mlp_bias=True), 'mlp_bias'),
    (dict(architectures=['GPT2LMHeadModel']), 'architectures'),
    # Qwen2 slides the layers from max_window_layers (default 28 of these 32) on.
    (dict(**QWEN2, use_sliding_window=True, sliding_window=64), 'max_window_layers'),
    (dict(**QWEN2, use_sliding_window=True, sliding_window=64, max_window_layers=8),
     'max_window_layers'),
    (dict(**QWEN2, use_sliding_window=True, sliding_window=64,
          layer_types=['full_attention', 'sliding_attention'] * 16), 'layer_types'),
    (dict(**QWEN2, layer_types=['sliding_attention'] * 32), 'use_sliding_window'),
    (dict(layer_types=['sliding_attention', 'full_attention'] * 16), 'layer_types'),
    (dict(model_type='mistral'), 'model_type'),
])
def test_settings_lm_does_not_compute_are_refused_naming_the_field(change, field):
  published = {**open_models.PUBLISHED['llama3_8b'], **change}
  with pytest.raises(ConfigError, match=field):
    hf.model_config(published, default.get_config().model)


def test_mistral_s_window_is_the_model_s_and_no_longer_bounds_the_sequence_length():
  config = hf.model_config(open_models.PUBLISHED['mistral_7b'], default.get_config().model)
  assert config.sliding_window == 4096 and config.max_seq_len == 32768
  no_window = {**open_models.PUBLISHED['mistral_7b'], 'sliding_window': None}
  assert hf.model_config(no_window, default.get_config().model).sliding_window == 0


@pytest.mark.parametrize('change, window', [
    (dict(use_sliding_window=True, sliding_window=64, max_window_layers=0), 64),
    (dict(use_sliding_window=True, sliding_window=64, max_window_layers=32), 0),
    (dict(use_sliding_window=False, sliding_window=64, max_window_layers=0), 0),
    (dict(use_sliding_window=True, sliding_window=64, layer_types=['sliding_attention'] * 32),
     64),
    (dict(use_sliding_window=True, sliding_window=64, layer_types=['full_attention'] * 32), 0),
])
def test_qwen_windows_are_imported_as_transformers_derives_each_layer(change, window):
  """Every layer sliding or none, as Qwen2Config derives layer_types from
  use_sliding_window, sliding_window and max_window_layers (or takes them as given)."""
  published = {**open_models.PUBLISHED['llama3_8b'], **QWEN2, **change}
  theirs = transformers.Qwen2Config(**{k: v for k, v in published.items()
                                       if k not in ('architectures', 'model_type')})
  assert set(theirs.layer_types) == {'sliding_attention' if window else 'full_attention'}
  assert hf.model_config(published, default.get_config().model).sliding_window == window


def test_full_attention_exports_with_no_window_where_the_architecture_has_the_field():
  base = default.get_config().model
  base.update(qkv_bias=True)
  qwen2 = hf.hf_config(base)
  assert qwen2['model_type'] == 'qwen2' and qwen2['sliding_window'] is None
  assert not qwen2['use_sliding_window'] and set(qwen2['layer_types']) == {'full_attention'}
  base.update(qkv_bias=False)
  assert 'sliding_window' not in hf.hf_config(base)  # Llama has no window.


def test_a_window_with_biases_transformers_cannot_hold_is_refused_on_export():
  base = default.get_config().model
  base.update(sliding_window=16, qkv_bias=True, attention_out_bias=True)
  with pytest.raises(ConfigError, match='config.model.sliding_window=16'):
    hf.hf_config(base)


MESSAGES = [{'role': 'system', 'content': 'Be brief.'},
            {'role': 'user', 'content': 'Add 2 and 3.'},
            {'role': 'assistant', 'content': '5'},
            {'role': 'user', 'content': 'Thanks, café ✓'}]
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def reopened_export(tokenizer, directory):
  """transformers' AutoTokenizer on the tokenizer files an export writes for `tokenizer`."""
  hf.export_tokenizer(tokenizer).save_pretrained(str(directory))
  return transformers.AutoTokenizer.from_pretrained(directory)


def assert_renders_as_lm(ours, theirs):
  for opened in (False, True):
    rendered = chat.render(ours, MESSAGES, add_generation_prompt=opened)
    assert theirs.apply_chat_template(MESSAGES, tokenize=False,
                                      add_generation_prompt=opened) == rendered.text
    assert theirs.apply_chat_template(MESSAGES, add_generation_prompt=opened)['input_ids'] == (
        rendered.ids.tolist())


def test_a_byte_tokenizer_exports_lm_s_default_template_and_its_ids(tmp_path):
  ours = tokenizer_lib.ByteTokenizer()
  assert_renders_as_lm(ours, reopened_export(ours, tmp_path))
  assert hf.generation_config(hf.export_tokenizer(ours)) == dict(
      bos_token_id=1, eos_token_id=2, pad_token_id=0)


def with_chatml_tokens() -> str:
  """The byte tokenizer.json with ChatML's two special tokens added."""
  import tokenizers  # pylint: disable=import-outside-toplevel
  tokenizer = tokenizers.Tokenizer.from_str(hf_tokenizer.byte_tokenizer_json())
  tokenizer.add_special_tokens([tokenizers.AddedToken(token, special=True, normalized=False)
                                for token in ('<|im_start|>', '<|im_end|>')])
  return tokenizer.to_str()


def test_a_checkpoint_s_template_is_exported_with_its_end_of_turn_as_a_stop_id(tmp_path):
  """A Qwen-like tokenizer: ChatML, no bos token, turns ended by <|im_end|>, not eos."""
  ours = hf_tokenizer.HuggingFaceTokenizer(with_chatml_tokens(),
                                           dict(eos_token='</s>', pad_token='<pad>'),
                                           chat_template=CHATML)
  assert ours.bos_id is None
  assert_renders_as_lm(ours, reopened_export(ours, tmp_path))
  end_of_turn = ours.token_to_id('<|im_end|>')
  assert hf.generation_config(ours) == dict(eos_token_id=[2, end_of_turn], pad_token_id=0)
  written = hf.hf_config(default.get_config().model, hf.special_ids(ours))
  assert 'bos_token_id' not in written and written['eos_token_id'] == 2


def test_a_checkpoint_tokenizer_without_a_template_exports_the_one_lm_renders_with(tmp_path):
  ours = hf_tokenizer.HuggingFaceTokenizer(hf_tokenizer.byte_tokenizer_json(),
                                           dict(bos_token='<s>', eos_token='</s>',
                                                pad_token='<pad>'))
  assert hf.export_tokenizer(ours).chat_template == chat.DEFAULT_TEMPLATE
  assert ours.chat_template is None  # The run's tokenizer is left as it was.
  assert_renders_as_lm(ours, reopened_export(ours, tmp_path))


def test_a_tokenizer_with_no_tokenizer_json_form_is_refused_on_export():
  sentencepiece = types.SimpleNamespace(kind='sentencepiece', chat_template=None)
  with pytest.raises(ConfigError, match='sentencepiece tokenizer has no tokenizer.json'):
    hf.export_tokenizer(sentencepiece)
