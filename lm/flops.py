"""Training FLOPs per token of a model config, and model FLOPs utilisation (MFU)."""

import jax

from lm.models import decoder

# Dense bf16 peak FLOP/s per device, by a substring of `device_kind`. Devices not
# listed (CPUs) have no MFU.
PEAK_FLOPS = {
    'H100': 989e12, 'H200': 989e12, 'A100': 312e12,
    'TPU v4': 275e12, 'TPU v5 lite': 197e12, 'TPU v5e': 197e12, 'TPU v5p': 459e12,
    'TPU v6 lite': 918e12, 'TPU v6e': 918e12,
}


def flops_per_token(model_config, seq_len: int) -> float:
  """Forward + backward matmul FLOPs per trained token at sequence length `seq_len`:
  each block's, plus the head's 6 per weight (the embedding lookup is no matmul)."""
  blocks = sum(decoder.BLOCKS[kind].flops_per_token(model_config, seq_len)
               for kind in decoder.layer_kinds(model_config))
  head = model_config.get('head', 'lm')
  outputs = 1 if head == 'score' else model_config.vocab_size
  if head == 'lm_critic':  # PPO's critic: a second model of the same blocks, trained too.
    return 2 * blocks + 6 * model_config.embed_dim * (outputs + 1)
  return blocks + 6 * model_config.embed_dim * outputs


def peak_flops_per_device(device=None) -> float | None:
  kind = (device or jax.devices()[0]).device_kind
  return next((flops for name, flops in PEAK_FLOPS.items() if name in kind), None)


def mfu(tokens_per_second: float, flops_per_token_: float, num_devices: int) -> float | None:
  """Achieved over peak FLOP/s of `num_devices` devices; None where the peak is unknown."""
  peak = peak_flops_per_device()
  return None if peak is None else tokens_per_second * flops_per_token_ / (peak * num_devices)
