"""Losses as small pure functions, shared by every objective.

They return sums, not means, with the token count beside them, so gradient
accumulation and data parallelism divide once by the true number of tokens and
match one big batch exactly.
"""

import jax
import jax.numpy as jnp


def next_token_targets(batch):
  """Targets are the next token of the same document; the last position, padding and
  the first token of the next packed document carry weight 0."""
  tokens_bt, segment_ids_bt = batch['tokens'], batch['segment_ids']
  targets_bt = jnp.pad(tokens_bt[:, 1:], ((0, 0), (0, 1)))
  next_segment_bt = jnp.pad(segment_ids_bt[:, 1:], ((0, 0), (0, 1)))
  weights_bt = (next_segment_bt == segment_ids_bt) & (segment_ids_bt != 0)
  return targets_bt, weights_bt.astype(jnp.float32)


def cross_entropy(logits_btv, targets_bt, weights_bt):
  """Summed token cross-entropy and summed z-loss term log(Z)^2 (PaLM, sec. 5).

  Returns (loss_sum, z_loss_sum, num_tokens) as float32 scalars.
  """
  logits_btv = logits_btv.astype(jnp.float32)
  log_z_bt = jax.nn.logsumexp(logits_btv, axis=-1)
  target_logits_bt = jnp.take_along_axis(logits_btv, targets_bt[..., None], axis=-1)[..., 0]
  loss_sum = jnp.sum((log_z_bt - target_logits_bt) * weights_bt)
  z_loss_sum = jnp.sum(jnp.square(log_z_bt) * weights_bt)
  return loss_sum, z_loss_sum, jnp.sum(weights_bt)
