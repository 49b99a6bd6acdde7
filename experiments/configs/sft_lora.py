"""LoRA SFT: configs/sft.py training only low-rank adapters (lm/lora.py) on the frozen
default model; the checkpoints hold the adapters and name the base run.

  python -m experiments.train --config=experiments/configs/default.py --workdir=/tmp/lm_default
  python -m experiments.train --config=experiments/configs/sft_lora.py --workdir=/tmp/lm_lora \
      --config.train.init_from=/tmp/lm_default
  python -m experiments.sample --workdir=/tmp/lm_lora --prompt='def add(a, b):'
  python -m experiments.merge --workdir=/tmp/lm_lora --output=/tmp/lm_lora_merged

QLoRA: --config.lora.base_dtype=int8 (or nf4, int4) stores the base's block matrices
quantized. Conversations: --config.data.source=stdlib_chats, as in configs/sft_chat.py.
"""

from experiments.configs import sft


def get_config(variant: str = ''):
  config = sft.get_config(variant)
  config.lora.update(rank=16, alpha=32.0)
  # Adapters start at zero and are few: they take a larger rate than every weight does.
  config.train.learning_rate = 2e-3
  return config
