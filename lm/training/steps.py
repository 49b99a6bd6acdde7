"""Pure train and eval steps. jit and sharding are applied around them by the loop."""

import flax.struct
import jax
import jax.numpy as jnp
import optax

from lm.training import losses


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: dict
  opt_state: optax.OptState


def train_state_initializer(model, optimizer, seq_len: int):
  """rng -> TrainState whose params carry logical axis names (boxed), for eval_shape and
  sharding; unbox the result for the arrays themselves."""
  def init(rng):
    tokens = jnp.zeros((1, seq_len), jnp.int32)
    params = model.init(rng, tokens, tokens, tokens)['params']
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=optimizer.init(params))
  return init


def loss_sums(params, batch, model):
  """(loss_sum, z_loss_sum, num_tokens) of next-token prediction on one batch."""
  logits_btv = model.apply({'params': params}, batch['tokens'], batch['segment_ids'],
                           batch['positions'])
  targets_bt, weights_bt = losses.next_token_targets(batch)
  return losses.cross_entropy(logits_btv, targets_bt, weights_bt)


def train_step(state: TrainState, batch, *, model, optimizer, train_config):
  """One optimizer update on `batch` ([B, T] arrays), accumulating gradients over
  `grad_accumulation_steps` micro-batches. Returns (state, metrics)."""
  z_loss_weight = train_config.z_loss_weight

  def objective(params, microbatch):
    loss_sum, z_loss_sum, num_tokens = loss_sums(params, microbatch, model)
    # Summed, so the gradient is divided once by the true token count below.
    return loss_sum + z_loss_weight * z_loss_sum, (loss_sum, z_loss_sum, num_tokens)

  def accumulate(carry, microbatch):
    grads, sums = carry
    (_, microbatch_sums), microbatch_grads = jax.value_and_grad(objective, has_aux=True)(
        state.params, microbatch)
    return (jax.tree.map(jnp.add, grads, microbatch_grads),
            jax.tree.map(jnp.add, sums, microbatch_sums)), None

  num_micro = train_config.grad_accumulation_steps
  microbatches = jax.tree.map(lambda x: x.reshape(num_micro, -1, *x.shape[1:]), batch)
  zeros = (jax.tree.map(jnp.zeros_like, state.params), (jnp.zeros((), jnp.float32),) * 3)
  (grad_sums, (loss_sum, z_loss_sum, num_tokens)), _ = jax.lax.scan(
      accumulate, zeros, microbatches)

  num_tokens = jnp.maximum(num_tokens, 1.0)
  grads = jax.tree.map(lambda g: g / num_tokens, grad_sums)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {
      'loss': loss_sum / num_tokens,
      'z_loss': z_loss_sum / num_tokens,
      'grad_norm': optax.global_norm(grads),
      'num_tokens': num_tokens,
  }
  return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step(params, batch, *, model):
  """Sums for the validation loss: (loss_sum, num_tokens)."""
  loss_sum, _, num_tokens = loss_sums(params, batch, model)
  return {'loss_sum': loss_sum, 'num_tokens': num_tokens}
