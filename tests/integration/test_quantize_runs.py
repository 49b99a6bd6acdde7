"""experiments.quantize end to end: a tiny run quantized by the command restores with its
weights integers, samples and evaluates; bad input ends in one line with nothing
written, and training from a quantized run is refused. The stored weights and the
quantized model against their formulas: tests/unit/test_quantization.py."""

import os
import shutil

import jax
import numpy as np
import pytest

from helpers import snapshot
from lm import quantization
from lm import tokenizer as tokenizer_lib
from lm.training import checkpointing
from test_inference_commands import error_line


@pytest.fixture(scope='module')
def quantized(commands, pretrained, tmp_path_factory):
  """(directory, the command's result) of the `pretrained` run quantized to int4 in groups
  of 32 (the tiny model's head_dim). Read, never written."""
  output = tmp_path_factory.mktemp('quantized') / 'int4'
  result = commands('experiments.quantize', f'--workdir={pretrained[0]}', f'--output={output}',
                    '--scheme=int4', '--group_size=32')
  assert result.returncode == 0, result.stderr[-3000:]
  return output, result


def test_a_quantized_run_restores_with_its_weights_integers(quantized, pretrained):
  output, result = quantized
  assert f'to int4 (groups of 32) into {output}: params' in result.stdout, result.stdout
  run = checkpointing.restore_for_inference(str(output), keep_quantized=True)
  assert (run.config.quantization.scheme, run.config.quantization.group_size) == ('int4', 32)
  assert run.config.quantization.source.startswith(os.path.abspath(pretrained[0]))
  kernel = run.params['layer_0']['attention']['query']['kernel']
  assert kernel.array.qvalue.dtype.name == 'int4'
  assert isinstance(run.params['embed']['embedding'], jax.Array)
  # Every other reader (convert, merge, lm_eval) gets the plain model, dequantized.
  plain = checkpointing.restore_for_inference(str(output))
  jax.tree.map(np.testing.assert_array_equal, plain.params,
               jax.device_get(quantization.dequantize(run.params)))
  float_run = checkpointing.restore_for_inference(pretrained[0])
  assert quantization.param_bytes(run.params) < quantization.param_bytes(float_run.params) / 2


def test_a_quantized_run_samples_and_evaluates(commands, quantized, tmp_path):
  workdir = shutil.copytree(quantized[0], tmp_path / 'run')  # evaluate writes its results.
  result = commands('experiments.sample', f'--workdir={workdir}', '--prompt=the cat',
                    '--max_new_tokens=8', '--temperature=0')
  assert result.returncode == 0, result.stderr[-3000:]
  assert "--- prompt: 'the cat'" in result.stdout
  task = tmp_path / 'text.jsonl'
  task.write_text('{"text": "the cat sat on a mat while dogs ran far away."}\n')
  result = commands('experiments.evaluate', f'--workdir={workdir}', f'--task={task}')
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'perplexity=' in result.stdout, result.stdout  # Generation: sample's, above.
  assert os.path.isfile(workdir / 'eval' / 'step_2.json')


def test_bad_input_to_quantize_is_one_line_and_writes_nothing(commands, quantized, pretrained,
                                                              tmp_path):
  source, before = pretrained[0], snapshot(pretrained[0])
  occupied = tmp_path / 'occupied'
  occupied.mkdir()
  (occupied / 'a_file').write_text('')
  for flags, expected in (
      (['--scheme=int3'], "--scheme='int3' is not one of int8, int4"),
      (['--scheme=int4', '--group_size=48'],
       "--group_size=48 does not divide key's input axis of 64 (int4 is quantized in tiles"),
      (['--group_size=0'], '--group_size=0 must be an integer >= 1'),
      ([f'--output={occupied}'], f'--output={occupied} is not empty'),
      ([f'--workdir={quantized[0]}'], f'--workdir={quantized[0]} is already quantized (int4,'),
      ([f'--workdir={tmp_path / "missing"}'], f'--workdir={tmp_path / "missing"} does not'
       ' exist')):
    line = error_line(commands('experiments.quantize', f'--workdir={source}',
                               f'--output={tmp_path / "new"}', *flags))
    assert line.startswith('error: ') and expected in line, (flags, line)
  assert not os.path.exists(tmp_path / 'new') and snapshot(source) == before
  assert os.listdir(occupied) == ['a_file']


def test_a_reward_model_is_refused_before_its_params_are_read(commands, pretrained, tmp_path):
  """Read from its config alone: the checkpoint's one array is no model's."""
  source = checkpointing.Checkpointer(pretrained[0], max_to_keep=None, read_only=True)
  config, tokenizer = source.read_metadata(source.latest_step())
  source.close()
  config.model.head = 'score'
  reward_model = checkpointing.Checkpointer(str(tmp_path / 'reward_model'), max_to_keep=None)
  reward_model.save_params(2, {'score': np.zeros(1, np.float32)}, config,
                           tokenizer_lib.from_dict(tokenizer))
  reward_model.close()
  line = error_line(commands('experiments.quantize', f'--workdir={tmp_path / "reward_model"}',
                             f'--output={tmp_path / "new"}'))
  assert line == (f"error: --workdir={tmp_path / 'reward_model'} holds a model with"
                  " model.head='score'; only a language model (model.head='lm') is"
                  ' quantized'), line
  assert not os.path.exists(tmp_path / 'new')


def test_training_from_a_quantized_run_is_refused(commands, quantized, tmp_path):
  before = snapshot(quantized[0])
  line = error_line(commands('experiments.train', '--config=experiments/configs/sft.py:tiny',
                             f'--workdir={tmp_path / "sft"}',
                             f'--config.train.init_from={quantized[0]}'))
  assert line == (f"error: config.train.init_from='{quantized[0]}' holds a model quantized to"
                  f' int4 (experiments.quantize, from {quantization_source(quantized[0])}):'
                  ' train from the run it was quantized from'), line
  assert snapshot(quantized[0]) == before


def quantization_source(workdir) -> str:
  return checkpointing.inference_config(str(workdir), None, None)[1].quantization.source
