"""The training loop: checks, set-up, init or restore, then step/log/evaluate/save.

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
import jax.numpy as jnp
import ml_collections
import numpy as np

from lm import config as config_lib
from lm import distributed, flops, objectives, sampling, sharding
from lm import tokenizer as tokenizer_lib
from lm.data import pipeline, sources
from lm.errors import ConfigError, check
from lm.training import checkpointing, logger as logger_lib, optimizer as optimizer_lib
from lm.training import setup as setup_lib, steps


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
  skipped: list  # (item, why) left out under config.data.bad_records='skip'
  counts: collections.Counter  # Of the training examples read (Objective.rows).


def _datasets(config, objective, tokenizer) -> _Data:
  source = objective.source(config.data)
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
  if not distributed.all_ok(next(iter(validation_dataset), None) is not None):
    raise ConfigError(
        f'the validation split ({len(validation_documents)} documents) does not fill one'
        f' batch of config.data.batch_size={config.data.batch_size} x'
        f' config.data.seq_len={config.data.seq_len} in each of config.data.streams='
        f'{num_streams} streams; raise config.data.validation_fraction')
  return _Data(train_documents, validation_documents, iter(make(train_documents, train=True)),
               validation_dataset, source.skipped, counts)


def _example_counts(counts) -> dict[str, float]:
  """Of the training examples every process has read so far (with what the pipeline
  holds ahead), how many were cut to seq_len and how many skipped with no target left."""
  names = ('examples', 'examples_cut', 'examples_skipped')
  totals = distributed.all_gather(np.array([counts[name] for name in names])).sum(axis=0)
  return {name: float(total) for name, total in zip(names[1:], totals[1:])} if totals[0] else {}


def _reference_params(setup, config, tokenizer, init_from_step: int):
  """A resumed run's reference: the params it started from (config.train.init_from's at
  `init_from_step`, or the fresh init's: with LoRA, the fresh adapters)."""
  if config.train.init_from and not setup.base:
    return checkpointing.load_params(config.train.init_from, init_from_step,
                                     setup.abstract_state.params, config, tokenizer)[0]
  return setup.init(jax.random.key(config.seed)).params


def _global_batch(setup, rollout, params, host_batch: dict, step: int, *,
                  train: bool) -> tuple[dict, dict]:
  """(this process's rows as global arrays, batch metrics); with a rollout (GRPO), the
  policy's completions of the batch's prompts, sampled with the key of `step`."""
  if rollout:
    return rollout(params, host_batch, step, train=train)
  return sharding.global_batch(host_batch, setup.batch_sharding), {}


def _evaluate(setup, params, reference_params, base_params, validation_dataset, rollout,
              eval_steps: int) -> dict[str, float]:
  totals, rollout_totals, num_batches = {}, {}, 0
  for index, host_batch in enumerate(itertools.islice(validation_dataset, eval_steps)):
    # Batch `index` is sampled with the same key at every evaluation.
    batch, rollout_metrics = _global_batch(setup, rollout,
                                           steps.model_params(params, base_params),
                                           host_batch, index, train=False)
    rollout_totals = {name: rollout_totals.get(name, 0.0) + value
                      for name, value in rollout_metrics.items()}
    sums = setup.eval_step(params, batch, reference_params, base_params)
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
  config = ml_collections.ConfigDict(config.to_dict())  # A private copy to resolve in.
  devices = list(jax.devices() if devices is None else devices)

  # 1. Everything that can be wrong with the inputs, before compiling or writing.
  tokenizer = resolve(config, len(devices))
  objective = objectives.OBJECTIVES[config.train.objective]
  data = _datasets(config, objective, tokenizer)
  lock = checkpointing.WorkdirLock(workdir)
  checkpointer = checkpointing.Checkpointer(workdir, config.checkpoint.max_to_keep)
  try:
    return _train(config, workdir, devices, tokenizer, objective, data, checkpointer)
  finally:
    # Pending saves finish before any error is reported: no half-written checkpoint.
    checkpointer.close()
    lock.release()


def resolve(config, num_devices: int):
  """Checks `config` (a private copy) for a run on `num_devices` and fills what it leaves
  to the run: the model of init_from ('from_init'), the dtype, the data streams. Returns
  the tokenizer. Raises ConfigError naming the field."""
  if config.model.name == 'from_init':
    tokenizer = _model_from_init(config)
  else:
    tokenizer = tokenizer_lib.build(config.tokenizer)
  config_lib.validate(config, num_devices, tokenizer.vocab_size)
  config.model.dtype = config_lib.resolve_dtype(config.model.dtype)
  config.data.streams = config.data.streams or jax.process_count()
  return tokenizer


# What a run chooses for itself when it takes its model from config.train.init_from.
_RUN_MODEL_FIELDS = ('dtype', 'attention', 'remat', 'mamba_scan')


def _model_from_init(config) -> object:
  """config.model.name 'from_init': config.model and config.tokenizer become those of the
  config.train.init_from checkpoint (an imported model's, say), keeping this config's
  dtype, attention, remat and mamba_scan. Returns the tokenizer stored with it."""
  check(config.train.init_from, 'config.model.name="from_init" needs config.train.init_from')
  _, saved, saved_tokenizer = checkpointing.read_init_from(config.train.init_from,
                                                           config.train.init_from_step)
  kept = {field: config.model[field] for field in _RUN_MODEL_FIELDS}
  config.model = saved.model
  config.model.update(kept)
  config.tokenizer = saved.tokenizer
  return tokenizer_lib.from_dict(saved_tokenizer)


def _restore_latest(checkpointer, setup, train_iterator, config, tokenizer):
  """(step, state, saved config) of the newest checkpoint that reads back whole on every
  process, or None. Unreadable ones are set aside, not deleted; a mismatch with the config
  or the number of processes is refused."""
  while (step := checkpointer.latest_step()) is not None:
    try:
      saved_config, saved_tokenizer = checkpointer.read_metadata(step)
      error = None
    except Exception as caught:  # pylint: disable=broad-except
      error = caught
    if not distributed.all_ok(error is None):
      checkpointer.set_aside(step, error)
      continue
    processes = checkpointer.processes(step)
    if processes not in (None, jax.process_count()):
      raise ConfigError(
          f'checkpoint step {step} in {checkpointer.directory} was written by {processes}'
          f' process(es) and this run has {jax.process_count()}: each process resumes its own'
          f' share of the data streams; resume with {processes} processes, or use a new'
          ' --workdir')
    for field, made_by in (('imported_from', 'experiments.convert'),
                           ('merged_from', 'experiments.merge')):
      if field in saved_config:
        raise ConfigError(
            f'{checkpointer.directory} holds a model {field.replace("_", " ")}'
            f' {saved_config[field]} ({made_by}), not a training run: start from it with'
            ' --config.train.init_from=<its workdir> and a new --workdir')
    tokenizer_lib.check_same(saved_tokenizer, tokenizer, checkpointer.directory)
    checkpointing.check_compatible(saved_config, config, checkpointer.directory)
    try:
      state = checkpointer.restore(step, setup.abstract_state, train_iterator)
      error = None
    except Exception as caught:  # pylint: disable=broad-except
      error = caught
    if not distributed.all_ok(error is None):
      checkpointer.set_aside(step, error)
      continue
    return step, state, saved_config
  return None


def _first_non_finite(pending: list) -> tuple | None:
  """The first (step, loss, grad_norm) of `pending` with a non-finite value; one transfer."""
  values = np.asarray(jax.device_get([(loss, grad_norm) for _, loss, grad_norm in pending]))
  bad = ~np.isfinite(values).all(axis=1)
  if not bad.any():
    return None
  index = int(np.argmax(bad))
  return pending[index][0], *values[index]


def _train(config, workdir, devices, tokenizer, objective, data, checkpointer):
  train_documents, validation_documents, train_iterator, validation_dataset, _, _ = data

  # 2. Shapes, shardings and the jitted steps; then restore, init_from or init onto them.
  setup = setup_lib.make_setup(config, devices)
  init_from_step = config.train.init_from_step
  # A loss without one (SimPO, ORPO) gets None: no reference is loaded, kept or run.
  needs_reference = objective.needs_reference(config.train)
  with sharding.activate(setup.mesh):
    restored = _restore_latest(checkpointer, setup, train_iterator, config, tokenizer)
    if restored is not None:
      start_step, state, saved_config = restored
      # The step init_from resolved to when the run started: the same base and reference.
      init_from_step = saved_config.train.get('init_from_step', -1)
    base_params = None
    if setup.base:  # LoRA: the frozen model the adapters train on, read at every start.
      # Quantized (QLoRA) as each layer is read: the float base is never whole in memory.
      # A float base is read in one call.
      base_params, init_from_step = checkpointing.load_params(
          config.train.init_from, init_from_step, setup.base.checkpoint_abstract, config,
          tokenizer, convert=setup.base.prepare if config.lora.base_dtype else None)
    if restored is None:
      if config.train.init_from and not setup.base:
        params, init_from_step = checkpointing.load_params(
            config.train.init_from, init_from_step, setup.abstract_state.params, config,
            tokenizer)
        state = setup.with_optimizer(params)
      else:  # From scratch, or LoRA's fresh adapters (so the reference is the base).
        state = setup.init(jax.random.key(config.seed))
      start_step = 0
      # A copy, as the train step donates the state's buffers.
      reference_params = (jax.tree.map(jnp.copy, state.params) if needs_reference
                          else None)
      if needs_reference:
        checkpointing.save_reference(workdir, reference_params)
    else:
      reference_params = None
      if needs_reference:
        reference_params = checkpointing.restore_reference(workdir,
                                                           setup.abstract_state.params)
      # Saved before it was kept, or by a run of a loss without one.
      if needs_reference and reference_params is None:
        reference_params = _reference_params(setup, config, tokenizer, init_from_step)
    rollout = objective.make_rollout(setup, tokenizer, config)
  # What every checkpoint records: the config with init_from's step resolved.
  run_config = ml_collections.ConfigDict(config.to_dict())
  run_config.train.init_from_step = init_from_step

  # 3. The loop.
  num_params = sum(math.prod(x.shape) for x in jax.tree.leaves(state.params))
  flops_per_token = flops.flops_per_token(config.model, config.data.seq_len)
  # MFU counts the trained model's forward and backward, not a reference's forward or
  # GRPO's sampling.
  tokens_per_step = (config.data.batch_size * config.data.seq_len
                     * objective.rows_per_example(config.train))
  log = logger_lib.MetricLogger(workdir, start_step, config.train.num_steps,
                                enabled=jax.process_index() == 0)
  schedule = optimizer_lib.learning_rate_schedule(config.train)
  start = (f'resuming from step {start_step}' if start_step else
           f'starting from step {init_from_step} of {config.train.init_from}'
           if config.train.init_from else 'starting from scratch')
  if base_params is not None:
    frozen = sum(math.prod(x.shape) for x in jax.tree.leaves(
        setup.base.checkpoint_abstract))
    trained = (f'{num_params:,} adapter parameters (rank {config.lora.rank}) on a frozen'
               f' base of {frozen:,}' + (f' stored in {config.lora.base_dtype}'
                                         if config.lora.base_dtype else ''))
  else:
    trained = f'{num_params:,} parameters'
  log.print(f'{objective.name}: {trained} on a {dict(setup.mesh.shape)} mesh'
            f' of {devices[0].device_kind}; {len(train_documents):,} training and'
            f' {len(validation_documents):,} validation {objective.items}; compute dtype'
            f' {config.model.dtype}; {start}')
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
  with log, _StopRequest() as stop, sharding.activate(setup.mesh):
    while step < config.train.num_steps:
      if batch is None or step % updates_per_batch == 0:
        batch, batch_metrics = _global_batch(setup, rollout,
                                             steps.model_params(state.params, base_params),
                                             next(train_iterator), step, train=True)
      state, metrics = setup.train_step(state, batch, reference_params, base_params)
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
        last_log_time, last_log_step = time.perf_counter(), step
      if step % config.train.eval_every == 0 or step == config.train.num_steps:
        check_finite()
        row.update(_evaluate(setup, state.params, reference_params, base_params,
                             validation_dataset,
                             rollout, config.train.eval_steps))
        last_log_time = time.perf_counter()  # Eval time is not training throughput.
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
        check_finite()  # A checkpoint never holds params of a non-finite step.
        checkpointer.save(step, state, train_iterator, run_config, tokenizer)
      if stop.requested and between_batches:
        log.print(f'stopped at step {step}; checkpoint saved, run the same command to resume')
        break

  checkpointer.wait()
  if step >= config.train.num_steps and config.train.sample_tokens > 0:
    room = config.model.max_seq_len - config.train.sample_tokens
    prompt = objective.sample_prompt(validation_documents, tokenizer, room)
    if prompt is None:
      log.print(f'no sample: no validation prompt is under {room} tokens')
    else:
      [sample] = sampling.complete(
          setup.model, steps.model_params(state.params, base_params), tokenizer, [prompt],
          max_new_tokens=config.train.sample_tokens,
          temperature=config.train.sample_temperature, seed=config.seed)
      log.print('sample:\n' + prompt + sample)
  log.close()
  return history, state
