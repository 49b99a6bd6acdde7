"""Several processes, as on several hosts: 2 processes x 4 CPU devices, connected over
localhost, against 1 process x 8 devices (tests/local_processes.py starts them, forked by
conftest's `commands`)."""

import os
import re
import signal
import time

import pytest

from lm.data import sources

from helpers import write_corpus
import local_processes



def losses(stdout: str) -> dict[int, dict[str, float]]:
  """{step: {'loss': ..., 'eval_loss': ...}} as process 0 printed them (4 decimals)."""
  rows = {}
  for step, rest in re.findall(r'^step (\d+): (.*)$', stdout, re.MULTILINE):
    rows[int(step)] = {name: float(value) for name, value in
                       re.findall(r'\b((?:eval_)?loss)=(-?[0-9.]+|nan|inf)', rest)}
  return rows


def same_losses(got: dict, want: dict) -> bool:
  """The same steps and metrics, each equal to the printed digits: 2 x 4 devices sum in
  another order than 1 x 8, and a value on a rounding boundary prints 1e-4 apart."""
  return got.keys() == want.keys() and all(
      got[step].keys() == want[step].keys()
      and all(abs(got[step][name] - want[step][name]) <= 1.01e-4 for name in got[step])
      for step in got)


def assert_ok(results):
  for index, result in enumerate(results):
    assert result.returncode == 0, (index, result.stdout[-2000:], result.stderr[-3000:])


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
  return write_corpus(str(tmp_path_factory.mktemp('corpus')))


def pretrain_flags(corpus: str, workdir, num_steps: int = 6) -> list[str]:
  # Two streams make up each batch, whatever the number of processes; data x fsdp mesh.
  return ['--config=experiments/configs/default.py:tiny', f'--workdir={workdir}',
          '--config.data.source=text', f'--config.data.path={corpus}',
          '--config.data.validation_fraction=0.25', '--config.train.sample_tokens=0',
          f'--config.train.num_steps={num_steps}', '--config.train.warmup_steps=1',
          '--config.checkpoint.every_steps=2', '--config.train.eval_every=2',
          '--config.train.log_every=1', '--config.data.streams=2', '--config.mesh.fsdp=2']


@pytest.fixture(scope='module')
def one_process(commands, corpus, tmp_path_factory):
  """The pretraining run on 1 process x 8 devices: (workdir, its losses)."""
  workdir = tmp_path_factory.mktemp('one_process') / 'run'
  [result] = local_processes.launch(commands, 'train', *pretrain_flags(corpus, workdir),
                                    num_processes=1, devices_per_process=8)
  assert_ok([result])
  return workdir, losses(result.stdout)


def test_two_processes_train_as_one_then_resume_exactly_after_sigterm(
    commands, corpus, one_process, tmp_path):
  _, want = one_process
  assert sorted(want) == [1, 2, 3, 4, 5, 6]

  # Two processes, sent SIGTERM once the first checkpoint is written, as a scheduler does;
  # then the same command resumes.
  workdir = tmp_path / 'interrupted'
  processes = local_processes.start(commands, 'train', *pretrain_flags(corpus, workdir))
  deadline = time.time() + 300
  while not (workdir / 'checkpoints' / '2').exists() and time.time() < deadline:
    time.sleep(0.2)
  for process in processes:
    process.send_signal(signal.SIGTERM)
  first = local_processes.wait(processes)
  assert_ok(first)
  stopped = re.search(r'stopped at step (\d+)', first[0].stdout + first[0].stderr)
  assert stopped, first[0].stdout[-2000:]
  resumed = local_processes.launch(commands, 'train', *pretrain_flags(corpus, workdir))
  assert_ok(resumed)
  # Steps 1 to the stop, then from the stop on: each the loss of one process.
  rows = {**losses(first[0].stdout), **losses(resumed[0].stdout)}
  assert same_losses(rows, want), (stopped.group(1), rows, want)
  assert losses(first[1].stdout) == losses(resumed[1].stdout) == {}  # Only process 0 logs.
  data = workdir / 'checkpoints' / '6' / 'data'
  assert sorted(p for p in os.listdir(data) if p.endswith('.json')) == [
      'process_0-of-2.json', 'process_1-of-2.json']


def test_resuming_with_another_number_of_processes_is_refused(commands, corpus, one_process):
  workdir, _ = one_process
  results = local_processes.launch(commands, 'train',
                                   *pretrain_flags(corpus, workdir, num_steps=8))
  for result in results:
    assert result.returncode == 1 and 'Traceback' not in result.stderr, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1].startswith(
        'error: checkpoint step 6 in ') and 'was written by 1 process(es) and this run has 2' in (
            result.stderr), result.stderr[-2000:]


def test_an_error_on_one_process_stops_every_process_in_one_line(commands, corpus, tmp_path):
  # Only process 1 is given a bad value: process 0 goes on, and waits for it in vain, for
  # its --peer_timeout (here 5 s).
  results = local_processes.launch(commands, 'train', *pretrain_flags(corpus, tmp_path / 'run'),
                                   '--peer_timeout=5',
                                   only={1: ['--config.train.learning_rate=-1']}, timeout=300)
  for result in results:
    assert result.returncode == 1 and 'Traceback' not in result.stderr, result.stderr[-3000:]
  assert results[1].stderr.strip().splitlines()[-1].startswith(
      'error: config.train.learning_rate=-1.0 must be'), results[1].stderr[-1000:]
  assert results[0].stderr.strip().splitlines()[-1].startswith(
      'error: process 0: another process stopped or cannot be reached'), results[0].stderr[-1000:]


def test_uneven_validation_streams_evaluate_as_many_batches_on_every_process(commands,
                                                                             tmp_path):
  """Stream 0's validation documents fill many batches, stream 1's few: each process runs
  as many evaluation batches (the fewest), where each ran its own count and the two
  deadlocked in their collectives."""
  directory = tmp_path / 'corpus'
  directory.mkdir()
  names = [f'doc_{i:03d}.txt' for i in range(200)]
  held_out = [n for n in names if sources.is_validation(str(directory / n), 0.25)][:4]
  trained = [n for n in names if not sources.is_validation(str(directory / n), 0.25)][:40]
  sentence = 'the quick brown fox jumps over the lazy dog. '
  for name in trained:
    (directory / name).write_text(sentence * 12)
  for index, name in enumerate(held_out):  # In path order, streams 0, 1, 0, 1.
    (directory / name).write_text(sentence * (40 if index % 2 == 0 else 4))
  flags = pretrain_flags(str(directory / '*.txt'), tmp_path / 'run', num_steps=2)
  results = local_processes.launch(commands, 'train', *flags, '--config.train.eval_steps=20',
                                   timeout=240)
  assert_ok(results)
  assert 'eval_loss=' in results[0].stdout, results[0].stdout[-2000:]


@pytest.mark.parametrize('killed', [1, 0])
def test_a_killed_process_stops_the_other_in_one_line_and_a_clean_exit(commands, corpus,
                                                                       tmp_path, killed):
  """kill -9 of one process mid-run (the coordinator, process 0, or the other): the
  survivor ends with its one line and exit code 1, not an abort, within its --peer_timeout
  of noticing (here 10 s, where JAX's default waits 100 s)."""
  workdir = tmp_path / 'run'
  processes = local_processes.start(
      commands, 'train', *pretrain_flags(corpus, workdir, num_steps=10**6), '--peer_timeout=10',
      timeout=300)
  deadline = time.time() + 240
  while not (workdir / 'checkpoints' / '2').exists() and time.time() < deadline:
    time.sleep(0.2)
  processes[killed].kill()
  killed_at = time.time()
  survivor = processes[1 - killed].wait()
  waited = time.time() - killed_at
  assert processes[killed].wait().returncode == -signal.SIGKILL
  lines = survivor.stderr.strip().splitlines()
  assert survivor.returncode == 1 and 'Traceback' not in survivor.stderr, survivor.stderr[-3000:]
  assert lines[-1].startswith(f'error: process {1 - killed}: another process stopped or cannot'
                              ' be reached'), survivor.stderr[-3000:]
  # JAX's runtime may log why it gave up on the peer first (its own lines, not a crash).
  assert 'Fatal Python error' not in survivor.stderr, survivor.stderr[-3000:]
  assert waited < 60, waited


# PPO: the three steps are three updates on one rollout, each on all of it (a mini-batch
# of 4 rows would not split over 8 devices).
PPO_FLAGS = ('--config.train.ppo.epochs=3', '--config.train.ppo.minibatches=1',
             '--config.checkpoint.every_steps=3')


@pytest.mark.parametrize('objective', ['sft', 'dpo', 'grpo', 'ppo'])
def test_post_training_on_two_processes_gives_the_losses_of_one(objective, one_process,
                                                                commands, tmp_path):
  source, _ = one_process
  flags = lambda workdir: [
      f'--config=experiments/configs/{objective}.py:tiny', f'--workdir={workdir}',
      f'--config.train.init_from={source}', '--config.data.validation_fraction=0.3',
      '--config.model.dtype=float32', '--config.train.sample_tokens=0',
      '--config.train.num_steps=3', '--config.train.warmup_steps=1',
      '--config.train.eval_every=3', '--config.train.log_every=1', '--config.data.streams=2',
      '--config.data.batch_size=8', *(PPO_FLAGS if objective == 'ppo' else ())]
  [one] = local_processes.launch(commands, 'train', *flags(tmp_path / 'one'), num_processes=1,
                                 devices_per_process=8)
  two = local_processes.launch(commands, 'train', *flags(tmp_path / 'two'))
  assert_ok([one, *two])
  assert same_losses(losses(two[0].stdout), losses(one.stdout)), (two[0].stdout[-2000:],
                                                                   one.stdout[-2000:])
  assert len(losses(one.stdout)) == 3
  if objective in ('grpo', 'ppo'):  # Rewards, from every process's rows, averaged.
    reward = lambda result: re.findall(r'\breward=\S+', result.stdout)
    assert reward(two[0]) == reward(one) and reward(one)


def test_sample_and_evaluate_on_two_processes_give_what_one_gives(one_process, commands):
  workdir, _ = one_process
  sample = ['--prompt=the cat', '--prompt=a dog ran', '--max_new_tokens=12', '--seed=3',
            '--temperature=0.8', f'--workdir={workdir}']
  evaluate = ['--task=arithmetic_choice', '--task=arithmetic', '--limit=6',
              '--batch_size=4', '--max_new_tokens=6', f'--workdir={workdir}']
  outputs = {}
  for processes, devices in ((1, 1), (1, 8), (2, 4)):
    sampled = local_processes.launch(commands, 'sample', *sample, num_processes=processes,
                                     devices_per_process=devices)
    scored = local_processes.launch(commands, 'evaluate', *evaluate, num_processes=processes,
                                    devices_per_process=devices)
    assert_ok(sampled + scored)
    quiet = [result.stdout for result in sampled[1:] + scored[1:]]
    # Process 0 reports. (A bare newline can be left of gloo's interleaved connection lines.)
    assert not any(output.strip() for output in quiet), quiet
    metrics = [line for line in scored[0].stdout.splitlines() if line.startswith('arithmetic')]
    outputs[processes, devices] = (sampled[0].stdout, metrics)
  assert outputs[2, 4] == outputs[1, 8]
  assert outputs[1, 8][1] == outputs[1, 1][1]  # Scores do not depend on the sharding.
  assert '--- prompt' in outputs[1, 1][0] and len(outputs[1, 1][1]) == 2


def test_convert_in_and_out_on_two_processes_keeps_every_tensor(commands, tmp_path):
  """Import places each tensor over both processes' devices; export gathers them back:
  the tensors that come out are the ones that went in, bit for bit."""
  from safetensors.numpy import load_file
  from test_convert import write_checkpoint
  write_checkpoint(tmp_path / 'hf')
  workdir, output = tmp_path / 'imported', tmp_path / 'exported'
  assert_ok(local_processes.launch(commands, 'convert', f'--from_hf={tmp_path / "hf"}',
                                   f'--workdir={workdir}'))
  results = local_processes.launch(commands, 'convert', '--to_hf', f'--workdir={workdir}',
                                   f'--output={output}')
  assert_ok(results)
  assert 'exported' in results[0].stdout and 'exported' not in results[1].stdout
  original, exported = (load_file(path / 'model.safetensors') for path in (tmp_path / 'hf', output))
  assert sorted(exported) == sorted(original)
  for name, tensor in original.items():
    assert exported[name].tobytes() == tensor.tobytes(), name
