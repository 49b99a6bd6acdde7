"""A new objective plugs into the loop, the step, the pipeline and the config checks through
the registry alone (tests/unit/test_objectives.py: each is found by its name)."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from helpers import make_tiny_config
from lm import losses, objectives, tokenizer as tokenizer_lib
from lm.data import pipeline, sources
from lm.errors import ConfigError
from lm.objectives import pretrain
from lm.training import loop


class _EveryKthTarget(pretrain.Pretrain):
  """A new objective, whole in this class: pretraining's data, with only the targets at
  positions that are multiples of its own setting config.train.every_kth.k counted."""
  name = 'every_kth'
  count_name = 'num_counted_targets'

  def default_config(self):
    return ml_collections.ConfigDict(dict(k=2))

  def validate(self, config):
    if config.train.every_kth.k < 1:
      raise ConfigError(f'config.train.every_kth.k={config.train.every_kth.k} must be >= 1')

  def settings(self, train_config):
    return train_config.every_kth

  def loss(self, params, batch, reference_params, *, model, settings):
    logits_btv = model.apply({'params': params}, batch['tokens'], batch['segment_ids'],
                             batch['positions'])
    targets_bt, weights_bt = losses.next_token_targets(batch)
    weights_bt = weights_bt * (jnp.arange(weights_bt.shape[1]) % settings.k == 0)
    loss_sum, _, count = losses.cross_entropy(logits_btv, targets_bt, weights_bt)
    return loss_sum, {'loss': loss_sum}, count


def test_a_new_objective_is_one_class_and_one_registry_entry(tmp_path, monkeypatch):
  monkeypatch.setitem(objectives.OBJECTIVES, 'every_kth', _EveryKthTarget())
  # Its settings are in every config from now on, with their defaults.
  config = make_tiny_config(tmp_path / 'corpus')
  config.model.num_layers = 1  # What is checked does not depend on depth; quicker to compile.
  assert config.train.every_kth.k == 2
  config.train.update(objective='every_kth', num_steps=2, log_every=1, eval_every=2,
                      warmup_steps=1)
  config.train.every_kth.k = 0
  with pytest.raises(ConfigError, match=r'config.train.every_kth.k=0 must be >= 1'):
    loop.train(config, str(tmp_path / 'refused'), jax.devices()[:1])

  config.train.every_kth.k = 3
  history, _ = loop.train(config, str(tmp_path / 'run'), jax.devices()[:1])
  # The first batch, made as the loop makes it: its targets at every third position counted.
  objective = objectives.OBJECTIVES['every_kth']
  train_documents, _ = sources.split(objective.source(config.data),
                                     config.data.validation_fraction)
  batch = next(iter(pipeline.make_dataset(
      train_documents, objective, tokenizer_lib.build(config.tokenizer),
      seq_len=config.data.seq_len, batch_size=config.data.batch_size,
      seed=config.seed, train=True, shuffle_window=config.data.shuffle_window)))
  _, weights_bt = losses.next_token_targets(batch)
  assert history[0]['num_counted_targets'] == float(jnp.sum(weights_bt[:, ::3]))
  assert float(jnp.sum(weights_bt[:, 1::3])) > 0  # So the count above is selective.
  assert np.isfinite(history[-1]['eval_loss']) and 'eval_perplexity' in history[-1]
