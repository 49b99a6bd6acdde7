"""The training loop: checks, set-up, the run's start (lm/training/start.py), then
step/log/evaluate/save.

Plain Python, top to bottom. Every objective (config.train.objective, lm/objectives/)
runs here; they differ only in their data, their loss and, for GRPO, the rollout that
makes each batch from the model's own samples.
"""

import collections
import itertools
import math
import signal
import time
from typing import NamedTuple

import jax
import ml_collections
import numpy as np

from lm import distributed, flops, objectives, sampling, sharding
from lm.data import pipeline, sources
from lm.errors import ConfigError
from lm.training import checkpointing, logger as logger_lib, optimizer as optimizer_lib
from lm.training import setup as setup_lib, start as start_lib, steps


class _StopRequest:
  """SIGINT/SIGTERM set a flag; the loop saves a checkpoint between steps and exits."""

  def __init__(self):
    self.requested = False
    self._previous = {}

  def __enter__(self):
    for signum in (signal.SIGINT, signal.SIGTERM):
      try:
        self._previous[signum] = signal.signal(signum, self._handle)
      except ValueError:  # Not the main thread: leave signals alone.
        pass
    return self

  def _handle(self, signum, frame):
    if self.requested:  # A second Ctrl-C stops at once.
      raise KeyboardInterrupt
    self.requested = True

  def __exit__(self, *exc):
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)


class _Data(NamedTuple):
  train_documents: object
  validation_documents: object
  train_iterator: object
  validation_dataset: object
  eval_batches: int  # Per evaluation, on every process alike.
  skipped: list  # (item, why) left out under config.data.bad_records='skip'
  files: dict  # What the source read, saved with each checkpoint (sources.check_same_files).
  counts: collections.Counter  # Of the training examples read (Objective.rows).


def datasets(config, objective, tokenizer) -> _Data:
  source = objective.source(config.data, config.train)
  train_documents, validation_documents = sources.split(
      source, config.data.validation_fraction)
  num_streams = config.data.streams

  counts = collections.Counter()

  def make(documents, train):
    return pipeline.Streams([pipeline.make_dataset(
        documents, objective, tokenizer, seq_len=objective.data_seq_len(config),
        batch_size=config.data.batch_size // num_streams, seed=config.seed, train=train,
        shuffle_window=config.data.shuffle_window, stream=stream, num_streams=num_streams,
        counts=counts if train else None)
        for stream in pipeline.process_streams(num_streams)])
  validation_dataset = make(validation_documents, train=False)
  # Each batch of an evaluation is a collective that every process must join, and one
  # process's streams may fill fewer batches than another's: all run as many as the
  # fewest (up to eval_steps; the validation batches are the same at every evaluation).
  # One process needs no agreement, so its start reads one batch, not eval_steps.
  eval_steps = config.train.eval_steps
  filled = sum(1 for _ in itertools.islice(validation_dataset,
                                           eval_steps if jax.process_count() > 1 else 1))
  eval_batches = int(distributed.all_gather(np.array([filled])).min())
  eval_batches = eval_batches if jax.process_count() > 1 else eval_steps * eval_batches
  if not eval_batches:
    raise ConfigError(
        f'the validation split ({len(validation_documents)} documents) does not fill one'
        f' batch of config.data.batch_size={config.data.batch_size} x'
        f' config.data.seq_len={config.data.seq_len} in each of config.data.streams='
        f'{num_streams} streams; raise config.data.validation_fraction')
  return _Data(train_documents, validation_documents, iter(make(train_documents, train=True)),
               validation_dataset, eval_batches, source.skipped, source.files, counts)


def _example_counts(counts) -> dict[str, float]:
  """Of the training examples every process has read so far (with what the pipeline
  holds ahead), how many were cut to seq_len and how many skipped with no target left."""
  names = ('examples', 'examples_cut', 'examples_skipped')
  totals = distributed.all_gather(np.array([counts[name] for name in names])).sum(axis=0)
  return {name: float(total) for name, total in zip(names[1:], totals[1:])} if totals[0] else {}


def _global_batch(setup, rollout, params, frozen, host_batch: dict, step: int, *,
                  train: bool, more=None) -> tuple[dict, dict]:
  """(this process's rows as global arrays, batch metrics); with a rollout (GRPO, PPO),
  the policy's completions of the batch's prompts, sampled with the key of `step`, and of
  more of them from `more()` if it asks. `params` are the model's, as it takes them."""
  if rollout:
    return rollout(params, host_batch, step, train=train, more_prompts=more,
                   reference_params=steps.model_params(frozen.reference, frozen.base))
  return sharding.global_batch(host_batch, setup.batch_sharding), {}


def _evaluate(setup, params, frozen, validation_dataset, rollout,
              eval_steps: int) -> dict[str, float]:
  totals, rollout_totals, num_batches = {}, {}, 0
  for index, host_batch in enumerate(itertools.islice(validation_dataset, eval_steps)):
    # Batch `index` is sampled with the same key at every evaluation.
    batch, rollout_metrics = _global_batch(setup, rollout,
                                           steps.model_params(params, frozen.base), frozen,
                                           host_batch, index, train=False)
    rollout_totals = {name: rollout_totals.get(name, 0.0) + value
                      for name, value in rollout_metrics.items()}
    sums = setup.eval_step(params, batch, frozen)
    totals = {name: totals.get(name, 0.0) + float(value) for name, value in sums.items()}
    num_batches += 1
  count = max(totals.pop('count'), 1.0)
  row = {f'eval_{name}': value / count for name, value in totals.items()}
  # Rollout metrics are means over a batch's rows, and every batch has as many.
  row.update({f'eval_{name}': value / num_batches for name, value in rollout_totals.items()})
  if setup.objective.reports_perplexity:
    row['eval_perplexity'] = math.exp(min(row['eval_loss'], 50.0))
  return row


def train(config: ml_collections.ConfigDict, workdir: str, devices=None):
  """Trains (or resumes) the run in `workdir`; returns (logged metric rows, final state)."""
  devices = list(jax.devices() if devices is None else devices)

  # 1. Everything that can be wrong with the inputs, before compiling or writing.
  config, tokenizer = start_lib.resolve(config, len(devices))
  objective = objectives.get(config.train.objective)
  # What it reads: its own data, or (distillation) another objective's.
  data = datasets(config, objective.data_reader(config.train), tokenizer)
  lock = checkpointing.WorkdirLock(workdir)
  checkpointer = checkpointing.Checkpointer(workdir, config.checkpoint.max_to_keep)
  try:
    result = _train(config, workdir, devices, tokenizer, objective, data, checkpointer)
  except BaseException as error:
    # Pending saves finish before any error is reported: no half-written checkpoint. Not
    # when a process is gone: finishing waits on it, and the caller ends this one at once.
    if not distributed.lost_another_process(error):
      checkpointer.close()
    lock.release()
    raise
  checkpointer.close()
  lock.release()
  return result


def _first_non_finite(pending: list) -> tuple | None:
  """The first (step, loss, grad_norm) of `pending` with a non-finite value; one transfer."""
  values = np.asarray(jax.device_get([(loss, grad_norm) for _, loss, grad_norm in pending]))
  bad = ~np.isfinite(values).all(axis=1)
  if not bad.any():
    return None
  index = int(np.argmax(bad))
  return pending[index][0], *values[index]


def _check_finite_params(params, step: int, checkpointer) -> None:
  """Refuses to save params holding a NaN or Inf: a step whose loss and gradient norm are
  finite can still overflow in its update (a huge learning rate or weight decay)."""
  bad = checkpointing.non_finite(params)
  if bad:
    last = checkpointer.latest_step()
    raise FloatingPointError(
        f'the params after step {step} are not finite (NaN or Inf), e.g. {bad[0]}, though'
        ' its loss and gradient norm were: the update overflowed; it was not saved, and the'
        ' last good checkpoint is '
        + (f'step {last} in {checkpointer.directory}' if last is not None else 'none')
        + '; try a lower config.train.learning_rate or weight_decay')


def _start_line(config, setup, run, devices, data) -> str:
  """What trains, on what, on which data, from where."""
  num_params = sum(math.prod(x.shape) for x in jax.tree.leaves(run.state.params))
  if run.frozen.base is not None:
    frozen = sum(math.prod(x.shape) for x in jax.tree.leaves(setup.base.checkpoint_abstract))
    trained = (f'{num_params:,} adapter parameters (rank {config.lora.rank}) on a frozen'
               f' base of {frozen:,}' + (f' stored in {config.lora.base_dtype}'
                                         if config.lora.base_dtype else ''))
  else:
    trained = f'{num_params:,} parameters'
  start = (f'resuming from step {run.step}' if run.step else
           f'starting from step {run.run_config.train.init_from_step} of'
           f' {config.train.init_from}' if config.train.init_from else 'starting from scratch')
  objective = setup.objective
  return (f'{objective.name}: {trained} on a {dict(setup.mesh.shape)} mesh'
          f' of {devices[0].device_kind}; {len(data.train_documents):,} training and'
          f' {len(data.validation_documents):,} validation {objective.items}; compute dtype'
          f' {config.model.dtype}; {start}')


def _train(config, workdir, devices, tokenizer, objective, data, checkpointer):
  train_documents, validation_documents, train_iterator, validation_dataset = data[:4]

  # 2. Shapes, shardings and the jitted steps; then restore, init_from or init onto them.
  setup = setup_lib.make_setup(config, devices)
  with sharding.activate(setup.mesh):
    run = start_lib.start(config, workdir, setup, tokenizer, checkpointer, train_iterator,
                          data.files)
    models_read = [checkpointing.restore_for_inference(path, head=head, flag=field,
                                                       mesh=setup.mesh)
                   for field, path, head in objective.models_read(config.train)]
    rollout = objective.make_rollout(setup, tokenizer, config,
                                     [(restored.model, restored.params)
                                      for restored in models_read])
  state, frozen, start_step = run.state, run.frozen, run.step

  # 3. The loop.
  flops_per_token = flops.flops_per_token(config.model, config.data.seq_len)
  # MFU counts the trained model's forward and backward, not a reference's forward or
  # GRPO's sampling.
  tokens_per_step = (config.data.batch_size * config.data.seq_len
                     * objective.rows_per_example(config.train))
  log = logger_lib.MetricLogger(workdir, start_step, config.train.num_steps,
                                enabled=jax.process_index() == 0)
  schedule = optimizer_lib.learning_rate_schedule(config.train)
  log.print(_start_line(config, setup, run, devices, data))
  if data.skipped:
    log.print(f'left out {len(data.skipped)} bad records (config.data.bad_records=skip);'
              f' the first: {data.skipped[0][1]}')
  if start_step >= config.train.num_steps:
    log.print(f'nothing to do: the checkpoint is at step {start_step} and'
              f' config.train.num_steps={config.train.num_steps}')
    log.close()
    return [], state

  # An objective may take several optimizer steps on one batch (GRPO on one rollout).
  updates_per_batch = objective.updates_per_batch(config.train)

  history = []
  step = start_step
  batch = None
  unchecked = []  # (step, loss, grad_norm) on the device, checked before a log or save.

  def check_finite():
    bad = _first_non_finite(unchecked) if unchecked else None
    unchecked.clear()
    if bad:
      last = checkpointer.latest_step()
      raise FloatingPointError(
          f'loss={bad[1]} grad_norm={bad[2]} at step {bad[0]}; nothing from it on was saved,'
          f' and the last good checkpoint is '
          + (f'step {last} in {checkpointer.directory}' if last is not None else 'none')
          + '; try a lower config.train.learning_rate')
  last_log_time, last_log_step = time.perf_counter(), step
  # Of the rollouts since the last log: their seconds (on the host, so whole) and the
  # completion tokens they sampled.
  rollout_seconds = sampled_tokens = 0.0
  with log, _StopRequest() as stop, sharding.activate(setup.mesh):
    while step < config.train.num_steps:
      if batch is None or step % updates_per_batch == 0:
        began = time.perf_counter()
        batch, batch_metrics = _global_batch(setup, rollout,
                                             steps.model_params(state.params, frozen.base),
                                             frozen, next(train_iterator), step, train=True,
                                             more=lambda: next(train_iterator))
        if 'completion_length' in batch_metrics:  # Sampled: its time is the rollout's.
          rollout_seconds += time.perf_counter() - began
          sampled_tokens += (batch['tokens'].shape[0] * batch_metrics['completion_length']
                             * batch_metrics.get('sampling_rounds', 1.0))
      state, metrics = setup.train_step(state, batch, frozen)
      step += 1
      unchecked.append((step, metrics['loss'], metrics['grad_norm']))
      log.advance(step)

      row = {}
      if step % config.train.log_every == 0 or step == config.train.num_steps:
        check_finite()
        row = {name: float(value) for name, value in {**metrics, **batch_metrics}.items()}
        elapsed = time.perf_counter() - last_log_time
        tokens_per_second = (step - last_log_step) * tokens_per_step / elapsed
        row['learning_rate'] = float(schedule(step - 1))
        row.update(_example_counts(data.counts))
        row['tokens_per_second'] = tokens_per_second
        mfu = flops.mfu(tokens_per_second, flops_per_token, len(devices))
        if mfu is not None:
          row['mfu'] = mfu
        if rollout_seconds:  # Sampling and updating apart: tokens sampled, tokens trained.
          row['sampled_tokens_per_second'] = sampled_tokens / rollout_seconds
          row['update_tokens_per_second'] = ((step - last_log_step) * tokens_per_step
                                             / max(elapsed - rollout_seconds, 1e-9))
        rollout_seconds = sampled_tokens = 0.0
        last_log_time, last_log_step = time.perf_counter(), step
      if step % config.train.eval_every == 0 or step == config.train.num_steps:
        check_finite()
        row.update(_evaluate(setup, state.params, frozen, validation_dataset, rollout,
                             data.eval_batches))
        last_log_time = time.perf_counter()  # Eval time is not training throughput.
        last_log_step, rollout_seconds, sampled_tokens = step, 0.0, 0.0
      if row:
        log.write(step, row)
        history.append({'step': step, **row})

      # A checkpoint holds no batch, so (but for the last) it falls between batches.
      between_batches = step % updates_per_batch == 0
      if jax.process_count() > 1 and between_batches:
        # A scheduler signals every process, not at the same step: all stop at the first
        # step any saw it.
        stop.requested = not distributed.all_ok(not stop.requested)
      if (between_batches and (step % config.checkpoint.every_steps == 0 or stop.requested)
          or step == config.train.num_steps):
        check_finite()  # A checkpoint never holds params of a non-finite step...
        _check_finite_params(state.params, step, checkpointer)  # ...nor an overflowed update.
        checkpointer.save(step, state, train_iterator, data.files, run.run_config, tokenizer)
      if stop.requested and between_batches:
        log.print(f'stopped at step {step}; checkpoint saved, run the same command to resume')
        break

  checkpointer.wait()
  if (step >= config.train.num_steps and config.train.sample_tokens > 0
      and config.model.head != 'score'):  # A reward model scores; it does not sample.
    room = config.model.max_seq_len - config.train.sample_tokens
    prompt = objective.data_reader(config.train).sample_prompt(validation_documents,
                                                               tokenizer, room)
    if prompt is None:
      log.print(f'no sample: no validation prompt is under {room} tokens')
    else:
      [sample] = sampling.complete(
          setup.model, steps.model_params(state.params, frozen.base), tokenizer, [prompt],
          max_new_tokens=config.train.sample_tokens,
          temperature=config.train.sample_temperature, seed=config.seed)
      log.print('sample:\n' + prompt + sample)
  log.close()
  return history, state
