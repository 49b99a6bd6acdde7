"""Hugging Face import and export (lm/interop/hf.py) checked against transformers itself:
tiny random models of each architecture, saved by transformers, imported, compared.
(tests/unit/test_hf_import.py checks the settings the import refuses or derives.)"""

import functools
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file

from experiments.configs import default, open_models
from lm import models, sampling, sharding
from lm.errors import ConfigError
from lm.interop import hf
from lm.training import checkpointing

VOCAB = 300
COMMON = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, bos_token_id=1,
              eos_token_id=2)
ATTENTION = dict(intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                 head_dim=16, max_position_embeddings=128)
LLAMA3_ROPE = dict(rope_type='llama3', factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=16)
ARCHITECTURES = {  # name: (transformers config class, its fields)
    'llama3': (transformers.LlamaConfig, dict(**ATTENTION, rope_theta=5000.0,
                                               rope_scaling=LLAMA3_ROPE)),
    'llama_tied_with_biases': (transformers.LlamaConfig, dict(
        **ATTENTION, tie_word_embeddings=True, attention_bias=True)),
    'mistral': (transformers.MistralConfig, dict(**ATTENTION, sliding_window=None)),
    'qwen2': (transformers.Qwen2Config, dict(**ATTENTION, tie_word_embeddings=True)),
    'qwen3': (transformers.Qwen3Config, ATTENTION),
    'mamba': (transformers.MambaConfig, dict(state_size=8, expand=2, conv_kernel=4,
                                             time_step_rank=8)),
}
LENGTHS = (24, 7, 13, 1)  # Ragged prompts, right-padded into one batch.
WINDOW = 8  # The longest prompt is three windows long.
WINDOWED = {  # name: (transformers config class, its fields), every layer sliding by WINDOW.
    'mistral': (transformers.MistralConfig, dict(**ATTENTION, sliding_window=WINDOW)),
    'qwen2': (transformers.Qwen2Config, dict(**ATTENTION, use_sliding_window=True,
                                             sliding_window=WINDOW, max_window_layers=0)),
    'qwen3': (transformers.Qwen3Config, dict(**ATTENTION, use_sliding_window=True,
                                             sliding_window=WINDOW, max_window_layers=0)),
}


def relative_error(ours, theirs) -> float:
  return float(np.abs(ours - theirs).max() / np.abs(theirs).max())


@functools.cache
def import_model(directory, **model_fields):
  """(config.model, model, params on a mesh of all 8 devices, the mesh); each checkpoint
  imported once, for every test that reads it."""
  with open(directory / 'config.json') as f:
    base = default.get_config().model
    base.update(dtype='float32', mamba_scan='chunked', **model_fields)
    config = hf.model_config(json.load(f), base)
  model = models.build(config)
  mesh = sharding.inference_mesh(config.embed_dim)
  params = hf.load_params(str(directory), config, checkpointing.abstract_params(model, mesh))
  return config, model, params, mesh


def save_reference(config, seed: int, directory):
  """A random transformers model of `config` saved to `directory`; norms and biases
  perturbed so that none is at its initial value."""
  torch.manual_seed(seed)
  reference = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
  with torch.no_grad():
    for name, parameter in reference.named_parameters():
      if 'norm' in name or name.endswith(('bias', '.D', 'A_log')):
        parameter.add_(torch.randn_like(parameter) * 0.1)
  reference.generation_config.eos_token_id = None  # Generate every token asked for.
  reference.save_pretrained(directory)
  return reference


@pytest.fixture(scope='module', params=sorted(ARCHITECTURES))
def checkpoint(request, tmp_path_factory):
  """(name, directory, reference) of one architecture."""
  config_class, fields = ARCHITECTURES[request.param]
  directory = tmp_path_factory.mktemp(request.param)
  reference = save_reference(config_class(**COMMON, **fields),
                             sorted(ARCHITECTURES).index(request.param), directory)
  return request.param, directory, reference


@pytest.fixture(scope='module', params=sorted(WINDOWED))
def windowed_checkpoint(request, tmp_path_factory):
  """(name, directory, reference) of one architecture whose every layer slides."""
  config_class, fields = WINDOWED[request.param]
  directory = tmp_path_factory.mktemp(f'{request.param}_window')
  reference = save_reference(config_class(**COMMON, **fields),
                             10 + sorted(WINDOWED).index(request.param), directory)
  return request.param, directory, reference


def ragged_batch(seed: int):
  rng = np.random.default_rng(seed)
  tokens = np.zeros((len(LENGTHS), max(LENGTHS)), np.int32)
  for row, length in enumerate(LENGTHS):
    tokens[row, :length] = rng.integers(3, VOCAB, length)
  segment_ids = (np.arange(max(LENGTHS)) < np.array(LENGTHS)[:, None]).astype(np.int32)
  return tokens, segment_ids


def logits_of(model, params, mesh, tokens, segment_ids, positions=None):
  positions = np.broadcast_to(np.arange(tokens.shape[1]), tokens.shape) if positions is None \
      else positions
  apply = lambda: np.asarray(jax.jit(model.apply)({'params': params}, tokens, segment_ids,
                                                   positions))
  if mesh is None:
    return apply()
  with sharding.activate(mesh):
    return apply()


def reference_logits(reference, tokens, segment_ids):
  with torch.no_grad():
    return reference(torch.tensor(tokens, dtype=torch.long),
                     attention_mask=torch.tensor(segment_ids)).logits.numpy()


def imported_and_reference_logits(directory, reference, seed: int):
  """(lm's logits of the imported checkpoint, transformers' logits, tokens, segment ids)
  on a ragged batch."""
  _, model, params, mesh = import_model(directory)
  tokens, segment_ids = ragged_batch(seed)
  return (logits_of(model, params, mesh, tokens, segment_ids),
          reference_logits(reference, tokens, segment_ids), tokens, segment_ids)


def test_imported_logits_equal_transformers_on_ragged_prompts(checkpoint):
  name, directory, reference = checkpoint
  ours, theirs, _, _ = imported_and_reference_logits(directory, reference, 0)
  for row, length in enumerate(LENGTHS):
    assert relative_error(ours[row, :length], theirs[row, :length]) < 1e-4, (name, row)


def test_packed_rows_of_an_imported_model_equal_the_documents_alone(checkpoint):
  _, directory, _ = checkpoint
  _, model, params, mesh = import_model(directory)
  tokens, segment_ids = ragged_batch(1)
  alone = logits_of(model, params, mesh, tokens, segment_ids)
  packed = np.concatenate([tokens[row, :length] for row, length in enumerate(LENGTHS)])[None]
  packed_segments = np.concatenate([np.full(length, row + 1)
                                    for row, length in enumerate(LENGTHS)])[None]
  packed_positions = np.concatenate([np.arange(length) for length in LENGTHS])[None]
  together = logits_of(model, params, mesh, packed, packed_segments, packed_positions)[0]
  start = 0
  for row, length in enumerate(LENGTHS):
    np.testing.assert_allclose(together[start:start + length], alone[row, :length],
                               rtol=1e-5, atol=1e-5)
    start += length


def test_greedy_generation_equals_transformers_generate(checkpoint):
  name, directory, reference = checkpoint
  _, model, params, mesh = import_model(directory)
  tokens, segment_ids = ragged_batch(2)
  with sharding.activate(mesh):
    new, count = sampling.generate(
        params, sharding.put_rows(np.tile(tokens, (2, 1))),
        sharding.put_rows(np.tile(np.array(LENGTHS, np.int32), 2)), jax.random.key(0),
        jnp.array([-1], jnp.int32), model=model, max_new_tokens=32,
        cache_length=max(LENGTHS) + 32)
  new, count = sharding.to_host((new, count))
  for row, length in enumerate(LENGTHS):
    with torch.no_grad():
      theirs = reference.generate(torch.tensor(tokens[row:row + 1, :length], dtype=torch.long),
                                  max_new_tokens=32, do_sample=False, pad_token_id=0)
    assert count[row] == 32
    assert new[row].tolist() == theirs[0, length:].tolist(), (name, row)


def test_export_reloads_in_transformers_with_the_same_logits_and_bit_exact_tensors(
    checkpoint, tmp_path):
  name, directory, reference = checkpoint
  config, _, params, _ = import_model(directory)
  hf.save_model(str(tmp_path), config, params)
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
  # Mistral without a sliding window is Llama's computation; it comes back as Llama.
  expected = transformers.LlamaForCausalLM if name == 'mistral' else type(reference)
  assert type(reloaded) is expected
  tokens, segment_ids = ragged_batch(3)
  ours = reference_logits(reloaded.eval(), tokens, segment_ids)
  theirs = reference_logits(reference, tokens, segment_ids)
  for row, length in enumerate(LENGTHS):
    assert relative_error(ours[row, :length], theirs[row, :length]) < 1e-6, (name, row)
  original, exported = (load_file(path / 'model.safetensors') for path in (directory, tmp_path))
  assert sorted(exported) == sorted(original)
  for tensor in original:
    assert exported[tensor].dtype == original[tensor].dtype
    np.testing.assert_array_equal(exported[tensor], original[tensor], err_msg=tensor)


def test_bfloat16_checkpoints_load_as_stored_and_export_bit_exact(tmp_path):
  torch.manual_seed(7)
  config_class, fields = ARCHITECTURES['qwen3']
  reference = transformers.AutoModelForCausalLM.from_config(
      config_class(**COMMON, **fields), dtype=torch.bfloat16)
  reference.save_pretrained(tmp_path / 'in')
  config, _, params, _ = import_model(tmp_path / 'in')
  assert config.param_dtype == 'bfloat16'
  assert params['layer_0']['attention']['query']['kernel'].dtype == jnp.bfloat16
  hf.save_model(str(tmp_path / 'out'), config, params)
  original, exported = (load_file(tmp_path / part / 'model.safetensors') for part in ('in', 'out'))
  for tensor in original:
    np.testing.assert_array_equal(exported[tensor].view(np.uint16),
                                  original[tensor].view(np.uint16), err_msg=tensor)


def test_a_model_born_here_exports_to_transformers_with_its_logits(tmp_path):
  """lm's own default scales its embeddings by sqrt(D) and ties them: the export folds the
  scale into an untied input table, and transformers computes the same logits. A sliding
  window comes back as Mistral's."""
  for pattern, window, architecture in (('attention', 0, 'LlamaForCausalLM'),
                                        ('attention', WINDOW, 'MistralForCausalLM'),
                                        ('mamba', 0, 'MambaForCausalLM')):
    base = default.get_config().model
    base.update(vocab_size=VOCAB, num_layers=2, embed_dim=32, num_heads=4, num_kv_heads=2,
                head_dim=8, mlp_dim=48, max_seq_len=64, dtype='float32', layer_pattern=pattern,
                mamba_scan='chunked', mamba_state_dim=8, mamba_dt_rank=4, sliding_window=window)
    model = models.build(base)
    params = nn.meta.unbox(models.init_variables(model, jax.random.key(3))['params'])
    hf.save_model(str(tmp_path / architecture), base, params)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / architecture, dtype=torch.float32).eval()
    assert type(reloaded).__name__ == architecture
    tokens, segment_ids = ragged_batch(4)
    ours = logits_of(model, params, None, tokens, segment_ids)
    theirs = reference_logits(reloaded, tokens, segment_ids)
    for row, length in enumerate(LENGTHS):
      assert relative_error(ours[row, :length], theirs[row, :length]) < 1e-5, (architecture,
                                                                               row)


def test_a_windowed_model_imports_its_window_and_its_full_length(windowed_checkpoint):
  _, directory, reference = windowed_checkpoint
  config, _, _, _ = import_model(directory)
  assert config.sliding_window == WINDOW == reference.config.sliding_window
  assert config.max_seq_len == ATTENTION['max_position_embeddings']


def test_imported_window_logits_equal_transformers_past_the_window(windowed_checkpoint):
  """The longest row is three windows long: its last tokens see only the window."""
  name, directory, reference = windowed_checkpoint
  ours, theirs, tokens, segment_ids = imported_and_reference_logits(directory, reference, 5)
  for row, length in enumerate(LENGTHS):
    assert relative_error(ours[row, :length], theirs[row, :length]) < 1e-5, (name, row)
  # The window matters here: full attention computes other logits past it.
  no_window = dict(sliding_window=None) if name == 'mistral' else dict(
      use_sliding_window=False, layer_types=['full_attention'] * COMMON['num_hidden_layers'])
  full = reference_logits(transformers.AutoModelForCausalLM.from_pretrained(
      directory, dtype=torch.float32, **no_window).eval(), tokens, segment_ids)
  assert relative_error(full[0, WINDOW:LENGTHS[0]], theirs[0, WINDOW:LENGTHS[0]]) > 1e-3


def test_a_windowed_model_exports_with_its_window_and_transformers_computes_it(
    windowed_checkpoint, tmp_path):
  name, directory, reference = windowed_checkpoint
  config, _, params, _ = import_model(directory)
  hf.save_model(str(tmp_path), config, params)
  with open(tmp_path / 'config.json') as f:
    written = json.load(f)
  assert written['architectures'] == [type(reference).__name__]
  assert written['sliding_window'] == WINDOW
  if name != 'mistral':
    assert written['use_sliding_window'] and written['max_window_layers'] == 0
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
  assert type(reloaded) is type(reference) and reloaded.config.sliding_window == WINDOW
  if name != 'mistral':
    assert reloaded.config.layer_types == ['sliding_attention'] * COMMON['num_hidden_layers']
  tokens, segment_ids = ragged_batch(6)
  ours = reference_logits(reloaded.eval(), tokens, segment_ids)
  theirs = reference_logits(reference, tokens, segment_ids)
  for row, length in enumerate(LENGTHS):
    assert relative_error(ours[row, :length], theirs[row, :length]) < 1e-6, (name, row)


def test_missing_or_unexpected_tensors_are_named(checkpoint, tmp_path):
  name, directory, _ = checkpoint
  tensors = load_file(directory / 'model.safetensors')
  dropped = sorted(tensors)[0]
  from safetensors.numpy import save_file
  save_file({k: v for k, v in tensors.items() if k != dropped}, tmp_path / 'model.safetensors')
  (tmp_path / 'config.json').write_text((directory / 'config.json').read_text())
  with pytest.raises(ConfigError, match='1 missing, first ' + dropped.replace('.', r'\.')):
    import_model(tmp_path)


@pytest.mark.parametrize('variant', sorted(open_models.PUBLISHED))
def test_published_shapes_match_transformers_tensor_by_tensor(variant):
  """The released models' shapes, without weights: lm's eval_shape tree against
  transformers' model on the meta device, through the import's own layouts."""
  published = open_models.PUBLISHED[variant]
  config = open_models.get_config(variant).model
  config.dtype = 'float32'
  with torch.device('meta'):
    reference = transformers.AutoModelForCausalLM.from_config(
        transformers.AutoConfig.for_model(**published))
  theirs = {name: tuple(p.shape) for name, p in reference.state_dict().items()
            if not name.endswith(hf._IGNORED_SUFFIXES)}
  if config.tie_embeddings:
    theirs.pop('lm_head.weight', None)
  ours = jax.eval_shape(lambda rng: nn.meta.unbox(
      models.init_variables(models.build(config), rng)['params']), jax.random.key(0))
  flat = {tuple(k.key for k in path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(ours)[0]}
  names = hf.tensor_map(config)
  assert sorted(name for name, _ in names.values()) == sorted(theirs)
  for path, (name, layout) in names.items():
    as_hf = jax.eval_shape(layout.to_hf, jax.ShapeDtypeStruct(flat[path].shape, jnp.float32))
    assert as_hf.shape == theirs[name], (path, name)
  total = sum(int(np.prod(shape)) for shape in theirs.values())
  assert sum(int(np.prod(leaf.shape)) for leaf in flat.values()) == total
