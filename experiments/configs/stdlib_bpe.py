"""The default run with a 4096-piece sentencepiece BPE tokenizer instead of bytes.

  python -m experiments.train_tokenizer --config=experiments/configs/default.py \
      --output=/tmp/tokenizers/stdlib_4k.model --vocab_size=4096
  python -m experiments.train --config=experiments/configs/stdlib_bpe.py --workdir=/tmp/lm_bpe

Losses are per BPE token, so they are not comparable with the byte-level default's.
"""

from experiments.configs import default


def get_config(variant: str = ''):
  config = default.get_config(variant)
  config.tokenizer.update(kind='sentencepiece', path='/tmp/tokenizers/stdlib_4k.model')
  config.model.vocab_size = 4096
  return config
