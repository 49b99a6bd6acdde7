"""Hugging Face checkpoints in and out: Llama, Mistral, Qwen2, Qwen3 and Mamba.

A checkpoint directory holds `config.json`, weights in `*.safetensors` (one file, or
several named by `model.safetensors.index.json`) and tokenizer files. `model_config`
reads config.json into `config.model`, refusing any field that would change the math and
that `lm` does not compute (never ignoring one); `tensor_map` pairs every `lm` parameter
with its Hugging Face tensor and the layout change between them; `load_params` reads the
tensors one at a time and places each straight onto its sharding; `save` writes the
inverse. Layouts (PyTorch's Linear stores [out, in]):

  q_proj.weight [N*H, D] <-> query/kernel [D, N, H]     o_proj.weight [D, N*H] <-> out/kernel [N, H, D]
  gate/up_proj.weight [F, D] <-> wi_gate/wi_up [D, F]   conv1d.weight [E, 1, W] <-> conv_kernel [W, E]

Both use RoPE's rotate-half layout, so no query/key permutation is needed (the
permutation Meta's original checkpoints need happens in transformers' own converter).
"""

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

from lm import config as config_lib
from lm.errors import ConfigError

LLAMA_LIKE = {  # architecture -> (model_type, biases on q/k/v, on o, query/key norm)
    'LlamaForCausalLM': 'llama',
    'MistralForCausalLM': 'mistral',
    'Qwen2ForCausalLM': 'qwen2',
    'Qwen3ForCausalLM': 'qwen3',
}
ARCHITECTURES = (*LLAMA_LIKE, 'MambaForCausalLM')
# Defaults of the transformers config classes for the fields a config.json may omit.
_TIED_BY_DEFAULT = {'llama': False, 'mistral': False, 'qwen2': False, 'qwen3': False,
                    'mamba': True}
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


def _rope(hf: dict, path: str) -> tuple[float, dict]:
  """(theta, config.model.rope_scaling) from `rope_parameters` (transformers 5) or
  `rope_theta` + `rope_scaling` (the published files)."""
  parameters = dict(hf.get('rope_parameters') or {})
  scaling = hf.get('rope_scaling') or {}
  theta = parameters.get('rope_theta', hf.get('rope_theta', 10_000.0))
  parameters = {**scaling, **{k: v for k, v in parameters.items() if k != 'rope_theta'}}
  kind = parameters.get('rope_type', parameters.get('type', 'default'))
  field = 'rope_parameters.rope_type' if 'rope_parameters' in hf else 'rope_scaling.rope_type'
  if kind == 'default':
    return float(theta), dict(config_lib.ADDED_MODEL_FIELDS['rope_scaling'])
  if kind != 'llama3':
    _refuse(path, field, kind, 'lm computes RoPE unscaled or with the llama3 rule')
  return float(theta), dict(
      kind='llama3', factor=float(parameters['factor']),
      low_freq_factor=float(parameters['low_freq_factor']),
      high_freq_factor=float(parameters['high_freq_factor']),
      original_max_len=int(parameters['original_max_position_embeddings']))


def model_config(hf: dict, base, path: str = 'config.json') -> ml_collections.ConfigDict:
  """config.model for a transformers config.json (a dict): `base` (a config.model whose
  other fields, such as dtype and attention, are kept) with the checkpoint's shape and
  math; unsupported settings refused."""
  architectures = hf.get('architectures') or []
  architecture = architectures[0] if architectures else None
  if architecture not in ARCHITECTURES:
    raise ConfigError(f'{path}: architectures={architectures!r}: lm imports'
                      f' {", ".join(ARCHITECTURES)}')
  model_type = hf.get('model_type', 'mamba' if architecture == 'MambaForCausalLM' else
                      LLAMA_LIKE[architecture])
  if hf.get('hidden_act', 'silu') != 'silu':
    _refuse(path, 'hidden_act', hf['hidden_act'], 'lm computes SiLU')
  dtype = hf.get('dtype', hf.get('torch_dtype')) or 'float32'
  if dtype not in _DTYPES:
    _refuse(path, 'dtype', dtype, f'lm stores weights as {sorted(set(_DTYPES.values()))}')
  config = ml_collections.ConfigDict(base.to_dict())
  config.update(
      vocab_size=hf['vocab_size'], num_layers=hf['num_hidden_layers'],
      embed_dim=hf['hidden_size'], norm_eps=float(hf.get('rms_norm_eps', hf.get(
          'layer_norm_epsilon', 1e-6))),
      tie_embeddings=bool(hf.get('tie_word_embeddings', _TIED_BY_DEFAULT[model_type])),
      scale_embeddings=False, param_dtype=_DTYPES[dtype])
  if architecture == 'MambaForCausalLM':
    for field, wanted in (('use_bias', False), ('use_conv_bias', True)):
      if hf.get(field, wanted) != wanted:
        _refuse(path, field, hf[field], f'lm\'s Mamba blocks have {field}={wanted}')
    rank = hf.get('time_step_rank', 'auto')
    config.update(
        layer_pattern='mamba', mamba_expand=int(hf.get('expand', 2)),
        mamba_state_dim=hf.get('state_size', 16), mamba_conv_width=hf.get('conv_kernel', 4),
        mamba_dt_rank=math.ceil(hf['hidden_size'] / 16) if rank == 'auto' else rank,
        max_seq_len=hf.get('max_position_embeddings') or 2048)
    if config.mamba_expand * config.embed_dim != hf.get('intermediate_size',
                                                        config.mamba_expand * config.embed_dim):
      _refuse(path, 'intermediate_size', hf['intermediate_size'], 'must be expand * hidden_size')
    return config

  if hf.get('mlp_bias', False):
    _refuse(path, 'mlp_bias', True, 'lm\'s MLP has no biases')
  max_len = hf.get('max_position_embeddings', 2048)
  window = hf.get('sliding_window')
  if model_type in ('qwen2', 'qwen3') and not hf.get('use_sliding_window', False):
    window = None
  if model_type in ('qwen2', 'qwen3') and window is not None:
    _refuse(path, 'use_sliding_window', True, 'lm attends to the whole sequence')
  if any(kind != 'full_attention' for kind in hf.get('layer_types') or []):
    _refuse(path, 'layer_types', sorted(set(hf['layer_types'])), 'lm attends to the whole'
            ' sequence in every layer')
  if window is not None:
    # Attention over the last `window` tokens equals full attention on rows no longer than it.
    max_len = min(max_len, window)
  theta, rope_scaling = _rope(hf, path)
  bias = bool(hf.get('attention_bias', False))
  num_heads = hf['num_attention_heads']
  config.update(
      layer_pattern='attention', num_heads=num_heads,
      num_kv_heads=hf.get('num_key_value_heads') or num_heads,
      head_dim=hf.get('head_dim') or hf['hidden_size'] // num_heads,
      mlp_dim=hf['intermediate_size'], max_seq_len=max_len, rope_theta=theta,
      rope_scaling=ml_collections.ConfigDict(rope_scaling),
      qkv_bias=True if model_type == 'qwen2' else bias,
      attention_out_bias=False if model_type == 'qwen2' else bias,
      qk_norm=model_type == 'qwen3')
  return config


def hf_config(model, special_ids: dict | None = None) -> dict:
  """config.json for `config.model`: Llama, Qwen2 or Qwen3 for attention models by their
  biases and norms, Mamba for Mamba ones. A model that scales its embeddings (lm's own
  default) is written untied, the scale folded into the input table (see tensor_map)."""
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
  if model.qk_norm:
    if model.qkv_bias != model.attention_out_bias:
      raise ConfigError('config.model.qk_norm with qkv_bias != attention_out_bias has no'
                        ' transformers architecture (Qwen3 has both biases or neither)')
    architecture, model_type = 'Qwen3ForCausalLM', 'qwen3'
  elif model.qkv_bias and not model.attention_out_bias:
    architecture, model_type = 'Qwen2ForCausalLM', 'qwen2'
  elif model.qkv_bias == model.attention_out_bias:
    architecture, model_type = 'LlamaForCausalLM', 'llama'
  else:
    raise ConfigError('config.model.attention_out_bias without qkv_bias has no transformers'
                      ' architecture')
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
  if model_type != 'qwen2':
    config['attention_bias'] = bool(model.qkv_bias)
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
