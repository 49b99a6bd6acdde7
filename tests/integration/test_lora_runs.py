"""LoRA and QLoRA runs (lm/lora.py): what trains and how adapters shard, the base read and
quantized one entry at a time, runs that name their base, resume exactly and sample
merged, and DPO and GRPO on adapters. The adapted model against its base and the
paper's formula: tests/unit/test_lora.py."""

import shutil

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.configs import sft
from helpers import post_training_config
from test_lora import inputs
from lm import lora, sharding
from lm.errors import ConfigError
from lm.training import checkpointing, loop
from lm.training import setup as setup_lib, steps


def lora_training_config(workdir, **lora_fields):
  config = post_training_config(sft, workdir, num_steps=4, eval_every=2, log_every=1)
  config.lora.update(rank=4, **lora_fields)
  return config


def test_only_the_adapters_train_and_they_shard_by_their_logical_names(pretrained):
  workdir, _ = pretrained
  config = lora_training_config(workdir, dropout=0.1)
  config.mesh.update(data=2, fsdp=4, tensor=1)  # The tiny model has one key-value head.
  config.model.dtype = 'float32'
  setup = setup_lib.make_setup(config, jax.devices())
  with sharding.activate(setup.mesh):
    state = setup.init(jax.random.key(0))
    params, _ = checkpointing.load_params(workdir, -1, setup.base.checkpoint_abstract, config,
                                          _tokenizer(config))
    base = setup.base.prepare(params)
    before = jax.tree.map(np.asarray, (base, state.params))
    # The optimizer holds state for the adapters alone.
    adapter_shapes = sorted(x.shape for x in jax.tree.leaves(state.params))
    assert all(lora.is_adapter(path) for path, _ in
               jax.tree_util.tree_flatten_with_path(state.params)[0])
    moments = [x.shape for x in jax.tree.leaves(state.opt_state) if x.ndim]
    assert sorted(moments) == sorted(adapter_shapes * 2)
    # Adapters take their weight's names: the query's A [embed, r] splits over fsdp, B
    # [r, heads * head_dim] over tensor.
    query = setup.state_shardings.params['layer_0']['attention']['query']
    assert query['kernel_lora_a'].spec == jax.sharding.PartitionSpec('fsdp', None)
    assert query['kernel_lora_b'].spec == jax.sharding.PartitionSpec(None, 'tensor')
    rows = 8
    batch = {name: jnp.asarray(np.tile(np.arange(64) % 50 + 3, (rows, 1)), jnp.int32)
             for name in ('tokens', 'positions')}
    batch.update(segment_ids=jnp.ones((rows, 64), jnp.int32),
                 weights=jnp.ones((rows, 64), jnp.float32))
    batch['positions'] = jnp.tile(jnp.arange(64), (rows, 1))
    batch = jax.device_put(batch, setup.batch_sharding)
    for _ in range(3):
      state, metrics = setup.train_step(state, batch, steps.Frozen(base=base))
  assert np.isfinite(float(metrics['loss']))
  base_after = jax.tree.map(np.asarray, base)
  for old, new in zip(jax.tree.leaves(before[0]), jax.tree.leaves(base_after)):
    np.testing.assert_array_equal(old, new)
  flat_before = flax.traverse_util.flatten_dict(before[1])
  flat_after = flax.traverse_util.flatten_dict(jax.tree.map(np.asarray, state.params))
  assert all(np.any(flat_after[key] != flat_before[key]) for key in flat_before
             if key[-1].endswith('_lora_b'))


def _tokenizer(config):
  from lm import tokenizer as tokenizer_lib  # pylint: disable=import-outside-toplevel
  return tokenizer_lib.build(config.tokenizer)


def test_qlora_quantizes_the_base_one_entry_at_a_time_as_it_is_read(pretrained):
  """The float base is never whole in memory: each top-level entry (embedding, layer) is
  read and quantized before the next, and the result equals quantizing it whole."""
  workdir, _ = pretrained
  config = lora_training_config(workdir, base_dtype='int8')
  config.model.dtype = 'float32'
  setup = setup_lib.make_setup(config, jax.devices()[:2])
  seen = []

  def convert(part):
    seen.append(sorted(part))
    return setup.base.prepare(part)
  with sharding.activate(setup.mesh):
    load = lambda convert: checkpointing.load_params(
        workdir, -1, setup.base.checkpoint_abstract, config, _tokenizer(config),
        convert=convert)[0]
    by_entry = load(convert)
    whole = setup.base.prepare(load(None))
  entries = sorted(setup.base.checkpoint_abstract)
  assert sorted(seen) == [[name] for name in entries] and len(entries) > 2
  flat = lambda tree: jax.tree_util.tree_flatten_with_path(tree)[0]
  assert [path for path, _ in flat(by_entry)] == [path for path, _ in flat(whole)]
  for (path, got), (_, want) in zip(flat(by_entry), flat(whole)):
    assert got.dtype == want.dtype and got.sharding == want.sharding, path
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  assert any(np.asarray(x).dtype == np.int8 for x in jax.tree.leaves(whole))


@pytest.mark.parametrize('base_dtype', ['', 'int8'])
def test_a_lora_run_names_its_base_resumes_exactly_and_samples_merged(pretrained, tmp_path,
                                                                     base_dtype):
  workdir, base_params = pretrained
  config = lora_training_config(workdir, base_dtype=base_dtype, dropout=0.1)
  config.checkpoint.every_steps = 2  # The whole run saves step 2 as well.
  whole, whole_state = loop.train(config, str(tmp_path / 'whole'), jax.devices()[:2])
  # As if stopped after the checkpoint of step 2.
  shutil.copytree(tmp_path / 'whole', tmp_path / 'split', ignore=shutil.ignore_patterns('lock'))
  shutil.rmtree(tmp_path / 'split' / 'checkpoints' / '4')
  resumed, _ = loop.train(config, str(tmp_path / 'split'), jax.devices()[:2])
  losses = lambda rows: {row['step']: row['loss'] for row in rows if 'loss' in row}
  assert losses(resumed) == {step: loss for step, loss in losses(whole).items() if step > 2}
  # The checkpoint holds the adapters and names the base run.
  saved_config, _ = checkpointing.Checkpointer(str(tmp_path / 'whole'), None,
                                               read_only=True).read_metadata(4)
  assert saved_config.train.init_from == workdir and saved_config.train.init_from_step == 2
  assert saved_config.lora.rank == 4
  state_directory = tmp_path / 'whole' / 'checkpoints' / '4' / 'state'
  assert state_directory.is_dir()
  # Inference reads the run as its merged model: what the adapted model computes.
  run = checkpointing.restore_for_inference(str(tmp_path / 'whole'))
  adapted = lora.wrap(run.model, run.config.lora, train=False)
  stored = base_params
  if base_dtype:
    stored = lora.quantize_base(base_params, lora.abstract_split(run.model, run.config.lora)[0])
  # One device's jax arrays: qwix finds a weight among jax arrays only, not numpy ones.
  on_host = lambda tree: jax.tree.map(lambda x: jnp.asarray(np.asarray(x)), tree)
  expected = adapted.apply({'params': lora.combine(on_host(stored),
                                                   on_host(whole_state.params))},
                           *inputs(vocab=run.config.model.vocab_size))
  got = run.model.apply({'params': on_host(run.params)},
                        *inputs(vocab=run.config.model.vocab_size))
  assert float(jnp.max(jnp.abs(got - expected)) / jnp.max(jnp.abs(expected))) < 1e-5
  # Changing the adapters' shape on resume is refused by name, and nothing is set aside.
  config.train.num_steps = 6
  config.lora.rank = 8
  with pytest.raises(ConfigError, match=r'lora.rank: checkpoint has 4, config has 8'):
    loop.train(config, str(tmp_path / 'whole'), jax.devices()[:2])
  assert not (tmp_path / 'whole' / 'set_aside').exists()


def test_dpo_and_grpo_train_adapters_against_the_frozen_base(pretrained, tmp_path):
  from experiments.configs import dpo, grpo  # pylint: disable=import-outside-toplevel
  workdir, _ = pretrained
  config = post_training_config(dpo, workdir, num_steps=3, log_every=1, learning_rate=1e-2)
  config.lora.update(rank=4, dropout=0.1)
  history, _ = loop.train(config, str(tmp_path / 'dpo'), jax.devices()[:1])
  rows = {row['step']: row for row in history}
  # The reference is the base: the adapted policy starts on it exactly (B = 0).
  np.testing.assert_allclose(rows[1]['loss'], np.log(2.0), rtol=1e-6)
  assert rows[3]['loss'] != rows[1]['loss']  # Step 1's rate is 0 (warm-up).
  config = post_training_config(grpo, workdir, num_steps=2, log_every=1, learning_rate=1e-2)
  config.train.grpo.update(max_new_tokens=8, group_size=2)
  config.data.batch_size = 2
  config.lora.update(rank=4, base_dtype='int8')
  history, _ = loop.train(config, str(tmp_path / 'grpo'), jax.devices()[:1])
  assert all(np.isfinite(row['loss']) for row in history if 'loss' in row)
