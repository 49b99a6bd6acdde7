"""Chat SFT: the default model fine-tuned on conversations, each a standard-library
function asked for, written, then written again with its docstring (no download).

  python -m experiments.train --config=experiments/configs/default.py --workdir=/tmp/lm_default
  python -m experiments.train --config=experiments/configs/sft_chat.py --workdir=/tmp/lm_chat \
      --config.train.init_from=/tmp/lm_default
  python -m experiments.sample --workdir=/tmp/lm_chat --chat --temperature=0 \
      --prompt='Write a Python function `def add(a, b):` that does this: Return a + b.'

The conversations are rendered by the model's chat template (lm's default one for the
byte tokenizer: role lines, eos ending each turn) and only the assistant's turns are
targets. For your own data: --config.data.source=jsonl --config.data.path=FILES, each
line {"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}.
"""

from experiments.configs import sft


def get_config(variant: str = ''):
  config = sft.get_config(variant)
  config.data.source = 'stdlib_chats'
  if variant != 'tiny':
    config.data.update(seq_len=1024, batch_size=8)
  return config
