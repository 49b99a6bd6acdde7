import glob
import json
import os
import re
import zlib

import numpy as np
import pytest

from lm import objectives, tokenizer as tokenizer_lib
from lm.data import pipeline, sources
from lm.errors import ConfigError

from helpers import write_corpus


def make_batches(documents, *, seq_len=32, batch_size=4, train=True, seed=0, shuffle_window=8,
                 objective='pretrain'):
  return pipeline.make_dataset(documents, objectives.OBJECTIVES[objective],
                               tokenizer_lib.ByteTokenizer(), seq_len=seq_len,
                               batch_size=batch_size, seed=seed, train=train,
                               shuffle_window=shuffle_window)


def test_packed_rows_reassemble_into_the_documents_with_bos_and_eos():
  documents = ['alpha beta', 'gamma', 'a much longer document that spans rows', 'z']
  tokenizer = tokenizer_lib.ByteTokenizer()
  batches = list(make_batches(documents, seq_len=16, batch_size=1, train=False,
                              shuffle_window=0))
  segments = []
  for batch in batches:
    tokens, segment_ids, positions = (batch[k][0] for k in ('tokens', 'segment_ids', 'positions'))
    for segment in np.unique(segment_ids[segment_ids > 0]):
      where = segment_ids == segment
      np.testing.assert_array_equal(positions[where], np.arange(where.sum()))
      segments.append(tokens[where])
    assert (tokens[segment_ids == 0] == 0).all()
  stream = np.concatenate(segments)
  want = np.concatenate([[1, *tokenizer.encode(d), 2] for d in documents])
  # Validation drops its last partial batch (one shape for every batch).
  np.testing.assert_array_equal(stream, want[:len(stream)])
  assert len(stream) >= len(want) - 16


def test_training_stream_is_seeded_and_reshuffled_each_epoch():
  documents = [f'document number {i}' for i in range(12)]
  first = [b['tokens'] for _, b in zip(range(6), make_batches(documents, seed=3))]
  again = [b['tokens'] for _, b in zip(range(6), make_batches(documents, seed=3))]
  other = [b['tokens'] for _, b in zip(range(6), make_batches(documents, seed=4))]
  np.testing.assert_array_equal(np.stack(first), np.stack(again))
  assert not np.array_equal(np.stack(first), np.stack(other))


# Documents for each objective's pipeline (post-training items are lists of examples).
DOCUMENTS = {
    'pretrain': [f'doc {i} ' * (i + 1) for i in range(40)],
    'sft': [[{'prompt': f'q{i}', 'response': ' a' * (i % 5 + 1)}] for i in range(40)],
    'dpo': [[{'prompt': f'q{i}', 'chosen': ' yes' * (i % 3 + 1), 'rejected': ' no'}]
            for i in range(40)],
}


@pytest.mark.parametrize('objective,shuffle_window,skip', [
    ('pretrain', 0, 3), ('pretrain', 8, 3), ('pretrain', 64, 3), ('pretrain', 64, 20),
    ('sft', 8, 5), ('dpo', 8, 5)])
def test_iterator_state_round_trips_through_the_checkpoint_encoding(objective, shuffle_window,
                                                                    skip):
  make = lambda: iter(make_batches(DOCUMENTS[objective], seq_len=24,
                                   shuffle_window=shuffle_window, objective=objective))
  iterator = make()
  for _ in range(skip):
    next(iterator)
  # Exactly what the checkpoint stores and reads back.
  stored = json.loads(json.dumps(pipeline.encode_tuples(iterator.get_state())))
  expected = [next(iterator)['tokens'] for _ in range(4)]
  resumed = make()
  resumed.set_state(pipeline.decode_tuples(stored))
  np.testing.assert_array_equal(np.stack([next(resumed)['tokens'] for _ in range(4)]),
                                np.stack(expected))


def test_jsonl_source_reads_the_named_field(tmp_path):
  path = tmp_path / 'data.jsonl'
  path.write_text('{"body": "first"}\n\n{"body": "second", "id": 2}\n')
  config = type('C', (), {'source': 'jsonl', 'path': str(path), 'text_field': 'body',
                         'bad_records': 'error'})
  source = objectives.OBJECTIVES['pretrain'].source(config)
  assert [source[i] for i in range(len(source))] == ['first', 'second']
  with pytest.raises(ConfigError, match=r'data.jsonl:1 has no field .text.*2 bad lines in all'):
    sources.JsonLines([str(path)], ('text',))


def test_a_lone_surrogate_is_named_by_file_line_and_field_at_start(tmp_path):
  """JSON can escape one ("\\ud800"); it would fail when tokenized, mid-run."""
  path = tmp_path / 'data.jsonl'
  path.write_text('{"text": "fine"}\n{"text": "abc \\ud800"}\n')
  with pytest.raises(ConfigError, match=re.escape(
      "data.jsonl:2: field 'text' holds '\\ud800', a lone surrogate, which is not UTF-8 text")):
    sources.JsonLines([str(path)], ('text',))
  path.write_text('{"prompt": "fine", "response": "x \\udfff y"}\n')
  with pytest.raises(ConfigError, match=r"data.jsonl:1: field 'response' holds"):
    sources.JsonLines([str(path)], ('prompt', 'response'))


def test_every_source_records_the_size_and_crc_of_each_file_it_read(tmp_path):
  lines = tmp_path / 'data.jsonl'
  lines.write_bytes(b'{"text": "first"}\n\n{"text": "second"}\n')
  texts = write_corpus(str(tmp_path / 'texts'), num_files=3)
  config = type('C', (), {'source': 'jsonl', 'path': str(lines), 'text_field': 'text',
                         'bad_records': 'error'})
  read = objectives.OBJECTIVES['pretrain'].source(config).files
  assert read == {str(lines): [lines.stat().st_size, zlib.crc32(lines.read_bytes())]}
  config.source, config.path = 'text', texts
  read = objectives.OBJECTIVES['pretrain'].source(config).files
  assert read == {path: [os.path.getsize(path), zlib.crc32(open(path, 'rb').read())]
                  for path in sorted(glob.glob(texts))}
  assert len(objectives.OBJECTIVES['sft'].source(
      type('C', (), {'source': 'stdlib_chats'})).files) > 100


def test_a_resumed_runs_files_must_be_those_its_checkpoint_read():
  saved = {'a.txt': [10, 1], 'b.txt': [20, 2]}
  sources.check_same_files(saved, dict(saved), 4, 'W/checkpoints')
  for files, message in (({'a.txt': [11, 7], 'b.txt': [20, 2]}, 'the file a.txt changed since'),
                         ({'a.txt': [10, 1]}, 'the file b.txt is no longer read, but was at'),
                         ({**saved, 'c.txt': [1, 1]}, 'the file c.txt is read now, but was not'
                                                      ' at')):
    with pytest.raises(ConfigError, match=re.escape(
        f'config.data: {message} checkpoint step 4 in W/checkpoints (1 file(s) differ)')):
      sources.check_same_files(saved, files, 4, 'W/checkpoints')


def test_text_source_takes_comma_separated_globs(tmp_path):
  first = write_corpus(str(tmp_path / 'a'), num_files=3)
  second = write_corpus(str(tmp_path / 'b'), num_files=2, seed=1)
  config = type('C', (), {'source': 'text', 'path': f'{first},{second}',
                         'bad_records': 'error'})
  assert len(objectives.OBJECTIVES['pretrain'].source(config)) == 5


def test_missing_and_empty_paths_name_the_field(tmp_path):
  with pytest.raises(ConfigError, match=r"config.data.path: '.*nothing\*.txt' matches no files"):
    sources.expand_paths(str(tmp_path / 'nothing*.txt'))
  (tmp_path / 'empty.txt').write_text('')
  with pytest.raises(ConfigError, match='every file is empty'):
    sources.expand_paths(str(tmp_path / 'empty.txt'))


def test_validation_split_holds_out_whole_groups_deterministically():
  source = sources.stdlib_source()
  train, validation = sources.split(source, 0.05)
  train_keys = {source.keys[i] for i in train.indices}
  validation_keys = {source.keys[i] for i in validation.indices}
  assert validation_keys and not train_keys & validation_keys
  _, again = sources.split(source, 0.05)
  assert again.indices == validation.indices


def test_stdlib_source_excludes_tests():
  source = sources.stdlib_source()
  assert len(source) > 100
  assert not [p for p in source.paths if f'{os.sep}test{os.sep}' in p]
  assert 'def ' in source[source.keys.index('json')]


def test_rows_of_one_long_document_are_spread_across_batches():
  documents = ['x' * 2000] + [f'short document {i}' for i in range(200)]
  batches = [b for _, b in zip(range(40), make_batches(documents, seq_len=16, batch_size=8,
                                                         shuffle_window=256))]
  x_id = tokenizer_lib.ByteTokenizer().encode('x')[0]
  rows_per_batch = [int((b['tokens'] == x_id).all(axis=1).sum()) for b in batches]
  assert sum(rows_per_batch) > 50  # The long document was read ...
  assert max(rows_per_batch) < 8  # ... but never fills a whole batch.
