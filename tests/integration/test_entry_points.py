"""The real `python -m experiments.train` command: pretrains, post-trains (SFT, DPO, GRPO),
survives SIGTERM and SIGKILL, and refuses unknown config fields.

The commands run through conftest's `commands` (tests/fork_server.py: a real process per
command, with JAX imported once per entry point); the run that they read is conftest's
`trained_run`."""

import json
import os
import re
import signal
import time

import pytest

from conftest import copy_run
from helpers import write_corpus


def train_flags(workdir, corpus, *overrides):
  return ['--config=experiments/configs/default.py:tiny', f'--workdir={workdir}',
          '--config.data.source=text', f'--config.data.path={corpus}',
          '--config.data.validation_fraction=0.25', *overrides]


def checkpoint_steps(workdir):
  directory = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(directory):
    return []
  return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


def start_and_wait_for_checkpoint(commands, flags, workdir, step):
  process = commands.start('experiments.train', *flags)
  deadline = time.time() + 240
  while not any(s >= step for s in checkpoint_steps(workdir)):
    assert process.poll() is None, ''.join(process.output())[-3000:]
    assert time.time() < deadline, 'no checkpoint appeared'
    time.sleep(0.05)
  return process


@pytest.fixture
def corpus(tmp_path):
  return write_corpus(str(tmp_path / 'corpus'))


def test_tiny_run_trains_evaluates_and_prints_a_sample(trained_run):
  workdir, result = trained_run['workdir'], trained_run['result']
  assert result.returncode == 0, result.stderr[-3000:]
  output = result.stdout + result.stderr
  assert 'starting from scratch' in output
  assert 'eval_loss=' in output and 'tokens_per_second=' in output
  assert 'sample:' in output
  assert checkpoint_steps(workdir) == [2, 4]
  assert os.listdir(workdir / 'tensorboard')


def test_sft_then_dpo_and_grpo_commands_start_from_the_run_before(trained_run, commands,
                                                                tmp_path):
  workdir = trained_run['workdir']
  outputs = {}
  for objective, start in (('sft', workdir), ('dpo', tmp_path / 'sft'),
                           ('grpo', tmp_path / 'sft')):
    result = commands('experiments.train', f'--config=experiments/configs/{objective}.py:tiny',
                      f'--workdir={tmp_path / objective}', f'--config.train.init_from={start}')
    assert result.returncode == 0, result.stderr[-3000:]
    outputs[objective] = result.stdout + result.stderr
    assert f'{objective}: ' in outputs[objective]
    start_step = 4  # The latest checkpoint of `start`: the tiny run's, then SFT's.
    assert f'starting from step {start_step} of {start}' in outputs[objective]
    assert 'sample:\ndef ' in outputs[objective]  # A held-out function's prompt, continued.
    assert checkpoint_steps(tmp_path / objective) == [2, 4]
  assert 'eval_perplexity=' in outputs['sft']
  assert 'eval_reward_accuracy=' in outputs['dpo'] and 'reward_margin=' in outputs['dpo']
  assert 'eval_reward=' in outputs['grpo'] and 'kl=' in outputs['grpo']


def test_sample_command_completes_every_prompt(trained_run, commands, tmp_path):
  workdir = trained_run['workdir']
  prompts_file = tmp_path / 'prompts.txt'
  prompts_file.write_text('the cat\nred trees\n')
  result = commands('experiments.sample', f'--workdir={workdir}', '--prompt=a dog',
                    f'--prompts_file={prompts_file}', '--max_new_tokens=20', '--temperature=0')
  assert result.returncode == 0, result.stderr[-3000:]
  for prompt in ('a dog', 'the cat', 'red trees'):
    assert f"--- prompt: '{prompt}'" in result.stdout


def test_evaluate_command_prints_a_table_and_writes_json(trained_run, commands, tmp_path):
  workdir = copy_run(trained_run['workdir'], tmp_path / 'run')
  task = tmp_path / 'colours.jsonl'
  task.write_text('{"context": "the sky is", "choices": [" blue", " red"], "answer": 0}\n'
                  '{"context": "grass is", "choices": [" green", " red"], "answer": 0}\n')
  result = commands('experiments.evaluate', f'--workdir={workdir}', '--task=arithmetic',
                    '--task=arithmetic_choice', f'--task={task}', '--limit=6', '--num_shots=1')
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'colours' in result.stdout and 'accuracy_normalized=' in result.stdout
  with open(workdir / 'eval' / 'step_4.json') as f:
    written = json.load(f)
  assert written['step'] == 4 and written['settings']['num_shots'] == 1
  assert written['results']['arithmetic']['examples'] == 6
  assert 0.0 <= written['results']['colours']['accuracy'] <= 1.0


def test_evaluate_command_reads_published_benchmark_files(trained_run, commands, tmp_path):
  workdir = copy_run(trained_run['workdir'], tmp_path / 'run')
  for split, count in (('dev', 5), ('test', 2)):
    (tmp_path / 'mmlu' / split).mkdir(parents=True)
    (tmp_path / 'mmlu' / split / f'virology_{split}.csv').write_text(''.join(
        f'"Is {i} a virus?",yes,no,maybe,never,{"ABCD"[i % 4]}\n' for i in range(count)))
  gsm8k = tmp_path / 'gsm8k.jsonl'
  gsm8k.write_text('{"question": "What is 2 + 2?", "answer": "2 + 2 = 4\\n#### 4"}\n')
  result = commands('experiments.evaluate', f'--workdir={workdir}',
                    f'--task=mmlu:{tmp_path / "mmlu"}', f'--task=gsm8k:{gsm8k}',
                    '--max_new_tokens=8')
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'virology' in result.stdout and 'exact_match_strict=' in result.stdout
  with open(workdir / 'eval' / 'step_4.json') as f:
    written = json.load(f)['results']
  assert set(written['mmlu']['acc_by_subject']) == {'virology'}
  assert written['gsm8k']['examples'] == 1
  chatted = commands('experiments.evaluate', f'--workdir={workdir}', f'--task=gsm8k:{gsm8k}',
                     '--max_new_tokens=8', '--chat')
  assert chatted.returncode == 0, chatted.stderr[-3000:]
  with open(workdir / 'eval' / 'step_4.json') as f:
    assert json.load(f)['settings']['chat'] is True
  refused = commands('experiments.evaluate', f'--workdir={workdir}', f'--task=gsm8k:{gsm8k}',
                     '--num_shots=2')
  assert refused.returncode != 0 and 'published 8 shots' in refused.stderr
  assert len(refused.stderr.strip().splitlines()) == 1


def test_sample_and_evaluate_name_a_workdir_without_checkpoints(commands, tmp_path):
  for module in ('experiments.sample', 'experiments.evaluate'):
    result = commands(module, f'--workdir={tmp_path}', '--prompt=x'
                      if module == 'experiments.sample' else '--task=arithmetic')
    assert result.returncode != 0
    assert f'--workdir={tmp_path}: no checkpoints' in result.stderr
    assert 'Traceback' not in result.stderr


def test_sigterm_saves_a_checkpoint_and_the_same_command_resumes(tmp_path, corpus, commands):
  workdir = tmp_path / 'run'
  command = train_flags(workdir, corpus, '--config.train.num_steps=400',
                        '--config.checkpoint.every_steps=5')
  process = start_and_wait_for_checkpoint(commands, command, workdir, step=5)
  process.send_signal(signal.SIGTERM)
  stopped = process.wait(timeout=120)
  output = stopped.stdout + stopped.stderr
  assert stopped.returncode == 0, output[-3000:]
  stopped_at = checkpoint_steps(workdir)[-1]
  assert f'stopped at step {stopped_at}; checkpoint saved' in output
  assert stopped_at < 400

  result = commands('experiments.train', *command[:-2],
                    '--config.train.num_steps=' + str(stopped_at + 3))
  assert result.returncode == 0, result.stderr[-3000:]
  assert f'resuming from step {stopped_at}' in result.stdout + result.stderr
  assert checkpoint_steps(workdir)[-1] == stopped_at + 3


def test_sigkill_at_any_point_resumes_from_the_last_finished_checkpoint(tmp_path, corpus,
                                                                       commands):
  workdir = tmp_path / 'run'
  command = train_flags(workdir, corpus, '--config.train.num_steps=400',
                        '--config.checkpoint.every_steps=3')
  process = start_and_wait_for_checkpoint(commands, command, workdir, step=6)
  process.kill()
  process.wait(timeout=60)
  finished = checkpoint_steps(workdir)[-1]

  result = commands('experiments.train', *command[:-2],
                    f'--config.train.num_steps={finished + 2}')
  assert result.returncode == 0, result.stderr[-3000:]
  assert f'resuming from step {finished}' in result.stdout + result.stderr


def test_an_unknown_config_field_is_named(tmp_path, corpus, commands):
  result = commands('experiments.train',
                    *train_flags(tmp_path / 'run', corpus, '--config.model.num_layer=3'))
  assert result.returncode != 0
  assert "unknown config field 'config.model.num_layer'" in result.stderr
  assert 'Traceback' not in result.stderr
  assert not os.path.exists(tmp_path / 'run')


def test_bad_input_prints_one_line_and_no_traceback(tmp_path, corpus, commands):
  result = commands('experiments.train',
                    *train_flags(tmp_path / 'run', corpus, '--config.model.num_kv_heads=3'))
  assert result.returncode != 0
  assert result.stderr.strip().splitlines()[-1] == (
      'error: config.model.num_heads=2 is not divisible by config.model.num_kv_heads=3')
  assert 'Traceback' not in result.stderr


def test_train_tokenizer_names_a_bad_flag_in_one_line_and_replaces_nothing(tmp_path, commands):
  existing = tmp_path / 'existing.model'
  existing.write_text('kept')
  for flags, line in (
      (['--vocab_size=3'], '--vocab_size=3 must be an integer >= 261'),
      (['--max_documents=0'], '--max_documents=0 must be an integer >= 1'),
      ([f'--output={tmp_path}'], f'--output={tmp_path} is a directory; give a new file path'),
      ([f'--output={existing}'], f'--output={existing} exists; give a new file path'),
      (['--vocab_size=300000', '--max_documents=3'],
       '--vocab_size=300000: sentencepiece refused it on 3 documents')):
    result = commands('experiments.train_tokenizer', '--config=experiments/configs/default.py:tiny',
                      f'--output={tmp_path / "new.model"}', *flags)
    assert result.returncode == 1 and 'Traceback' not in result.stderr, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1].startswith('error: ' + line), result.stderr
  assert sorted(os.listdir(tmp_path)) == ['existing.model'] and existing.read_text() == 'kept'


CONFIG_FILES = {  # What a bad --config file holds -> the one line that names it.
    'missing': (None, r"error: --config=.*missing.py: no such file"),
    'syntax': ('def get_config(:\n', r'error: --config=.*syntax.py: .*syntax.py:1: not valid'
                                      r' Python'),
    'no get_config': ('CONFIG = 1\n', r'error: --config=.*no get_config.py: .* defines no'
                                       r' get_config\(\)'),
}


@pytest.mark.parametrize('case', sorted(CONFIG_FILES))
def test_a_bad_config_file_is_named_in_one_line(case, tmp_path, commands):
  text, message = CONFIG_FILES[case]
  path = tmp_path / f'{case}.py'
  if text is not None:
    path.write_text(text)
  result = commands('experiments.train', f'--config={path}', f'--workdir={tmp_path / "run"}')
  assert result.returncode != 0 and 'Traceback' not in result.stderr
  assert re.match(message, result.stderr.strip().splitlines()[-1])
  assert not os.path.exists(tmp_path / 'run')


def test_an_unknown_config_variant_is_named_in_one_line(tmp_path, commands):
  result = commands('experiments.train', '--config=experiments/configs/default.py:huge',
                    f'--workdir={tmp_path}/run')
  assert result.returncode != 0 and 'Traceback' not in result.stderr
  assert result.stderr.strip().splitlines()[-1].endswith(
      "ValueError: unknown config variant 'huge'; one of \"tiny\", \"accelerator\"")


def test_a_diverging_run_stops_in_one_line_naming_the_step(tmp_path, corpus, commands):
  result = commands('experiments.train', *train_flags(
      tmp_path / 'run', corpus, '--config.train.learning_rate=1e3', '--config.train.log_every=20',
      '--config.checkpoint.every_steps=2'))
  assert result.returncode != 0 and 'Traceback' not in result.stderr
  assert re.fullmatch(r'error: loss=\S+ grad_norm=\S+ at step \d+; nothing from it on was'
                      r' saved.*', result.stderr.strip().splitlines()[-1])


@pytest.mark.parametrize('module,flags,row', [
    ('experiments.benchmark_training',
     ['--size=tiny', '--seq_lens=64', '--tokens_per_step=128', '--steps=1'], '| mamba |'),
    ('experiments.benchmark_sampling',
     ['--batch_sizes=2', '--new_tokens=8', '--repeats=1'], '| 2 |'),
    ('experiments.benchmark_sampling',  # A config override and the Mamba cache.
     ['--batch_sizes=2', '--new_tokens=8', '--repeats=1', '--layer_pattern=mamba',
      '--config.model.num_layers=2'], "2 layers of width 128, layer_pattern 'mamba'"),
    ('experiments.benchmark_sampling',  # The kernel profile (the CPU reports no kernels).
     ['--batch_sizes=1', '--new_tokens=4', '--repeats=1', '--profile_steps=2'],
     'batch 1, cached decoding:\nno device kernels'),
])
def test_benchmark_scripts_print_their_table_on_a_tiny_case(module, flags, row, commands):
  result = commands(module, *flags)
  assert result.returncode == 0, result.stderr[-2000:]
  assert row in result.stdout and 'failed' not in result.stdout, result.stdout
