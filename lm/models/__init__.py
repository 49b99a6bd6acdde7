"""Model families by name (`config.model.name`), and how to build and initialise one."""

import jax.numpy as jnp
import ml_collections

from lm.models import decoder

MODELS = {
    'decoder': decoder.DecoderLM,
}


def build(model_config):
  """The model of `config.model` (a ConfigDict, frozen here: flax modules hash it)."""
  return MODELS[model_config.name](ml_collections.FrozenConfigDict(model_config))


def init_variables(model, rng, *, batch_size: int = 1, length: int = 1,
                   decode: bool = False) -> dict:
  """`model.init` on [batch_size, length] dummy tokens: boxed 'params' (logical axis
  names), and with `decode` the empty 'cache' of `length` slots per row. Shapes depend
  only on the config, so this also serves under `jax.eval_shape`."""
  tokens_bt = jnp.zeros((batch_size, length), jnp.int32)
  return model.init(rng, tokens_bt, tokens_bt, tokens_bt, decode=decode)
