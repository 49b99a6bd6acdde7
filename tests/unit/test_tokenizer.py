import pytest

from lm import tokenizer as tokenizer_lib
from lm.errors import ConfigError

TEXT = 'def greet(name):\n    """Say hello."""\n    return f"héllo {name} 🙂"\n\n\tx = [1, 22, 333]\n'


@pytest.fixture(scope='module')
def sentencepiece(tmp_path_factory):
  texts = [TEXT * 3, 'class Thing:\n    pass\n' * 20, 'for i in range(10):\n    print(i)\n' * 20]
  path = str(tmp_path_factory.mktemp('tokenizer') / 'sp.model')
  return tokenizer_lib.train_sentencepiece(texts, vocab_size=400, output_path=path), path


def test_byte_tokenizer_round_trips_any_text():
  tokenizer = tokenizer_lib.ByteTokenizer()
  ids = tokenizer.encode(TEXT)
  assert ids.min() >= 3 and ids.max() < tokenizer.vocab_size
  assert tokenizer.decode(ids) == TEXT


def test_sentencepiece_round_trips_code_including_unseen_characters(sentencepiece):
  tokenizer, _ = sentencepiece
  text = TEXT + 'Unseen: ∑ 漢字\n'
  assert tokenizer.decode(tokenizer.encode(text)) == text
  assert len(tokenizer.encode(TEXT)) < len(TEXT.encode('utf-8'))  # It learned merges.


def test_special_ids_are_fixed(sentencepiece):
  tokenizer, path = sentencepiece
  loaded = tokenizer_lib.SentencePieceTokenizer.load(path)
  for t in (tokenizer, loaded, tokenizer_lib.ByteTokenizer()):
    assert (t.pad_id, t.bos_id, t.eos_id) == (0, 1, 2)
  assert loaded.vocab_size == 400


def test_tokenizer_survives_the_checkpoint_dict(sentencepiece):
  tokenizer, _ = sentencepiece
  restored = tokenizer_lib.from_dict(tokenizer.to_dict())
  assert restored.encode(TEXT).tolist() == tokenizer.encode(TEXT).tolist()
  tokenizer_lib.check_same(tokenizer.to_dict(), restored, 'here')


def test_a_different_tokenizer_is_refused(sentencepiece):
  tokenizer, _ = sentencepiece
  with pytest.raises(ConfigError, match='tokenizer mismatch'):
    tokenizer_lib.check_same(tokenizer.to_dict(), tokenizer_lib.ByteTokenizer(), 'ckpt')


def test_missing_or_corrupt_model_files_name_the_file(tmp_path):
  with pytest.raises(ConfigError, match='nope.model.*does not exist'):
    tokenizer_lib.SentencePieceTokenizer.load(str(tmp_path / 'nope.model'))
  corrupt = tmp_path / 'corrupt.model'
  corrupt.write_bytes(b'not a model')
  with pytest.raises(ConfigError, match='corrupt.model is not a valid sentencepiece model'):
    tokenizer_lib.SentencePieceTokenizer.load(str(corrupt))
