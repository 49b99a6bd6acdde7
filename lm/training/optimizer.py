"""AdamW with warm-up + cosine decay, global-norm clipping, and no decay on norms
and embeddings."""

import flax
import jax
import optax


def learning_rate_schedule(train_config) -> optax.Schedule:
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0,
      peak_value=train_config.learning_rate,
      warmup_steps=train_config.warmup_steps,
      decay_steps=train_config.num_steps,
      end_value=train_config.learning_rate * train_config.final_learning_rate_ratio,
  )


def weight_decay_mask(params):
  """True for matmul weights; False for norm scales (1-D) and the embedding table."""
  def decays(path, value):
    names = {getattr(entry, 'key', None) for entry in path}
    return value.ndim > 1 and 'embed' not in names
  return jax.tree_util.tree_map_with_path(decays, flax.linen.meta.unbox(params))


def make_optimizer(train_config) -> optax.GradientTransformation:
  return optax.chain(
      optax.clip_by_global_norm(train_config.grad_clip_norm),
      optax.adamw(
          learning_rate=learning_rate_schedule(train_config),
          b1=train_config.beta1,
          b2=train_config.beta2,
          eps=train_config.epsilon,
          weight_decay=train_config.weight_decay,
          mask=weight_decay_mask,
      ),
  )
