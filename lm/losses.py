"""What every objective's loss shares: next-token targets, cross-entropy, log-probs and
micro-batches. Each objective's own loss lives in its module (lm/objectives/); this
module imports none of them.

Losses return sums, not means, with the count beside them, so gradient accumulation and
data parallelism divide once by the true number of tokens (or pairs) and match one big
batch exactly.
"""

import jax
import jax.numpy as jnp


def next_token_targets(batch):
  """Targets are the next token of the same document; the last position, padding and
  the first token of the next packed document carry weight 0. With a `loss_mask`
  (post-training: 1 on response tokens) only the masked tokens are targets."""
  tokens_bt, segment_ids_bt = batch['tokens'], batch['segment_ids']
  shift = lambda x_bt: jnp.pad(x_bt[:, 1:], ((0, 0), (0, 1)))
  targets_bt = shift(tokens_bt)
  weights_bt = (shift(segment_ids_bt) == segment_ids_bt) & (segment_ids_bt != 0)
  if 'loss_mask' in batch:
    weights_bt &= shift(batch['loss_mask']) != 0
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


def token_log_probs(logits_btv, targets_bt):
  """log p(target) at every position, float32 [B, T]."""
  log_probs_btv = jax.nn.log_softmax(logits_btv.astype(jnp.float32), axis=-1)
  return jnp.take_along_axis(log_probs_btv, targets_bt[..., None], axis=-1)[..., 0]


def sequence_log_probs(logits_btv, targets_bt, weights_bt):
  """Each row's summed log-probability of its weighted targets, float32 [B]."""
  return jnp.sum(token_log_probs(logits_btv, targets_bt) * weights_bt, axis=-1)


def microbatches(batch, num_microbatches: int):
  """[B, ...] arrays -> [num_microbatches, B / num_microbatches, ...]."""
  return jax.tree.map(lambda x: x.reshape(num_microbatches, -1, *x.shape[1:]), batch)
