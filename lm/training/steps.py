"""Pure train and eval steps. jit and sharding are applied around them by the loop.

Every objective shares the step and differs in its loss (lm/objectives/): a loss
returns sums over the batch and what they are averaged over (tokens or pairs), so
gradient accumulation and data parallelism divide once by the true count.
"""

import flax.struct
import jax
import jax.numpy as jnp
import optax

from lm import lora, losses, models


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


@flax.struct.dataclass
class Frozen:
  """What a step reads and does not train. `base`: with LoRA (lm/lora.py), the model the
  adapters train on (else None). `reference`: the params an objective compares with, as
  trained (with LoRA, adapters), or None for an objective that reads none."""
  base: dict | None = None
  reference: dict | None = None


NOTHING_FROZEN = Frozen()


def model_params(trained, base_params):
  """The params the model takes: the trained ones, or with LoRA (lm/lora.py) the frozen
  base with the trained adapters beside its weights."""
  if trained is None or base_params is None:
    return trained
  return lora.combine(base_params, trained)


def train_step(state: TrainState, batch, frozen: Frozen = NOTHING_FROZEN, *, model,
               optimizer, objective, settings, num_microbatches: int = 1, dropout_rng=None):
  """One optimizer update on `batch` (arrays with the batch axis first), accumulating
  gradients over `num_microbatches` (config.train.grad_accumulation_steps). The
  objective's loss reads `settings` (objective.settings(config.train)); with LoRA, the
  state's params are the adapters, trained on `frozen.base`, and `dropout_rng` draws their
  dropout masks. Returns (state, metrics)."""
  reference_params = model_params(frozen.reference, frozen.base)

  def loss(params, microbatch, index):
    applied = model
    if dropout_rng is not None:  # Masks new at every step and micro-batch.
      applied = lora.WithDropoutRng(model, jax.random.fold_in(
          jax.random.fold_in(dropout_rng, state.step), index))
    total, sums, count = objective.loss(
        model_params(params, frozen.base), microbatch, reference_params, model=applied,
        settings=settings)
    return total, (sums, count)

  def accumulate(carry, indexed_microbatch):
    index, microbatch = indexed_microbatch
    (_, microbatch_sums), microbatch_grads = jax.value_and_grad(loss, has_aux=True)(
        state.params, microbatch, index)
    return jax.tree.map(jnp.add, carry, (microbatch_grads, microbatch_sums)), None

  batch = objective.update_batch(batch, state.step, settings)
  split = losses.microbatches(batch, num_microbatches)
  sums_shape = jax.eval_shape(loss, state.params, jax.tree.map(lambda x: x[0], split), 0)[1]
  zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), (state.params, sums_shape))
  indices = jnp.arange(num_microbatches)
  (grad_sums, (sums, count)), _ = jax.lax.scan(accumulate, zeros, (indices, split))

  count = jnp.maximum(count, 1.0)
  grads = jax.tree.map(lambda g: g / count, grad_sums)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {name: value / count for name, value in sums.items()}
  metrics.update({'grad_norm': optax.global_norm(grads), objective.count_name: count})
  return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step(params, batch, frozen: Frozen = NOTHING_FROZEN, *, model, objective, settings):
  """The loss's metric sums on one batch, with their count under 'count'."""
  _, sums, count = objective.loss(
      model_params(params, frozen.base), batch,
      model_params(frozen.reference, frozen.base), model=model, settings=settings)
  return {**sums, 'count': count}
