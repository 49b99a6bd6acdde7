"""The train step by hand, its loss, weight decay's mask and the learning-rate schedule;
the runs of the loop are in tests/integration/test_training_runs.py."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lm import models, objectives
from lm import losses
from lm.training import optimizer as optimizer_lib, steps

from helpers import small_model_config


@functools.cache
def small_model():
  """A one-layer model and its params, made once (compiled: eager Flax runs op by op)."""
  model_config = small_model_config(vocab_size=50, num_layers=1, embed_dim=16, num_heads=2,
                                    num_kv_heads=1, mlp_dim=32, max_seq_len=16,
                                    tie_embeddings=True)
  model = models.build(model_config)
  init = jax.jit(functools.partial(models.init_variables, model, length=12))
  return model, nn.meta.unbox(init(jax.random.key(0))['params'])


def small_setup(accumulation):
  train_config = ml_collections.ConfigDict(dict(
      learning_rate=1e-2, warmup_steps=0, num_steps=10, final_learning_rate_ratio=0.1,
      weight_decay=0.1, beta1=0.9, beta2=0.95, epsilon=1e-8, grad_clip_norm=1.0,
      grad_accumulation_steps=accumulation, z_loss_weight=1e-3, objective='pretrain'))
  model, params = small_model()
  optimizer = optimizer_lib.make_optimizer(train_config)
  state = steps.TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params))
  step = jax.jit(functools.partial(steps.train_step, model=model, optimizer=optimizer,
                                   objective=objectives.OBJECTIVES['pretrain'],
                                   settings=objectives.OBJECTIVES['pretrain'].settings(train_config),
                                   num_microbatches=accumulation))
  return state, step


def test_gradient_accumulation_matches_one_big_batch():
  rng = np.random.default_rng(0)
  # Uneven document lengths: micro-batches hold different token counts.
  segment_ids = np.ones((4, 12), np.int32)
  segment_ids[0, 3:] = 2
  segment_ids[1, 8:] = 0
  segment_ids[3, 5:] = 0
  positions = np.concatenate([np.arange(12)[None]] * 4)
  positions[0, 3:] -= 3
  batch = {'tokens': rng.integers(3, 50, (4, 12)).astype(np.int32),
           'segment_ids': segment_ids, 'positions': positions.astype(np.int32)}
  state_one, step_one = small_setup(accumulation=1)
  state_four, step_four = small_setup(accumulation=4)
  for _ in range(2):
    state_one, metrics_one = step_one(state_one, batch)
    state_four, metrics_four = step_four(state_four, batch)
    np.testing.assert_allclose(metrics_four['loss'], metrics_one['loss'], rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               state_one.params, state_four.params)


def test_loss_ignores_padding_the_last_position_and_document_boundaries():
  batch = {'tokens': jnp.array([[5, 6, 7, 8, 9, 0]]),
           'segment_ids': jnp.array([[1, 1, 1, 2, 2, 0]])}
  targets, weights = losses.next_token_targets(batch)
  np.testing.assert_array_equal(targets[0, :4], [6, 7, 8, 9])
  np.testing.assert_array_equal(weights[0], [1, 1, 0, 1, 0, 0])
  logits = jax.random.normal(jax.random.key(0), (1, 6, 11))
  loss_sum, z_loss_sum, num_tokens = losses.cross_entropy(logits, targets, weights)
  log_probs = jax.nn.log_softmax(logits[0])
  want = -sum(log_probs[t, int(targets[0, t])] for t in (0, 1, 3))
  np.testing.assert_allclose(loss_sum, want, rtol=1e-6)
  log_z = jax.nn.logsumexp(logits[0], axis=-1)
  np.testing.assert_allclose(z_loss_sum, sum(log_z[t] ** 2 for t in (0, 1, 3)), rtol=1e-6)
  assert num_tokens == 3


def test_weight_decay_skips_norms_and_embeddings():
  state, _ = small_setup(accumulation=1)
  mask = optimizer_lib.weight_decay_mask(state.params)
  assert mask['layer_0']['mlp']['wi_gate']['kernel']
  assert mask['layer_0']['attention']['query']['kernel']
  assert not mask['embed']['embedding']
  assert not mask['layer_0']['attention_norm']['scale']
  assert not mask['final_norm']['scale']


def test_learning_rate_warms_up_linearly_then_decays_by_cosine():
  config = ml_collections.ConfigDict(dict(learning_rate=1.0, warmup_steps=10, num_steps=110,
                                          final_learning_rate_ratio=0.1))
  schedule = optimizer_lib.learning_rate_schedule(config)
  np.testing.assert_allclose([schedule(0), schedule(5), schedule(10)], [0.0, 0.5, 1.0])
  np.testing.assert_allclose(schedule(60), 0.1 + 0.9 * 0.5, rtol=1e-6)
  np.testing.assert_allclose(schedule(110), 0.1, rtol=1e-6)
