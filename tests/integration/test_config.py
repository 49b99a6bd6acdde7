"""Bad input stops before compiling with one message naming the field or file, and leaves
what is already in the workdir untouched."""

import jax
import ml_collections
import pytest

from lm import tokenizer as tokenizer_lib
from lm.errors import ConfigError
from lm.training import loop

from helpers import snapshot


def bad_empty_file(config, tmp_path):
  (tmp_path / 'empty.txt').write_text('')
  config.data.path = str(tmp_path / 'empty.txt')


def bad_sentencepiece(config, tmp_path):
  path = str(tmp_path / 'sp.model')
  tokenizer_lib.train_sentencepiece(['def f(x):\n    return x\n' * 50], 290, path)
  config.tokenizer.update(kind='sentencepiece', path=path)
  config.model.vocab_size = 400


CASES = {
    'missing data path': (lambda c, t: c.data.update(path=str(t / 'missing' / '*.txt')),
                          r"config.data.path: '.*missing/\*.txt' matches no files"),
    'empty data file': (bad_empty_file, r'config.data.path=.*empty.txt.*every file is empty'),
    'seq_len beyond the model': (lambda c, t: c.data.update(seq_len=2048),
                                 r'config.data.seq_len=2048 .*config.model.max_seq_len=256'),
    'heads and kv heads': (lambda c, t: c.model.update(num_heads=3, num_kv_heads=2),
                           r'config.model.num_heads=3 is not divisible by config.model.num_kv_heads=2'),
    'mesh and devices': (lambda c, t: c.mesh.update(data=3),
                         r'config.mesh .* needs 3 devices but 1 are available'),
    'vocab smaller than tokenizer': (lambda c, t: c.model.update(vocab_size=100),
                                     r'config.model.vocab_size=100 is smaller than the tokenizer'),
    'unknown attention': (lambda c, t: c.model.update(attention='flash'),
                          r"config.model.attention='flash' is not one of"),
    'model differs from checkpoint': (lambda c, t: c.model.update(num_layers=3),
                                      r'model.num_layers: checkpoint has 2, config has 3'),
    'tokenizer differs from checkpoint': (bad_sentencepiece, r'tokenizer mismatch'),
    'cudnn attention on cpu': (lambda c, t: c.model.update(attention='cudnn'),
                               r'config.model.attention="cudnn" needs a GPU'),
    'unknown data source': (lambda c, t: c.data.update(source='web'),
                            r"config.data.source='web' is not one of"),
    'no checkpoints kept': (lambda c, t: c.checkpoint.update(max_to_keep=0),
                            r'config.checkpoint.max_to_keep=0 must be an integer >= 1'),
    'negative checkpoints kept': (lambda c, t: c.checkpoint.update(max_to_keep=-2),
                                  r'config.checkpoint.max_to_keep=-2 must be an integer >= 1'),
    'empty batch': (lambda c, t: c.data.update(batch_size=0),
                    r'config.data.batch_size=0 must be an integer >= 1'),
    'negative batch': (lambda c, t: c.data.update(batch_size=-8),
                       r'config.data.batch_size=-8 must be an integer >= 1'),
    'rows of one token': (lambda c, t: c.data.update(seq_len=1),
                          r'config.data.seq_len=1 must be in \[2, '),
    'negative shuffle window': (lambda c, t: c.data.update(shuffle_window=-1),
                                r'config.data.shuffle_window=-1 must be an integer >= 0'),
    'unknown bad-record policy': (lambda c, t: c.data.update(bad_records='ignore'),
                                  r"config.data.bad_records='ignore' is not one of"),
}


@pytest.mark.parametrize('case', sorted(CASES))
def test_bad_input_is_refused_with_the_field_named_and_the_workdir_untouched(
    case, pretrained_config, pretrained, tmp_path):
  workdir, _ = pretrained
  config = ml_collections.ConfigDict(pretrained_config.to_dict())
  break_config, message = CASES[case]
  break_config(config, tmp_path)
  before = snapshot(workdir)
  with pytest.raises(ConfigError, match=message):
    loop.train(config, workdir, jax.devices()[:1])
  assert snapshot(workdir) == before
