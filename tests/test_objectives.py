"""The objective registry: each objective is found by its name, and a new one plugs into
the loop, the step, the pipeline and the config checks through the registry alone."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm import objectives, tokenizer as tokenizer_lib
from lm.data import pipeline, sources
from lm.errors import ConfigError
from lm.objectives import pretrain
from lm.training import losses, loop


def test_every_objective_is_registered_under_its_own_name():
  assert sorted(objectives.OBJECTIVES) == ['dpo', 'grpo', 'pretrain', 'sft']
  for name, objective in objectives.OBJECTIVES.items():
    assert objective.name == name
    assert isinstance(objective, objectives.Objective)


class _EvenTargets(pretrain.Pretrain):
  """Pretraining's data, with only the targets at even positions counted."""
  name = 'even_targets'
  count_name = 'num_even_targets'

  def validate(self, config):
    if config.train.z_loss_weight != 0:
      raise ConfigError('config.train.z_loss_weight must be 0 for even_targets')

  def loss(self, params, batch, reference_params, *, model, train_config):
    logits_btv = model.apply({'params': params}, batch['tokens'], batch['segment_ids'],
                             batch['positions'])
    targets_bt, weights_bt = losses.next_token_targets(batch)
    weights_bt = weights_bt * (jnp.arange(weights_bt.shape[1]) % 2 == 0)
    loss_sum, _, count = losses.cross_entropy(logits_btv, targets_bt, weights_bt)
    return loss_sum, {'loss': loss_sum}, count


def test_a_new_objective_runs_from_the_registry_alone(tiny_config, tmp_path, monkeypatch):
  monkeypatch.setitem(objectives.OBJECTIVES, 'even_targets', _EvenTargets())
  tiny_config.train.update(objective='even_targets', num_steps=2, log_every=1, eval_every=2,
                           warmup_steps=1)
  with pytest.raises(ConfigError, match='z_loss_weight must be 0 for even_targets'):
    loop.train(tiny_config, str(tmp_path / 'refused'), jax.devices()[:1])

  tiny_config.train.z_loss_weight = 0.0
  history, _ = loop.train(tiny_config, str(tmp_path / 'run'), jax.devices()[:1])
  # The first batch, made as the loop makes it: its even-position targets were counted.
  objective = objectives.OBJECTIVES['even_targets']
  train_documents, _ = sources.split(objective.source(tiny_config.data),
                                     tiny_config.data.validation_fraction)
  batch = next(iter(pipeline.make_dataset(
      train_documents, objective, tokenizer_lib.build(tiny_config.tokenizer),
      seq_len=tiny_config.data.seq_len, batch_size=tiny_config.data.batch_size,
      seed=tiny_config.seed, train=True, shuffle_window=tiny_config.data.shuffle_window)))
  _, weights_bt = losses.next_token_targets(batch)
  assert history[0]['num_even_targets'] == float(jnp.sum(weights_bt[:, ::2]))
  assert float(jnp.sum(weights_bt[:, 1::2])) > 0  # So the count above is selective.
  assert np.isfinite(history[-1]['eval_loss']) and 'eval_perplexity' in history[-1]
