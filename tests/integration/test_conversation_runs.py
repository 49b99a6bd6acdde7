"""SFT runs on conversations: what they cut and skip is counted, and a run on the built-in
conversations ends with a sample of a reply. The data: tests/unit/test_conversations.py."""


import jax
import numpy as np

from experiments.configs import sft as sft_config
from lm.training import loop

from helpers import post_training_config
from test_conversations import CONVERSATION, write_lines


def test_sft_on_conversations_counts_what_it_cuts_and_skips(pretrained, tmp_path):
  """Conversations whose assistant turns lie past seq_len are skipped and counted, never
  trained on with no target; the rest train."""
  workdir, _ = pretrained
  long_system = {'role': 'system', 'content': 'x' * 300}
  # The split hashes file:line, so enough lines that both sides fill a batch wherever the
  # file is.
  records = ([{'messages': CONVERSATION}] * 6 + [{'messages': [long_system] + CONVERSATION[1:]}]) * 12
  path = write_lines(tmp_path / 'chats.jsonl', records)
  config = post_training_config(sft_config, workdir, num_steps=3, log_every=3, eval_every=3)
  config.data.update(source='jsonl', path=path, seq_len=128, batch_size=4,
                     validation_fraction=0.3)
  history, _ = loop.train(config, str(tmp_path / 'run'), jax.devices()[:1])
  logged = [row for row in history if 'examples_skipped' in row][-1]
  assert logged['examples_skipped'] >= 1 and logged['examples_cut'] >= logged['examples_skipped']
  assert np.isfinite(logged['loss'])


def test_sft_on_the_built_in_conversations_ends_with_a_sample_of_a_reply(pretrained, tmp_path,
                                                                         capsys):
  workdir, _ = pretrained
  config = post_training_config(sft_config, workdir, num_steps=2, log_every=2, eval_every=2)
  config.train.sample_tokens = 8
  config.data.update(source='stdlib_chats', seq_len=256, validation_fraction=0.3)
  loop.train(config, str(tmp_path / 'run'), jax.devices()[:1])
  printed = capsys.readouterr()
  assert 'sample:\n' in printed.out + printed.err and 'Write a Python function' in (
      printed.out + printed.err)
