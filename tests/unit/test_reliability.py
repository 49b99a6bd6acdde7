"""Bad records named at start, or skipped and counted; the checkpoints that never lie are
in tests/integration/test_reliability_runs.py."""

import pytest

from lm import objectives
from lm.data import sources
from lm.errors import ConfigError

from helpers import write_corpus


def test_bad_json_lines_are_named_at_start_or_skipped_and_counted(tmp_path):
  path = tmp_path / 'data.jsonl'
  path.write_bytes(b'{"text": "good"}\n{"text": null}\n{"text": "bad \xff byte"}\n[1, 2]\n'
                   b'{"text": "also good"}\n')
  config = type('C', (), dict(source='jsonl', path=str(path), text_field='text',
                              bad_records='error'))
  pretrain = objectives.OBJECTIVES['pretrain']
  with pytest.raises(ConfigError, match=r"data.jsonl:2: field 'text' is null, not a string"
                                        r" \(3 bad lines in all"):
    pretrain.source(config)
  config.bad_records = 'skip'
  source = pretrain.source(config)
  assert [source[i] for i in range(len(source))] == ['good', 'also good']
  assert [why.split(' ', 1)[0].rsplit('/', 1)[1] for _, why in source.skipped] == [
      'data.jsonl:2:', 'data.jsonl:3', 'data.jsonl:4']
  assert 'is not UTF-8 text' in source.skipped[1][1]


def test_a_binary_file_in_a_text_source_is_named_or_skipped(tmp_path):
  pattern = write_corpus(str(tmp_path / 'corpus'), num_files=3)
  (tmp_path / 'corpus' / 'doc_zzz.txt').write_bytes(b'text\nand \x80\x81 binary')
  with pytest.raises(ConfigError, match=r'doc_zzz.txt:2 is not UTF-8 text \(byte 9\) \(1 bad files'):
    sources.TextFiles(sources.expand_paths(pattern))
  kept = sources.TextFiles(sources.expand_paths(pattern), bad_records='skip')
  assert len(kept) == 3 and len(kept.skipped) == 1
