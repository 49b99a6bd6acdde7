"""Pure train and eval steps. jit and sharding are applied around them by the loop.

Every objective shares the step and differs in its loss (lm/objectives/): a loss
returns sums over the batch and what they are averaged over (tokens or pairs), so
gradient accumulation and data parallelism divide once by the true count.
"""

import flax.struct
import jax
import jax.numpy as jnp
import optax

from lm import lora, models


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: dict
  opt_state: optax.OptState


def train_state_initializer(model, optimizer, adapters_only: bool = False):
  """rng -> TrainState whose params carry logical axis names (boxed), for eval_shape and
  sharding; unbox the result for the arrays themselves. `adapters_only`: the params
  trained are an adapted model's adapters (lm/lora.py)."""
  def init(rng):
    params = models.init_variables(model, rng)['params']
    if adapters_only:
      params = lora.split(params)[1]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=optimizer.init(params))
  return init


def microbatches(batch, num_microbatches: int):
  """[B, ...] arrays -> [num_microbatches, B / num_microbatches, ...]."""
  return jax.tree.map(lambda x: x.reshape(num_microbatches, -1, *x.shape[1:]), batch)


def model_params(trained, base_params):
  """The params the model takes: the trained ones, or with LoRA (lm/lora.py) the frozen
  base with the trained adapters beside its weights."""
  if trained is None or base_params is None:
    return trained
  return lora.combine(base_params, trained)


def train_step(state: TrainState, batch, reference_params=None, base_params=None, *, model,
               optimizer, objective, train_config, dropout_rng=None):
  """One optimizer update on `batch` (arrays with the batch axis first), accumulating
  gradients over `grad_accumulation_steps` micro-batches. `reference_params` are the
  frozen params an objective may compare with (None otherwise); with LoRA, the state's
  params are the adapters, trained on the frozen `base_params`, and `dropout_rng` draws
  their dropout masks. Returns (state, metrics)."""

  def loss(params, microbatch, index):
    applied = model
    if dropout_rng is not None:  # Masks new at every step and micro-batch.
      applied = lora.WithDropoutRng(model, jax.random.fold_in(
          jax.random.fold_in(dropout_rng, state.step), index))
    total, sums, count = objective.loss(
        model_params(params, base_params), microbatch,
        model_params(reference_params, base_params), model=applied,
        train_config=train_config)
    return total, (sums, count)

  def accumulate(carry, indexed_microbatch):
    index, microbatch = indexed_microbatch
    (_, microbatch_sums), microbatch_grads = jax.value_and_grad(loss, has_aux=True)(
        state.params, microbatch, index)
    return jax.tree.map(jnp.add, carry, (microbatch_grads, microbatch_sums)), None

  split = microbatches(batch, train_config.grad_accumulation_steps)
  sums_shape = jax.eval_shape(loss, state.params, jax.tree.map(lambda x: x[0], split), 0)[1]
  zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), (state.params, sums_shape))
  indices = jnp.arange(train_config.grad_accumulation_steps)
  (grad_sums, (sums, count)), _ = jax.lax.scan(accumulate, zeros, (indices, split))

  count = jnp.maximum(count, 1.0)
  grads = jax.tree.map(lambda g: g / count, grad_sums)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {name: value / count for name, value in sums.items()}
  metrics.update({'grad_norm': optax.global_norm(grads), objective.count_name: count})
  return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step(params, batch, reference_params=None, base_params=None, *, model, objective,
              train_config):
  """The loss's metric sums on one batch, with their count under 'count'."""
  _, sums, count = objective.loss(
      model_params(params, base_params), batch, model_params(reference_params, base_params),
      model=model, train_config=train_config)
  return {**sums, 'count': count}
