"""DecoderLM: tokens -> embedding -> a stack of residual blocks -> logits.

Each layer's block is named by `config.model.layer_pattern`, repeated over
`num_layers`: 'attention' (lm/models/transformer.py), 'mamba' (lm/models/mamba.py), or
an interleaving such as 'mamba,mamba,attention'. A new kind of block is a module with
the same call, `(x_btd, segment_ids_bt, positions_bt, decode) -> x_btd`, added to
BLOCKS with its FLOP count. Dimension letters as in lm/__init__.py.
"""

import dataclasses
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from lm import sharding
from lm.models import layers, mamba, transformer


@dataclasses.dataclass(frozen=True)
class Block:
  module: type[nn.Module]  # (x_btd, segment_ids_bt, positions_bt, decode) -> x_btd
  flops_per_token: Callable[[ml_collections.ConfigDict, int], float]  # (config, T)


BLOCKS = {
    'attention': Block(transformer.AttentionBlock, transformer.flops_per_token),
    'mamba': Block(mamba.MambaBlock, mamba.flops_per_token),
}

REMAT_POLICIES = {
    'full': jax.checkpoint_policies.nothing_saveable,
    'save_dots': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def parse_layer_pattern(layer_pattern: str) -> list[str]:
  """'mamba, mamba,attention' -> ['mamba', 'mamba', 'attention']."""
  return [kind.strip() for kind in layer_pattern.split(',')]


def layer_kinds(cfg) -> list[str]:
  """Each layer's block: `layer_pattern` repeated over `num_layers`."""
  pattern = parse_layer_pattern(cfg.layer_pattern)
  return [pattern[layer % len(pattern)] for layer in range(cfg.num_layers)]


class DecoderLM(nn.Module):
  """tokens [B, T] -> logits [B, T, V] in float32, through the blocks of `layer_kinds`.
  With config.head 'score' (which the objective sets: Objective.model_head), a score
  [B, T] in float32 instead, from a Dense 'score' [embed, 1] (as HF's
  *ForSequenceClassification with one label): a reward model's. With 'lm_value', the
  logits and, outside decoding, a value per position from a Dense 'value_head' on the same
  trunk; with 'lm_critic', from a second model of the same shapes with head 'score',
  'critic' (PPO's critic either way; read with `values`)."""
  config: ml_collections.FrozenConfigDict

  @nn.compact
  def __call__(self, tokens_bt, segment_ids_bt, positions_bt, decode: bool = False):
    cfg = self.config
    # Unit-variance inputs from a 1/sqrt(D) table (scaled by sqrt(D)) keep tied
    # output logits at unit scale too. Imported models (Llama, Qwen, Mamba) do not scale.
    embed = nn.Embed(
        cfg.vocab_size, cfg.embed_dim, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
        embedding_init=nn.with_logical_partitioning(
            nn.initializers.variance_scaling(1.0, 'fan_out', 'normal', out_axis=0),
            ('vocab', 'embed')),
        name='embed')
    x_btd = embed(tokens_bt)
    if cfg.scale_embeddings:
      x_btd = x_btd * jnp.asarray(cfg.embed_dim ** 0.5, cfg.dtype)
    x_btd = sharding.constrain(x_btd, ('act_batch', 'act_seq', 'act_embed'))

    for layer, kind in enumerate(layer_kinds(cfg)):
      block = BLOCKS[kind].module
      if cfg.remat != 'none' and not decode:  # Decoding keeps no activations for a backward pass.
        block = nn.remat(block, policy=REMAT_POLICIES[cfg.remat], static_argnums=(4,))
      x_btd = block(cfg, name=f'layer_{layer}')(x_btd, segment_ids_bt, positions_bt, decode)

    x_btd = layers.RMSNorm(cfg.norm_eps, cfg.dtype, name='final_norm')(x_btd)
    if cfg.get('head', 'lm') == 'score':  # A reward or value model: a number per position.
      score_bt1 = nn.Dense(
          1, use_bias=False, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
          kernel_init=layers.dense_init(('embed', None)), name='score')(x_btd)
      return score_bt1[..., 0].astype(jnp.float32)
    head = cfg.get('head', 'lm')
    if head in ('lm_value', 'lm_critic') and not decode:
      # A policy with its critic (PPO): values beside the logits, read with
      # mutable=['intermediates'] (`values`), unseen by any other caller.
      if head == 'lm_value':
        value_bt = nn.Dense(
            1, use_bias=False, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
            kernel_init=layers.dense_init(('embed', None)), name='value_head')(x_btd)[..., 0]
      else:
        critic = ml_collections.FrozenConfigDict({**cfg.to_dict(), 'head': 'score'})
        value_bt = DecoderLM(critic, name='critic')(tokens_bt, segment_ids_bt, positions_bt)
      self.sow('intermediates', 'values', value_bt.astype(jnp.float32))
    if cfg.tie_embeddings:
      logits_btv = embed.attend(x_btd)
    else:
      logits_btv = nn.Dense(
          cfg.vocab_size, use_bias=False, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
          kernel_init=layers.dense_init(('embed', 'vocab')), name='lm_head')(x_btd)
    logits_btv = sharding.constrain(logits_btv, ('act_batch', 'act_seq', 'act_vocab'))
    return logits_btv.astype(jnp.float32)


def values(model, params, tokens_bt, segment_ids_bt, positions_bt):
  """(logits [B, T, V], values [B, T]) of a model with config.head 'lm_value'."""
  logits_btv, state = model.apply({'params': params}, tokens_bt, segment_ids_bt,
                                  positions_bt, mutable=['intermediates'])
  return logits_btv, state['intermediates']['values'][0]
