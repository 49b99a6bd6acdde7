"""Train a sentencepiece BPE tokenizer (byte fallback, pad=0 bos=1 eos=2) on a config's
training split.

  python -m experiments.train_tokenizer --config=experiments/configs/default.py \
      --output=/tmp/tokenizers/stdlib_4k.model --vocab_size=4096

Then train with --config.tokenizer.kind=sentencepiece --config.tokenizer.path=<output>
(or experiments/configs/stdlib_bpe.py).
"""

from absl import flags
from ml_collections import config_flags

from experiments import cli
from lm import tokenizer as tokenizer_lib
from lm import objectives
from lm.data import sources
from lm.errors import ConfigError, check_new_file, check_number

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config whose data to train on.')
_OUTPUT = flags.DEFINE_string('output', None, 'Path of the .model file to write.')
_VOCAB_SIZE = flags.DEFINE_integer('vocab_size', 4096, 'Vocabulary size, specials included.')
_MAX_DOCUMENTS = flags.DEFINE_integer('max_documents', 20_000, 'Documents to train on, at most.')
flags.mark_flags_as_required(['config', 'output'])


# 256 byte pieces (byte fallback) and 4 specials, then at least one learned piece; past
# about a million, sentencepiece's BPE trainer runs out of memory before it runs out of
# merges on any corpus this reads.
VOCAB_SIZES = (261, 2**20)


def main():
  check_number('--vocab_size', _VOCAB_SIZE.value, at_least=VOCAB_SIZES[0],
               at_most=VOCAB_SIZES[1], why='256 byte pieces and 4 specials, then merges')
  check_number('--max_documents', _MAX_DOCUMENTS.value, at_least=1)
  check_new_file('--output', _OUTPUT.value)
  data_config = _CONFIG.value.data
  source = objectives.OBJECTIVES['pretrain'].source(data_config)
  train_documents, _ = sources.split(source, data_config.validation_fraction)
  count = min(len(train_documents), _MAX_DOCUMENTS.value)
  # Validation documents are left out so validation loss stays honest.
  texts = (train_documents[i] for i in range(count))
  try:
    tokenizer = tokenizer_lib.train_sentencepiece(texts, _VOCAB_SIZE.value, _OUTPUT.value)
  except RuntimeError as error:  # Its own checks, such as a vocabulary too big for the text.
    raise ConfigError(f'--vocab_size={_VOCAB_SIZE.value}: sentencepiece refused it on'
                      f' {count} documents ({str(error).strip().splitlines()[-1]})') from error
  sample = train_documents[0][:200]
  print(f'wrote {_OUTPUT.value}: {tokenizer.vocab_size} pieces from {count} documents;'
        f' {len(sample.encode())} bytes of the first document -> {len(tokenizer.encode(sample))}'
        ' tokens')


if __name__ == '__main__':
  cli.run(main)
