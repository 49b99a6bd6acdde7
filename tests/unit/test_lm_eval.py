"""lm as lm-evaluation-harness's model `lm` (lm/evaluation/lm_eval_model.py): its rolling
windows are the harness's, the package declares it where the harness looks, and its
--model_args are checked before a checkpoint is read."""

import pytest

lm_eval = pytest.importorskip('lm_eval')  # In the test extra; skipped only without it.

from lm.errors import ConfigError  # noqa: E402
from lm.evaluation import lm_eval_model, scoring  # noqa: E402


@pytest.mark.parametrize('length,max_length', [(10, 4), (9, 4), (4, 4), (5, 4), (2, 8), (30, 7)])
def test_rolling_windows_are_the_harness_windows(length, max_length):
  """scoring.rolling_windows against lm-evaluation-harness's own functions: the same
  inputs read and the same tokens predicted, window by window."""
  from lm_eval import utils  # pylint: disable=import-outside-toplevel
  ids = list(range(100, 100 + length))  # A prefix token, then the text's.
  windows, starts = scoring.rolling_windows(ids, max_length)
  theirs = [utils.make_disjoint_window(pair) for pair in utils.get_rolling_token_windows(
      token_list=ids[1:], prefix_token=ids[0], max_seq_len=max_length, context_len=1)]
  # The harness's (context, predicted): the model reads context + predicted[:-1].
  reads = [w[:-1] for w in windows]
  assert reads == [(context + predicted)[:-1] for context, predicted in theirs]
  assert [w[s:] for w, s in zip(windows, starts)] == [predicted for _, predicted in theirs]
  assert all(len(read) <= max_length for read in reads)


def test_the_package_declares_lm_where_plugin_loading_harnesses_look():
  """The entry point `lm_eval.models: lm` (the group lm-evaluation-harness's plugin
  discovery reads) is installed and resolves, through the harness's own Registry, to the
  model class; with it, `lm_eval run --model lm` needs no wrapper."""
  import importlib.metadata
  from lm_eval.api.model import LM
  from lm_eval.api.registry import Registry
  [entry_point] = [entry for entry in importlib.metadata.entry_points(group='lm_eval.models')
                   if entry.name == 'lm']
  registry = Registry('model', base_cls=LM)
  registry.register(entry_point.name, target=entry_point)
  assert registry.get('lm') is lm_eval_model.LmEvalModel


def test_model_args_that_lm_does_not_take_or_without_a_workdir_are_named():
  model = lm_eval_model.LmEvalModel
  with pytest.raises(ConfigError, match=r"--model_args: 'bogus' is not an argument of lm"
                                        r' \(it takes workdir, step, batch_size, max_length\)'):
    model.create_from_arg_string('workdir=/nonexistent,bogus=1')
  for make in (lambda: model.create_from_arg_string('step=3'),
               lambda: model.create_from_arg_obj({'batch_size': 4})):
    with pytest.raises(ConfigError, match=r'--model_args needs workdir=<the run directory>'):
      make()
  # Known arguments reach the checkpoint, which is then named.
  with pytest.raises(ConfigError, match=r'--workdir=/nonexistent: no checkpoints'):
    model.create_from_arg_string('workdir=/nonexistent,step=3', {'batch_size': 8,
                                                                'device': None})
