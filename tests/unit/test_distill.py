"""Distillation's losses against their formulas (lm/objectives/distill.py): the
divergences and their gradients, the teacher's top-k and padding, the loss on a model's
batch, a student that comes to match a fixed teacher, and the on-policy draw."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lm import losses
from lm.objectives import distill

from helpers import init_model, jit_apply, small_model_config


def numpy_divergence(student_logits, teacher_logits, kind, beta=0.5, temperature=1.0):
  """The paper's formulas over the last axis, in float64."""
  def log_softmax(x):
    x = np.asarray(x, np.float64) / temperature
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))
  s, t = log_softmax(student_logits), log_softmax(teacher_logits)
  kl = lambda p, q: (np.exp(p) * (p - q)).sum(-1)
  if kind == 'forward_kl':
    return kl(t, s)
  if kind == 'reverse_kl':
    return kl(s, t)
  m = np.log(beta * np.exp(t) + (1 - beta) * np.exp(s))
  return beta * kl(t, m) + (1 - beta) * kl(s, m)


def log_probs(logits, temperature=1.0):
  return jax.nn.log_softmax(jnp.asarray(logits, jnp.float32) / temperature)


@pytest.mark.parametrize('kind,beta', [('forward_kl', 0.5), ('reverse_kl', 0.5), ('jsd', 0.5),
                                       ('jsd', 0.1), ('jsd', 0.9)])
def test_each_divergence_is_its_formula_and_zero_only_at_the_teacher(kind, beta):
  rng = np.random.default_rng(0)
  student, teacher = rng.normal(size=(2, 3, 5, 11)) * 2
  for temperature in (1.0, 2.5):
    got = distill.divergence(log_probs(student, temperature), log_probs(teacher, temperature),
                             kind, beta)
    want = numpy_divergence(student, teacher, kind, beta, temperature)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert (np.asarray(got) > 0).all()
  same = distill.divergence(log_probs(teacher), log_probs(teacher), kind, beta)
  np.testing.assert_allclose(same, 0, atol=1e-6)


def test_jsd_between_its_limits_is_bounded_as_jensen_shannon_is():
  """JSD(beta) <= -beta log beta - (1 - beta) log(1 - beta) (entropy of the mixing coin),
  reached by disjoint supports; at beta = 1/2 that is log 2."""
  teacher = np.where(np.arange(8) < 4, 0.0, -60.0)[None]
  student = np.where(np.arange(8) < 4, -60.0, 0.0)[None]
  for beta in (0.2, 0.5):
    got = float(distill.divergence(log_probs(student), log_probs(teacher), 'jsd', beta)[0])
    np.testing.assert_allclose(got, -beta * np.log(beta) - (1 - beta) * np.log(1 - beta),
                               rtol=1e-5)


def test_the_forward_kl_gradient_is_the_difference_of_distributions_over_temperature():
  rng = np.random.default_rng(1)
  student, teacher = rng.normal(size=(2, 4, 9)).astype(np.float32)
  temperature = 2.0
  grad = jax.grad(lambda s: distill.divergence(log_probs(s, temperature),
                                               log_probs(teacher, temperature),
                                               'forward_kl').sum())(jnp.asarray(student))
  want = (jax.nn.softmax(student / temperature) - jax.nn.softmax(teacher / temperature)
          ) / temperature
  np.testing.assert_allclose(grad, want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize('kind', ['reverse_kl', 'jsd'])
def test_the_other_gradients_match_finite_differences_of_the_formula(kind):
  rng = np.random.default_rng(2)
  student, teacher = rng.normal(size=(2, 7))
  grad = jax.grad(lambda s: distill.divergence(log_probs(s), log_probs(teacher), kind,
                                               0.3))(jnp.asarray(student, jnp.float32))
  epsilon, numeric = 1e-5, np.zeros(7)
  for index in range(7):
    step = np.eye(7)[index] * epsilon
    numeric[index] = (numpy_divergence(student + step, teacher, kind, 0.3)
                      - numpy_divergence(student - step, teacher, kind, 0.3)) / (2 * epsilon)
  np.testing.assert_allclose(grad, numeric, rtol=1e-3, atol=1e-5)


def model_batch(seed=0, batch=2, length=12, vocab=97):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, vocab, (batch, length)).astype(np.int32)
  segment_ids = np.ones((batch, length), np.int32)
  segment_ids[1, 8:] = 2  # A second document packed into row 1.
  segment_ids[0, 10:] = 0  # Padding.
  positions = np.concatenate([np.arange(8), np.arange(4)])[None].repeat(batch, 0)
  positions[0] = np.arange(length)
  return {'tokens': tokens, 'segment_ids': segment_ids, 'positions': positions.astype(np.int32)}


@pytest.mark.parametrize('top_k', [0, 5])
def test_the_loss_sums_each_targets_divergence_and_weighs_the_token_loss(top_k):
  config = small_model_config()
  model, params = init_model(config)
  teacher_model, teacher_params = init_model(small_model_config(embed_dim=16, mlp_dim=24),
                                             seed=1)
  batch = model_batch()
  vocab_size = 90  # The tokenizer's ids; the models' 97 pad past them.
  outputs = jax.jit(functools.partial(
      distill.teacher_outputs, teacher_model=teacher_model, vocab_size=vocab_size,
      width=config.vocab_size, top_k=top_k, num_microbatches=2))(teacher_params, batch)
  settings = distill.Settings(divergence='jsd', beta=0.3, temperature=1.7,
                              token_loss_weight=0.25, top_k=top_k)
  total, sums, count = jax.jit(functools.partial(
      distill.distill_loss, reference_params=None, model=model, settings=settings))(
          params, {**batch, **outputs})

  student = np.asarray(jit_apply(model)({'params': params}, *batch.values()), np.float64)
  teacher = np.asarray(jit_apply(teacher_model)({'params': teacher_params}, *batch.values()),
                       np.float64)[..., :vocab_size]
  targets, weights = map(np.asarray, losses.next_token_targets(batch))
  want_divergence = want_tokens = 0.0
  for b, t in zip(*np.nonzero(weights)):
    if top_k:
      ids = np.argsort(-teacher[b, t])[:top_k]
      s_row, t_row = student[b, t, ids], teacher[b, t, ids]
    else:
      s_row, t_row = student[b, t, :vocab_size], teacher[b, t]
    want_divergence += numpy_divergence(s_row, t_row, 'jsd', 0.3, 1.7)
    shifted = student[b, t] - student[b, t].max()
    want_tokens += np.log(np.exp(shifted).sum()) - shifted[targets[b, t]]
  assert float(count) == weights.sum() == 19  # Row 0: 9; row 1: 7 + 3 (two documents).
  np.testing.assert_allclose(sums['divergence'], want_divergence, rtol=1e-5)
  np.testing.assert_allclose(sums['token_loss'], want_tokens, rtol=1e-5)
  np.testing.assert_allclose(total, want_divergence + 0.25 * want_tokens, rtol=1e-5)


def test_the_teachers_whole_distribution_is_padded_past_the_tokenizers_ids():
  model, params = init_model(small_model_config())
  batch = model_batch()
  outputs = jax.jit(functools.partial(
      distill.teacher_outputs, teacher_model=model, vocab_size=90, width=100, top_k=0,
      num_microbatches=1))(params, batch)
  logits = np.asarray(outputs['teacher_logits'])
  assert logits.shape == (2, 12, 100)
  np.testing.assert_allclose(logits[..., :90], np.asarray(
      jit_apply(model)({'params': params}, *batch.values()))[..., :90], rtol=1e-5, atol=1e-5)
  assert (logits[..., 90:] == -1e9).all()


@pytest.mark.parametrize('kind', distill.DIVERGENCES)
def test_a_student_comes_to_match_a_fixed_teacher(kind):
  """Free logits trained on each divergence reach the teacher's distribution."""
  teacher = log_probs(np.random.default_rng(3).normal(size=(4, 16)) * 2)
  student = jnp.zeros((4, 16))
  optimizer = optax.adam(optax.cosine_decay_schedule(0.1, 500))
  state = optimizer.init(student)

  @jax.jit
  def step(student, state):
    value, grad = jax.value_and_grad(lambda s: distill.divergence(
        jax.nn.log_softmax(s), teacher, kind, 0.5).sum())(student)
    updates, state = optimizer.update(grad, state)
    return optax.apply_updates(student, updates), state, value
  first = None
  for _ in range(500):
    student, state, value = step(student, state)
    first = value if first is None else first
  assert float(value) < 1e-3 * float(first)
  np.testing.assert_allclose(jax.nn.softmax(student), jnp.exp(teacher), atol=3e-3)


def test_on_policy_batches_are_a_seeded_fraction_of_the_steps():
  draws = [distill.on_policy(0, step, 0.3) for step in range(2000)]
  assert abs(np.mean(draws) - 0.3) < 0.04
  assert draws == [distill.on_policy(0, step, 0.3) for step in range(2000)]  # Resumable.
  assert draws != [distill.on_policy(1, step, 0.3) for step in range(2000)]
  assert not any(distill.on_policy(0, step, 0.0) for step in range(100))
  assert all(distill.on_policy(0, step, 1.0) for step in range(100))


def test_the_batch_shapes_the_step_compiles_for_hold_the_teachers_outputs():
  from experiments.configs import distill as distill_config  # pylint: disable=import-outside-toplevel
  from lm import objectives  # pylint: disable=import-outside-toplevel
  config = distill_config.get_config('tiny')
  objective = objectives.get('distill')
  shapes = objective.batch_shapes(config)
  assert shapes['teacher_logits'].shape == (config.data.batch_size, config.data.seq_len,
                                            config.model.vocab_size)
  config.train.distill.update(top_k=8, data='examples')
  shapes = objective.batch_shapes(config)
  assert shapes['teacher_top_ids'].shape[-1] == 8 and 'loss_mask' in shapes
