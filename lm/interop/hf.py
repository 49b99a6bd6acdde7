"""Hugging Face checkpoints in and out: Llama, Mistral, Qwen2, Qwen3 and Mamba.

A checkpoint directory holds `config.json`, weights in `*.safetensors` (one file, or
several named by `model.safetensors.index.json`) and tokenizer files. `model_config`
reads config.json into `config.model`, refusing any field that would change the math and
that `lm` does not compute (never ignoring one); `tensor_map` pairs every `lm` parameter
with its Hugging Face tensor and the layout change between them; `load_params` reads the
tensors one at a time and places each straight onto its sharding; `save` writes the
inverse. Every config.json field `model_config` reads is checked before use (a missing or
mistyped one is named with its value), and an absent one takes the default of
transformers' config class. Sliding windows: Mistral's `sliding_window`, and Qwen2's or
Qwen3's when every layer slides, become `config.model.sliding_window` (W > 0: a token
attends to itself and the W - 1 before it); export writes a windowed model as Mistral, or
as Qwen2 or Qwen3 when it has their biases or query/key norms. Layouts (PyTorch's Linear
stores [out, in]):

  q_proj.weight [N*H, D] <-> query/kernel [D, N, H]     o_proj.weight [D, N*H] <-> out/kernel [N, H, D]
  gate/up_proj.weight [F, D] <-> wi_gate/wi_up [D, F]   conv1d.weight [E, 1, W] <-> conv_kernel [W, E]

A checkpoint's tokenizer files are read by lm/interop/hf_tokenizer.py. For an export,
`export_tokenizer` gives the tokenizer files (with the chat template lm renders
conversations with) and `generation_config` generation_config.json's ids.

Both use RoPE's rotate-half layout, so no query/key permutation is needed (the
permutation Meta's original checkpoints need happens in transformers' own converter).
"""

import copy
import dataclasses
import json
import math
import os
from typing import Callable

import jax
import ml_collections
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from lm import chat
from lm.errors import ConfigError
from lm.interop import hf_tokenizer
from lm.models import layers

LLAMA_LIKE = {  # architecture -> model_type
    'LlamaForCausalLM': 'llama',
    'MistralForCausalLM': 'mistral',
    'Qwen2ForCausalLM': 'qwen2',
    'Qwen3ForCausalLM': 'qwen3',
}
ARCHITECTURES = (*LLAMA_LIKE, 'MambaForCausalLM')
# transformers' defaults (its config classes) for the fields a config.json may omit; None
# where transformers derives the value (num_key_value_heads: num_attention_heads,
# head_dim: hidden_size // num_attention_heads).
_DEFAULTS = {
    'llama': dict(max_position_embeddings=2048, num_key_value_heads=None, head_dim=None,
                  tie_word_embeddings=False, norm_eps=1e-6),
    'mistral': dict(max_position_embeddings=4096 * 32, num_key_value_heads=8, head_dim=None,
                    tie_word_embeddings=False, norm_eps=1e-6),
    'qwen2': dict(max_position_embeddings=32768, num_key_value_heads=32, head_dim=None,
                  tie_word_embeddings=False, norm_eps=1e-6),
    'qwen3': dict(max_position_embeddings=32768, num_key_value_heads=32, head_dim=128,
                  tie_word_embeddings=False, norm_eps=1e-6),
    'mamba': dict(tie_word_embeddings=True, norm_eps=1e-5),
}
# Mistral's, Qwen2's and Qwen3's default `sliding_window`, and Qwen's `max_window_layers`.
_DEFAULT_WINDOW, _DEFAULT_MAX_WINDOW_LAYERS = 4096, 28
_ATTENTION_KINDS = ('full_attention', 'sliding_attention')
_DTYPES = {'float32': 'float32', 'bfloat16': 'bfloat16', 'float16': 'float32'}
# Buffers some checkpoints carry that are recomputed, not learned.
_IGNORED_SUFFIXES = ('rotary_emb.inv_freq',)


def read_json(path: str, what: str) -> dict:
  try:
    with open(path, encoding='utf-8') as f:
      value = json.load(f)
  except FileNotFoundError:
    raise ConfigError(f'{what}: no {os.path.basename(path)} in {os.path.dirname(path)}') from None
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
    raise ConfigError(f'{path}: not readable JSON ({error})') from None
  if not isinstance(value, dict):
    raise ConfigError(f'{path}: expected a JSON object')
  return value


def _refuse(path: str, field: str, value, why: str):
  raise ConfigError(f'{path}: {field}={value!r} is not supported: {why}')


def _is_integer(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


# What a config.json field may hold: (test, the words for it). JSON's true is a Python
# int and 2.0 a float, so each test names the types it takes.
_SIZE = (lambda v: _is_integer(v) and v > 0, 'a positive integer')
_COUNT = (lambda v: _is_integer(v) and v >= 0, 'a non-negative integer')
_NUMBER = (lambda v: (_is_integer(v) or isinstance(v, float)) and math.isfinite(v) and v > 0,
          'a positive number')
_BOOL = (lambda v: isinstance(v, bool), 'true or false')
_STRING = (lambda v: isinstance(v, str), 'a string')
_OBJECT = (lambda v: isinstance(v, dict), 'an object')
_LAYER_TYPES = (lambda v: isinstance(v, list) and all(kind in _ATTENTION_KINDS for kind in v),
               'a list of "full_attention" and "sliding_attention"')
_REQUIRED = object()


def _field(source: dict, path: str, name: str, kind, default=_REQUIRED, *,
           nullable: bool = False, prefix: str = ''):
  """source[name] checked against `kind` (_SIZE, _NUMBER, ...); `default` when absent;
  None when null and `nullable` (where transformers reads null as "none"). Errors name
  the file, the field (`prefix` + name), the value and what it must be."""
  if name not in source:
    if default is _REQUIRED:
      raise ConfigError(f'{path}: "{prefix}{name}" is missing')
    return default
  value = source[name]
  test, expected = kind
  if value is None and nullable:
    return None
  if not test(value):
    shown = json.dumps(value, default=str)
    shown = shown if len(shown) <= 40 else shown[:37] + '...'
    raise ConfigError(f'{path}: "{prefix}{name}": {shown} must be {expected}')
  return value


def _rope(hf: dict, path: str, max_len: int) -> tuple[float, dict]:
  """(theta, config.model.rope_scaling) as transformers reads them: `rope_scaling` (the
  published files) if set, else `rope_parameters` (transformers 5), with `rope_theta`
  inside it or at the top level."""
  scaling = _field(hf, path, 'rope_scaling', _OBJECT, None, nullable=True)
  name = 'rope_scaling' if scaling else 'rope_parameters'
  parameters = scaling or _field(hf, path, 'rope_parameters', _OBJECT, None, nullable=True) or {}
  prefix = name + '.'
  if any(isinstance(value, dict) for value in parameters.values()):
    _refuse(path, name, sorted(parameters), 'lm has one RoPE for every layer')
  theta = _field(parameters, path, 'rope_theta', _NUMBER,
                 _field(hf, path, 'rope_theta', _NUMBER, 10_000.0), prefix=prefix)
  kind = _field(parameters, path, 'rope_type', _STRING,
                _field(parameters, path, 'type', _STRING, 'default', prefix=prefix), prefix=prefix)
  if kind == 'default':
    return float(theta), dict(layers.NO_ROPE_SCALING)
  if kind != 'llama3':
    _refuse(path, prefix + 'rope_type', kind, 'lm computes RoPE unscaled or with the llama3 rule')
  # transformers takes the pre-training length from the top level when set there, else
  # from rope_scaling, else max_position_embeddings.
  original = _field(hf, path, 'original_max_position_embeddings', _SIZE, None)
  if original is None:
    original = _field(parameters, path, 'original_max_position_embeddings', _SIZE, max_len,
                      prefix=prefix)
  factors = {key: float(_field(parameters, path, key, _NUMBER, prefix=prefix))
             for key in ('factor', 'low_freq_factor', 'high_freq_factor')}
  return float(theta), dict(kind='llama3', **factors, original_max_len=original)


def _sliding_window(hf: dict, path: str, model_type: str, num_layers: int) -> int:
  """config.model.sliding_window (0: full attention) of a Llama-like config.json, as
  transformers derives each layer's attention. Mistral slides every layer by
  `sliding_window` (null: none) and ignores `layer_types`; Qwen2 and Qwen3 slide the layers
  `layer_types` names, which default to those from `max_window_layers` on when
  `use_sliding_window`. lm has one window for every layer, so a mix is refused."""
  window = None
  if model_type == 'mistral' or (
      model_type in ('qwen2', 'qwen3') and _field(hf, path, 'use_sliding_window', _BOOL, False)):
    window = _field(hf, path, 'sliding_window', _SIZE, _DEFAULT_WINDOW, nullable=True)
  layer_types = _field(hf, path, 'layer_types', _LAYER_TYPES, None, nullable=True)
  if layer_types is not None and len(layer_types) != num_layers:
    raise ConfigError(f'{path}: "layer_types" lists {len(layer_types)} layers,'
                      f' "num_hidden_layers" is {num_layers}')
  if model_type not in ('qwen2', 'qwen3'):
    # transformers' Llama and Mistral ignore layer_types: one that disagrees with what they
    # compute was written for another architecture (Ministral), so it is refused.
    kind = 'sliding_attention' if window else 'full_attention'
    if layer_types is not None and set(layer_types) != {kind}:
      _refuse(path, 'layer_types', sorted(set(layer_types)),
              f'{model_type} computes {kind} in every layer')
    return window or 0
  field, value = 'layer_types', sorted(set(layer_types or []))
  if layer_types is None:
    field = 'max_window_layers'
    value = _field(hf, path, field, _COUNT, _DEFAULT_MAX_WINDOW_LAYERS)
    layer_types = ['sliding_attention' if window is not None and layer >= value
                   else 'full_attention' for layer in range(num_layers)]
  sliding = [kind == 'sliding_attention' for kind in layer_types]
  if any(sliding) and not all(sliding):
    _refuse(path, field, value, f'{sum(sliding)} of the {num_layers} layers slide; lm has one'
            ' attention window for all layers')
  if any(sliding) and window is None:
    raise ConfigError(f'{path}: "layer_types" has sliding layers but no window: set'
                      ' "use_sliding_window" and "sliding_window"')
  return window if all(sliding) else 0


def model_config(hf: dict, base, path: str = 'config.json') -> ml_collections.ConfigDict:
  """config.model for a transformers config.json (a dict): `base` (a config.model whose
  other fields, such as dtype and attention, are kept) with the checkpoint's shape and
  math; unsupported settings refused. Every field read is checked first (a missing or
  mistyped one is named with its value), and absent ones take transformers' defaults."""
  architectures = hf.get('architectures') or []
  architecture = architectures[0] if isinstance(architectures, list) and architectures else None
  if isinstance(architectures, list) and len(architectures) > 1:
    _refuse(path, 'architectures', architectures, 'lm imports one model; name one')
  if architecture not in ARCHITECTURES:
    raise ConfigError(f'{path}: architectures={architectures!r}: lm imports'
                      f' {", ".join(ARCHITECTURES)}')
  # transformers picks its classes by model_type, lm by the architecture: they must agree.
  wanted_type = LLAMA_LIKE.get(architecture, 'mamba')
  model_type = _field(hf, path, 'model_type', _STRING, wanted_type)
  if model_type != wanted_type:
    _refuse(path, 'model_type', model_type, f'{architecture} is model_type {wanted_type!r}')
  defaults = _DEFAULTS[model_type]
  hidden_act = _field(hf, path, 'hidden_act', _STRING, 'silu')
  if hidden_act != 'silu':
    _refuse(path, 'hidden_act', hidden_act, 'lm computes SiLU')
  dtype_field = 'dtype' if hf.get('dtype') is not None else 'torch_dtype'
  dtype = _field(hf, path, dtype_field, _STRING, None, nullable=True) or 'float32'
  if dtype not in _DTYPES:
    _refuse(path, dtype_field, dtype, f'lm stores weights as {sorted(set(_DTYPES.values()))}')
  embed_dim = _field(hf, path, 'hidden_size', _SIZE)
  norm_eps = _field(hf, path, 'layer_norm_epsilon' if model_type == 'mamba' else 'rms_norm_eps',
                    _NUMBER, defaults['norm_eps'])
  config = ml_collections.ConfigDict(base.to_dict())
  vocab_size = _field(hf, path, 'vocab_size', _SIZE)
  if vocab_size >= 2**31:
    _refuse(path, 'vocab_size', vocab_size, 'token ids are int32')
  config.update(
      vocab_size=vocab_size,
      num_layers=_field(hf, path, 'num_hidden_layers', _SIZE), embed_dim=embed_dim,
      norm_eps=float(norm_eps),
      tie_embeddings=_field(hf, path, 'tie_word_embeddings', _BOOL,
                            defaults['tie_word_embeddings']),
      scale_embeddings=False, param_dtype=_DTYPES[dtype])
  if model_type == 'mamba':
    for field, wanted in (('use_bias', False), ('use_conv_bias', True)):
      if _field(hf, path, field, _BOOL, wanted) != wanted:
        _refuse(path, field, hf[field], f'lm\'s Mamba blocks have {field}={wanted}')
    expand = _field(hf, path, 'expand', _SIZE, 2)
    rank = _field(hf, path, 'time_step_rank',
                  (lambda v: v == 'auto' or _SIZE[0](v), '"auto" or a positive integer'), 'auto')
    config.update(
        layer_pattern='mamba', mamba_expand=expand,
        mamba_state_dim=_field(hf, path, 'state_size', _SIZE, 16),
        mamba_conv_width=_field(hf, path, 'conv_kernel', _SIZE, 4),
        mamba_dt_rank=math.ceil(embed_dim / 16) if rank == 'auto' else rank,
        # Mamba has no position limit; lm's config still wants one.
        max_seq_len=_field(hf, path, 'max_position_embeddings', _SIZE, None, nullable=True)
        or 2048)
    inner = _field(hf, path, 'intermediate_size', _SIZE, expand * embed_dim)
    if inner != expand * embed_dim:
      _refuse(path, 'intermediate_size', inner, 'must be expand * hidden_size')
    return config

  if _field(hf, path, 'mlp_bias', _BOOL, False):
    _refuse(path, 'mlp_bias', True, 'lm\'s MLP has no biases')
  num_layers = config.num_layers
  num_heads = _field(hf, path, 'num_attention_heads', _SIZE)
  num_kv_heads = _field(hf, path, 'num_key_value_heads', _SIZE, defaults['num_key_value_heads'],
                        nullable=True) or num_heads
  if num_heads % num_kv_heads:
    default = '' if 'num_key_value_heads' in hf else f' (the {model_type} default)'
    raise ConfigError(f'{path}: "num_key_value_heads": {num_kv_heads}{default} must divide'
                      f' "num_attention_heads": {num_heads}')
  head_dim = _field(hf, path, 'head_dim', _SIZE, defaults['head_dim'], nullable=True)
  if head_dim is None:
    if embed_dim % num_heads:
      raise ConfigError(f'{path}: "hidden_size": {embed_dim} is not a multiple of'
                        f' "num_attention_heads": {num_heads}, and no "head_dim" is given')
    head_dim = embed_dim // num_heads
  max_len = _field(hf, path, 'max_position_embeddings', _SIZE,
                   defaults['max_position_embeddings'])
  theta, rope_scaling = _rope(hf, path, max_len)
  # Mistral and Qwen2 fix their biases; Llama and Qwen3 bias all four projections or none.
  bias = model_type in ('llama', 'qwen3') and _field(hf, path, 'attention_bias', _BOOL, False)
  config.update(
      layer_pattern='attention', num_heads=num_heads, num_kv_heads=num_kv_heads,
      head_dim=head_dim, mlp_dim=_field(hf, path, 'intermediate_size', _SIZE),
      max_seq_len=max_len, rope_theta=theta,
      rope_scaling=ml_collections.ConfigDict(rope_scaling),
      sliding_window=_sliding_window(hf, path, model_type, num_layers),
      qkv_bias=model_type == 'qwen2' or bias, attention_out_bias=bias,
      qk_norm=model_type == 'qwen3')
  return config


def hf_config(model, special_ids: dict | None = None) -> dict:
  """config.json for `config.model`: for attention models Llama, Qwen2 or Qwen3 by their
  biases and norms, or Mistral, Qwen2 or Qwen3 with a sliding window (Llama has none);
  Mamba for Mamba ones. A model that scales its embeddings (lm's own default) is written
  untied, the scale folded into the input table (see tensor_map)."""
  kinds = set(_layer_kinds(model))
  common = dict(vocab_size=model.vocab_size, hidden_size=model.embed_dim,
                num_hidden_layers=model.num_layers,
                tie_word_embeddings=bool(model.tie_embeddings and not model.scale_embeddings),
                dtype=model.param_dtype, **(special_ids or {}))
  if kinds == {'mamba'}:
    return dict(architectures=['MambaForCausalLM'], model_type='mamba', **common,
                state_size=model.mamba_state_dim, expand=model.mamba_expand,
                intermediate_size=model.mamba_expand * model.embed_dim,
                conv_kernel=model.mamba_conv_width, time_step_rank=model.mamba_dt_rank,
                layer_norm_epsilon=model.norm_eps, use_bias=False, use_conv_bias=True,
                hidden_act='silu', residual_in_fp32=True)
  if kinds != {'attention'}:
    raise ConfigError(f'config.model.layer_pattern={model.layer_pattern!r}: transformers has no'
                      ' architecture for a hybrid of attention and Mamba layers')
  window = model.sliding_window
  if model.qk_norm:
    if model.qkv_bias != model.attention_out_bias:
      raise ConfigError('config.model.qk_norm with qkv_bias != attention_out_bias has no'
                        ' transformers architecture (Qwen3 has both biases or neither)')
    architecture, model_type = 'Qwen3ForCausalLM', 'qwen3'
  elif model.qkv_bias and not model.attention_out_bias:
    architecture, model_type = 'Qwen2ForCausalLM', 'qwen2'
  elif model.attention_out_bias and not model.qkv_bias:
    raise ConfigError('config.model.attention_out_bias without qkv_bias has no transformers'
                      ' architecture')
  elif not window:
    architecture, model_type = 'LlamaForCausalLM', 'llama'
  elif not model.qkv_bias:
    architecture, model_type = 'MistralForCausalLM', 'mistral'
  else:
    raise ConfigError(f'config.model.sliding_window={window} with qkv_bias and'
                      ' attention_out_bias has no transformers architecture (Mistral has no'
                      ' biases, Qwen2 biases only q/k/v)')
  rope = {'rope_type': 'default', 'rope_theta': model.rope_theta}
  if model.rope_scaling.kind == 'llama3':
    rope.update(rope_type='llama3', factor=model.rope_scaling.factor,
                low_freq_factor=model.rope_scaling.low_freq_factor,
                high_freq_factor=model.rope_scaling.high_freq_factor,
                original_max_position_embeddings=model.rope_scaling.original_max_len)
  config = dict(architectures=[architecture], model_type=model_type, **common,
                intermediate_size=model.mlp_dim, num_attention_heads=model.num_heads,
                num_key_value_heads=model.num_kv_heads, head_dim=model.head_dim,
                max_position_embeddings=model.max_seq_len, rms_norm_eps=model.norm_eps,
                hidden_act='silu', rope_theta=model.rope_theta, rope_parameters=rope,
                rope_scaling=None if rope['rope_type'] == 'default' else rope)
  if model_type in ('llama', 'qwen3'):  # Mistral and Qwen2 fix their biases.
    config['attention_bias'] = bool(model.qkv_bias)
  if model_type == 'mistral':
    config['sliding_window'] = window
  if model_type in ('qwen2', 'qwen3'):
    # Every layer slides (max_window_layers 0) or none does; layer_types, which
    # transformers 5 derives from these, written out as it saves them.
    config.update(use_sliding_window=bool(window), sliding_window=window or None,
                  max_window_layers=0 if window else model.num_layers,
                  layer_types=['sliding_attention' if window else 'full_attention']
                  * model.num_layers)
  return config


def _layer_kinds(model) -> list[str]:
  from lm.models import decoder
  return decoder.layer_kinds(model)


# Layout changes, lm <- Hugging Face and back; `shape` is the lm parameter's.
@dataclasses.dataclass(frozen=True)
class Layout:
  to_lm: Callable[[np.ndarray, tuple], np.ndarray]
  to_hf: Callable[[np.ndarray], np.ndarray]


SAME = Layout(lambda x, shape: x, lambda x: x)
TRANSPOSED = Layout(lambda x, shape: x.T, lambda x: x.T)
# [N*H, D] <-> [D, N, H]: each head's rows become a [D, H] slab.
HEADS_OUT = Layout(lambda x, shape: x.T.reshape(shape), lambda x: x.reshape(x.shape[0], -1).T)
# [D, N*H] <-> [N, H, D].
HEADS_IN = Layout(lambda x, shape: x.T.reshape(shape), lambda x: x.reshape(-1, x.shape[-1]).T)
HEAD_BIAS = Layout(lambda x, shape: x.reshape(shape), lambda x: x.reshape(-1))
CONV = Layout(lambda x, shape: x[:, 0, :].T, lambda x: x.T[:, None, :])


def tensor_map(model) -> dict[tuple[str, ...], tuple[str, Layout]]:
  """lm parameter path -> (Hugging Face tensor name, layout) for `config.model`."""
  kinds = set(_layer_kinds(model))
  mamba = kinds == {'mamba'}
  prefix = 'backbone.' if mamba else 'model.'
  names = {('embed', 'embedding'): (prefix + ('embeddings.weight' if mamba else
                                              'embed_tokens.weight'), SAME),
           ('final_norm', 'scale'): (prefix + ('norm_f.weight' if mamba else 'norm.weight'),
                                     SAME)}
  if not model.tie_embeddings:
    names['lm_head', 'kernel'] = ('lm_head.weight', TRANSPOSED)
  for layer, kind in enumerate(_layer_kinds(model)):
    ours, theirs = f'layer_{layer}', f'{prefix}layers.{layer}.'
    if kind == 'mamba':
      mixer = theirs + 'mixer.'
      names.update({
          (ours, 'mixer_norm', 'scale'): (theirs + 'norm.weight', SAME),
          (ours, 'mixer', 'in_proj', 'kernel'): (mixer + 'in_proj.weight', TRANSPOSED),
          (ours, 'mixer', 'conv_kernel'): (mixer + 'conv1d.weight', CONV),
          (ours, 'mixer', 'conv_bias'): (mixer + 'conv1d.bias', SAME),
          (ours, 'mixer', 'x_proj', 'kernel'): (mixer + 'x_proj.weight', TRANSPOSED),
          (ours, 'mixer', 'dt_proj', 'kernel'): (mixer + 'dt_proj.weight', TRANSPOSED),
          (ours, 'mixer', 'dt_proj', 'bias'): (mixer + 'dt_proj.bias', SAME),
          (ours, 'mixer', 'a_log'): (mixer + 'A_log', SAME),
          (ours, 'mixer', 'd'): (mixer + 'D', SAME),
          (ours, 'mixer', 'out_proj', 'kernel'): (mixer + 'out_proj.weight', TRANSPOSED),
      })
      continue
    if kind != 'attention':
      raise ConfigError(f'config.model.layer_pattern: no Hugging Face layout for {kind!r}')
    attention = theirs + 'self_attn.'
    names.update({
        (ours, 'attention_norm', 'scale'): (theirs + 'input_layernorm.weight', SAME),
        (ours, 'mlp_norm', 'scale'): (theirs + 'post_attention_layernorm.weight', SAME),
        (ours, 'attention', 'out', 'kernel'): (attention + 'o_proj.weight', HEADS_IN),
        (ours, 'mlp', 'wi_gate', 'kernel'): (theirs + 'mlp.gate_proj.weight', TRANSPOSED),
        (ours, 'mlp', 'wi_up', 'kernel'): (theirs + 'mlp.up_proj.weight', TRANSPOSED),
        (ours, 'mlp', 'wo', 'kernel'): (theirs + 'mlp.down_proj.weight', TRANSPOSED),
    })
    for name, short in (('query', 'q'), ('key', 'k'), ('value', 'v')):
      names[ours, 'attention', name, 'kernel'] = (f'{attention}{short}_proj.weight', HEADS_OUT)
      if model.qkv_bias:
        names[ours, 'attention', name, 'bias'] = (f'{attention}{short}_proj.bias', HEAD_BIAS)
    if model.attention_out_bias:
      names[ours, 'attention', 'out', 'bias'] = (attention + 'o_proj.bias', SAME)
    if model.qk_norm:
      names[ours, 'attention', 'query_norm', 'scale'] = (attention + 'q_norm.weight', SAME)
      names[ours, 'attention', 'key_norm', 'scale'] = (attention + 'k_norm.weight', SAME)
  return names


class SafetensorsReader:
  """The tensors of a checkpoint directory by name, across shards; one read at a time."""

  def __init__(self, directory: str):
    self._handles = {}
    index = os.path.join(directory, 'model.safetensors.index.json')
    if os.path.isfile(index):
      weight_map = read_json(index, directory).get('weight_map')
      if not isinstance(weight_map, dict):
        raise ConfigError(f'{index}: no "weight_map" object')
      self.files = {name: os.path.join(directory, str(file)) for name, file in weight_map.items()}
    else:
      single = os.path.join(directory, 'model.safetensors')
      if not os.path.isfile(single):
        raise ConfigError(f'{directory}: no model.safetensors or model.safetensors.index.json')
      self.files = {name: single for name in self._open(single).keys()}

  def _open(self, path: str):
    if path not in self._handles:
      try:
        self._handles[path] = safe_open(path, framework='numpy')
      except Exception as error:  # safetensors raises its own error types.
        raise ConfigError(f'{path}: not a readable safetensors file ({error})') from None
    return self._handles[path]

  def names(self) -> set[str]:
    return set(self.files)

  def read(self, name: str) -> np.ndarray:
    path = self.files[name]
    try:
      return self._open(path).get_tensor(name)
    except ConfigError:
      raise
    except Exception as error:
      raise ConfigError(f'{path}: tensor {name} cannot be read ({error})') from None


def load_params(directory: str, model, abstract_params) -> dict:
  """The params of `config.model` from the checkpoint in `directory`, each tensor read,
  laid out, cast to the dtype of `abstract_params` (ShapeDtypeStructs with shardings)
  and placed on its devices before the next is read: host memory holds one tensor, and
  each device only its shards."""
  reader = SafetensorsReader(directory)
  names = tensor_map(model)
  flat = {tuple(k.key for k in path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(abstract_params)[0]}
  if set(flat) != set(names):  # A bug here, not bad input: the map must cover the model.
    raise AssertionError(f'tensor map mismatch: {sorted(set(flat) ^ set(names))[:3]}')
  wanted = {name for name, _ in names.values()}
  present = {name for name in reader.names() if not name.endswith(_IGNORED_SUFFIXES)}
  if model.tie_embeddings:
    present.discard('lm_head.weight')  # Tied checkpoints may store the shared table twice.
  missing, unexpected = sorted(wanted - present), sorted(present - wanted)
  if missing or unexpected:
    raise ConfigError(f'{directory}: the weights do not match config.json ('
                      + '; '.join(filter(None, [
                          missing and f'{len(missing)} missing, first {missing[0]}',
                          unexpected and f'{len(unexpected)} unexpected, first {unexpected[0]}']))
                      + ')')
  placed = {}
  for path, (name, layout) in names.items():
    target = flat[path]
    array = layout.to_lm(reader.read(name), target.shape)
    if array.shape != target.shape:
      raise ConfigError(f'{reader.files[name]}: {name} has shape {array.shape} after layout,'
                        f' config.json gives {target.shape}')
    array = np.ascontiguousarray(array.astype(target.dtype))
    placed[path] = jax.make_array_from_callback(target.shape, target.sharding,
                                                lambda index, array=array: array[index])
  return _unflatten(placed)


def _unflatten(flat: dict) -> dict:
  tree = {}
  for path, value in flat.items():
    node = tree
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  return tree


def hf_tensors(model, params, to_host) -> dict[str, np.ndarray]:
  """Hugging Face name -> numpy tensor in `config.model.param_dtype`, one at a time
  (a generator of pairs; `to_host` gathers a global array, a collective on every process)."""
  names = tensor_map(model)
  dtype = np.dtype(jax.numpy.dtype(model.param_dtype))
  for path, (name, layout) in names.items():
    node = params
    for key in path:
      node = node[key]
    array = np.asarray(to_host(node))
    if path == ('embed', 'embedding') and model.scale_embeddings:
      # transformers' models do not scale their inputs: fold sqrt(D) into the input table
      # (hf_config unties it, so the output head keeps the unscaled one).
      array = array * np.asarray(model.embed_dim ** 0.5, array.dtype)
    yield name, np.ascontiguousarray(layout.to_hf(array).astype(dtype))
  if model.tie_embeddings and model.scale_embeddings:
    node = np.asarray(to_host(params['embed']['embedding']))
    yield 'lm_head.weight', np.ascontiguousarray(node.astype(dtype))


def save_tensors(directory: str, tensors, *, shard_bytes: int = 2 ** 31,
                 write: bool = True) -> None:
  """Writes (name, array) pairs as safetensors files of at most `shard_bytes` each, with
  model.safetensors.index.json when there are several; only one file's tensors are held
  at a time. With `write` False (processes other than 0) the tensors are only drawn."""
  shards, current, size = [], {}, 0

  def flush():
    nonlocal current, size
    if current:
      shards.append(list(current))
      if write:
        save_file(current, os.path.join(directory, f'part-{len(shards)}.safetensors'),
                  metadata={'format': 'pt'})
      current, size = {}, 0

  for name, array in tensors:
    if current and size + array.nbytes > shard_bytes:
      flush()
    current[name] = array
    size += array.nbytes
  flush()
  if not write:
    return
  if len(shards) == 1:
    os.replace(os.path.join(directory, 'part-1.safetensors'),
               os.path.join(directory, 'model.safetensors'))
    return
  weight_map = {}
  for number, names in enumerate(shards, 1):
    file = f'model-{number:05d}-of-{len(shards):05d}.safetensors'
    os.replace(os.path.join(directory, f'part-{number}.safetensors'),
               os.path.join(directory, file))
    weight_map.update({name: file for name in names})
  with open(os.path.join(directory, 'model.safetensors.index.json'), 'w') as f:
    json.dump({'metadata': {}, 'weight_map': weight_map}, f, indent=2)


def save_model(directory: str, model, params, special_ids: dict | None = None) -> None:
  """config.json and the safetensors of `params` (global arrays; every process calls
  this, process 0 writes) into `directory`, for transformers' from_pretrained.
  `special_ids`: bos_token_id, eos_token_id and pad_token_id for config.json."""
  from lm import sharding  # Only export gathers arrays.
  config = hf_config(model, special_ids)  # Refuses what has no architecture, first.
  write = jax.process_index() == 0
  if write:
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, 'config.json'), 'w') as f:
      json.dump(config, f, indent=2)
  save_tensors(directory, hf_tensors(model, params, sharding.to_host), write=write)


def export_tokenizer(tokenizer) -> hf_tokenizer.HuggingFaceTokenizer:
  """The run's tokenizer as a tokenizer.json one (itself, or the byte tokenizer's
  equivalent: the same ids for every text) with the chat template lm renders its
  conversations with: its own, else lm.chat.DEFAULT_TEMPLATE, so that transformers'
  apply_chat_template renders what the model was trained on."""
  if tokenizer.kind == 'huggingface' and tokenizer.chat_template is not None:
    return tokenizer
  if tokenizer.kind == 'huggingface':
    exported = copy.copy(tokenizer)  # The run's own keeps its settings; only files change.
    exported.chat_template = chat.DEFAULT_TEMPLATE
    return exported
  if tokenizer.kind == 'byte':
    return hf_tokenizer.HuggingFaceTokenizer(
        hf_tokenizer.byte_tokenizer_json(), dict(tokenizer.special_tokens),
        chat_template=chat.DEFAULT_TEMPLATE, source='byte tokenizer')
  raise ConfigError(f'--to_hf: the run\'s {tokenizer.kind} tokenizer has no tokenizer.json'
                    ' form here; export models with the byte or a Hugging Face tokenizer')


def special_ids(tokenizer) -> dict:
  """bos_token_id, eos_token_id and pad_token_id for config.json; no bos_token_id for a
  tokenizer without a bos token."""
  ids = dict(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id,
             pad_token_id=tokenizer.pad_id)
  return {name: value for name, value in ids.items() if value is not None}


def generation_config(tokenizer) -> dict:
  """generation_config.json: the special ids, with eos_token_id every id lm stops a reply
  at (the tokenizer's stop ids and its template's end of turn, chat.end_of_turn_ids), a
  list when there are several, so that transformers' generate stops where lm's chat does."""
  stops = [int(i) for i in chat.end_of_turn_ids(tokenizer)]
  return dict(special_ids(tokenizer), eos_token_id=stops[0] if len(stops) == 1 else stops)
