"""The loss gradient of each model family reaches every parameter and equals finite
differences of the loss, so no path through a model is cut off from training."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import init_model, small_model_config

PATTERNS = ['attention', 'mamba', 'mamba,attention']


@pytest.fixture(scope='module', params=PATTERNS)
def loss_params_and_grads(request):
  """(loss, params, grads): the mean next-token cross-entropy of random tokens under the
  model of layer_pattern `request.param`, in float32; its params; their gradient."""
  model, params = init_model(small_model_config(layer_pattern=request.param), length=12)
  tokens = jax.random.randint(jax.random.key(1), (2, 12), 3, 97)
  segment_ids = jnp.ones_like(tokens)
  positions = jnp.broadcast_to(jnp.arange(12), tokens.shape)

  def loss(params):
    logits = model.apply({'params': params}, tokens, segment_ids, positions)
    log_probs = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32))
    return -jnp.take_along_axis(log_probs, tokens[:, 1:, None], axis=-1).mean()

  return jax.jit(loss), params, jax.jit(jax.grad(loss))(params)


def leaf_names(tree):
  return [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def test_every_parameter_gets_a_gradient(loss_params_and_grads):
  _, _, grads = loss_params_and_grads
  without = [name for name, grad in zip(leaf_names(grads), jax.tree.leaves(grads))
             if not np.any(np.asarray(grad))]
  assert not without, f'parameters with an all-zero gradient: {without}'


def test_gradient_matches_finite_differences_along_each_parameter(loss_params_and_grads):
  """For each leaf, d/dh loss(params + h v) at h = 0 along a random unit direction v in
  that leaf alone, by central differences, against <grad, v>. One direction per leaf
  rather than one over all params: a leaf of a few dozen numbers (Mamba's d) would
  otherwise be lost in the float32 noise of the whole sum."""
  loss, params, grads = loss_params_and_grads
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(2), len(leaves))
  step = 1e-2  # float32 loss ~4.6: rounding ~5e-7, over 2 * step: ~3e-5 in the slope.
  mismatches = []
  for index, (name, grad, key) in enumerate(zip(leaf_names(params), jax.tree.leaves(grads),
                                                keys)):
    direction = jax.random.normal(key, leaves[index].shape)
    direction /= jnp.linalg.norm(direction)
    def shifted(h):
      return jax.tree.unflatten(tree, [leaf + h * direction if i == index else leaf
                                       for i, leaf in enumerate(leaves)])
    finite_difference = (float(loss(shifted(step))) - float(loss(shifted(-step)))) / (2 * step)
    analytic = float(jnp.vdot(grad, direction))
    if not np.isclose(analytic, finite_difference, rtol=2e-2, atol=2e-4):
      mismatches.append(f'{name}: grad {analytic:.3g}, finite difference {finite_difference:.3g}')
  assert not mismatches, '\n'.join(mismatches)
