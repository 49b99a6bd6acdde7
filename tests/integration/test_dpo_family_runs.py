"""A run of DPO's family keeps, and runs, a reference model only if its loss reads one.
The losses against their papers' formulas: tests/unit/test_dpo_family.py."""

import os

import jax
import numpy as np
import pytest

from experiments.configs import dpo as dpo_config
from lm.training import loop, steps

from helpers import post_training_config


@pytest.mark.parametrize('loss', ['ipo', 'orpo'])
def test_a_dpo_family_run_keeps_a_reference_only_if_its_loss_reads_one(
    loss, pretrained, tmp_path, monkeypatch):
  given_reference = []
  original = steps.train_step
  def spy(state, batch, frozen, **options):
    given_reference.append(frozen.reference is not None)
    return original(state, batch, frozen, **options)
  monkeypatch.setattr(steps, 'train_step', spy)

  config = post_training_config(dpo_config, pretrained[0], num_steps=2, warmup_steps=0,
                                log_every=1, eval_every=2, eval_steps=1, learning_rate=1e-3)
  config.train.dpo.loss = loss
  history, _ = loop.train(config, str(tmp_path), jax.devices()[:1])
  rows = {row['step']: row for row in history}
  needs_reference = loss == 'ipo'
  assert given_reference == [needs_reference]  # Traced once, with or without one.
  assert os.path.isdir(tmp_path / 'reference') == needs_reference
  if needs_reference:
    # At the reference, h = 0: IPO's loss is (1 / (2 beta))^2.
    np.testing.assert_allclose(rows[1]['loss'], 1 / (2 * config.train.dpo.beta) ** 2,
                               rtol=1e-5)
    assert rows[1]['reward_margin'] == 0 and 'eval_reward_accuracy' in rows[2]
  else:
    assert 'eval_log_prob_accuracy' in rows[2] and 'eval_log_odds_ratio' in rows[2]
    assert 'reward_margin' not in rows[1]
  assert np.isfinite(rows[2]['loss']) and rows[2]['loss'] != rows[1]['loss']
