"""Model families by name (`config.model.name`)."""

from lm.models import transformer

MODELS = {
    'transformer': transformer.Transformer,
}

FLOPS_PER_TOKEN = {
    'transformer': transformer.flops_per_token,
}


def build(model_config):
  return MODELS[model_config.name](model_config)
