"""Mamba and hybrid models train through the same loop as attention-only ones."""

import jax
import numpy as np
import pytest

from lm.training import loop


@pytest.mark.parametrize('pattern', ['mamba', 'mamba,attention'])
def test_mamba_and_hybrid_models_train_through_the_same_loop(pattern, tiny_config, tmp_path):
  tiny_config.model.update(layer_pattern=pattern)
  tiny_config.train.update(num_steps=6, warmup_steps=2, log_every=1, eval_every=6)
  history, _ = loop.train(tiny_config, str(tmp_path), jax.devices()[:1])
  losses = [row['loss'] for row in history]
  assert np.isfinite(losses).all() and np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.5
