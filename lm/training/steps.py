"""Pure train and eval steps. jit and sharding are applied around them by the loop.

Pretraining, SFT, DPO and GRPO share the step and differ in their loss function (and data):
a loss returns sums over the batch and what they are averaged over (tokens or pairs),
so gradient accumulation and data parallelism divide once by the true count.
"""

import dataclasses
from typing import Callable

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


def token_loss(params, batch, reference_params, *, model, train_config):
  """Pretraining and SFT: next-token cross-entropy on the weighted targets of [B, T]
  arrays, plus the z-loss. Returns (objective sum, metric sums, number of tokens)."""
  del reference_params
  logits_btv = model.apply({'params': params}, batch['tokens'], batch['segment_ids'],
                           batch['positions'])
  targets_bt, weights_bt = losses.next_token_targets(batch)
  loss_sum, z_loss_sum, num_tokens = losses.cross_entropy(logits_btv, targets_bt, weights_bt)
  total = loss_sum + train_config.z_loss_weight * z_loss_sum
  return total, {'loss': loss_sum, 'z_loss': z_loss_sum}, num_tokens


def dpo_loss(params, batch, reference_params, *, model, train_config):
  """DPO on [B, 2, T] arrays: each pair's chosen (0) and rejected (1) sequence, with the
  response marked by `loss_mask`. Returns (loss sum, metric sums, number of pairs)."""
  rows = {name: value.reshape(-1, value.shape[-1]) for name, value in batch.items()}
  targets_bt, weights_bt = losses.next_token_targets(rows)

  def log_probs_b2(params):
    logits_btv = model.apply({'params': params}, rows['tokens'], rows['segment_ids'],
                             rows['positions'])
    return losses.sequence_log_probs(logits_btv, targets_bt, weights_bt).reshape(-1, 2)

  policy_b2 = log_probs_b2(params)
  reference_b2 = jax.lax.stop_gradient(log_probs_b2(reference_params))
  chosen_lengths_b = jnp.sum(weights_bt, axis=-1).reshape(-1, 2)[:, 0]
  sums = losses.dpo(policy_b2[:, 0], policy_b2[:, 1], reference_b2[:, 0], reference_b2[:, 1],
                    chosen_lengths_b, beta=train_config.dpo_beta,
                    nll_weight=train_config.dpo_nll_weight)
  return sums['loss'], sums, jnp.asarray(policy_b2.shape[0], jnp.float32)


def _policy_log_probs_bt(params, batch, model, temperature: float):
  """Log-probs [B, T] of each row's next tokens under the model at `temperature`."""
  targets_bt, _ = losses.next_token_targets(batch)
  logits_btv = model.apply({'params': params}, batch['tokens'], batch['segment_ids'],
                           batch['positions'])
  return losses.token_log_probs(logits_btv.astype(jnp.float32) / temperature, targets_bt)


def grpo_loss(params, batch, reference_params, *, model, train_config):
  """GRPO on rollout rows (lm/training/rollouts.py): [B, T] arrays of prompt + sampled
  completion, `loss_mask` on the completion, `advantages` on every token, and, when a
  rollout serves several updates, `old_log_probs` of the policy that sampled. The policy
  is the model at the sampling temperature. Returns (loss sum, metric sums, number of
  completion tokens)."""
  grpo_config = train_config.grpo
  _, weights_bt = losses.next_token_targets(batch)
  log_probs_bt = _policy_log_probs_bt(params, batch, model, grpo_config.temperature)
  # Without them, this update is the rollout's only one (or an evaluation): the sampler
  # is the policy itself, and nothing is clipped.
  sampled_by_policy = 'old_log_probs' not in batch
  old_log_probs_bt = (jax.lax.stop_gradient(log_probs_bt) if sampled_by_policy
                      else batch['old_log_probs'])
  reference_bt = jax.lax.stop_gradient(
      _policy_log_probs_bt(reference_params, batch, model, grpo_config.temperature))
  sums = losses.grpo(log_probs_bt, old_log_probs_bt, reference_bt, batch['advantages'],
                     weights_bt, kl_weight=grpo_config.kl_weight,
                     clip_epsilon=grpo_config.clip_epsilon)
  if sampled_by_policy:
    del sums['clipped']
  return sums['loss'], sums, jnp.sum(weights_bt)


def _microbatches(batch, train_config):
  """[B, ...] arrays -> [grad_accumulation_steps, B / grad_accumulation_steps, ...]."""
  num_micro = train_config.grad_accumulation_steps
  return jax.tree.map(lambda x: x.reshape(num_micro, -1, *x.shape[1:]), batch)


def sampling_log_probs(params, batch, *, model, train_config):
  """GRPO's `old_log_probs` [B, T] for a rollout's rows, before its first update; in
  micro-batches like the train step, as whole-batch logits may not fit."""
  log_probs = jax.lax.map(
      lambda rows: _policy_log_probs_bt(params, rows, model, train_config.grpo.temperature),
      _microbatches(batch, train_config))
  return log_probs.reshape(batch['tokens'].shape)


@dataclasses.dataclass(frozen=True)
class Objective:
  loss: Callable  # (params, batch, reference_params, *, model, train_config) -> sums
  count_name: str  # What the sums are averaged over.
  needs_reference: bool  # Whether the loss reads frozen reference params.


OBJECTIVES = {
    'pretrain': Objective(token_loss, 'num_tokens', needs_reference=False),
    'sft': Objective(token_loss, 'num_tokens', needs_reference=False),
    'dpo': Objective(dpo_loss, 'num_pairs', needs_reference=True),
    'grpo': Objective(grpo_loss, 'num_tokens', needs_reference=True),
}


def train_step(state: TrainState, batch, reference_params=None, *, model, optimizer,
               train_config):
  """One optimizer update on `batch` (arrays with the batch axis first), accumulating
  gradients over `grad_accumulation_steps` micro-batches. `reference_params` are the
  frozen params DPO and GRPO compare with (None otherwise). Returns (state, metrics)."""
  objective = OBJECTIVES[train_config.objective]

  def loss(params, microbatch):
    total, sums, count = objective.loss(params, microbatch, reference_params, model=model,
                                        train_config=train_config)
    return total, (sums, count)

  def accumulate(carry, microbatch):
    (_, microbatch_sums), microbatch_grads = jax.value_and_grad(loss, has_aux=True)(
        state.params, microbatch)
    return jax.tree.map(jnp.add, carry, (microbatch_grads, microbatch_sums)), None

  microbatches = _microbatches(batch, train_config)
  sums_shape = jax.eval_shape(loss, state.params, jax.tree.map(lambda x: x[0], microbatches))[1]
  zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype),
                       (state.params, sums_shape))
  (grad_sums, (sums, count)), _ = jax.lax.scan(accumulate, zeros, microbatches)

  count = jnp.maximum(count, 1.0)
  grads = jax.tree.map(lambda g: g / count, grad_sums)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {name: value / count for name, value in sums.items()}
  metrics.update({'grad_norm': optax.global_norm(grads), objective.count_name: count})
  return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step(params, batch, reference_params=None, *, model, train_config):
  """The loss's metric sums on one batch, with their count under 'count'."""
  _, sums, count = OBJECTIVES[train_config.objective].loss(
      params, batch, reference_params, model=model, train_config=train_config)
  return {**sums, 'count': count}
