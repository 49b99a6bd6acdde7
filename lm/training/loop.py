"""The training loop: checks, shapes, shardings, init or restore, then step/log/eval/save.

Plain Python, top to bottom. Pretraining, SFT, DPO and GRPO (config.train.objective)
all run here and differ only in their data and loss (lm/training/steps.py); GRPO's data
are the policy's own completions of prompts (lm/training/rollouts.py).
"""

import functools
import itertools
import math
import signal
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from lm import config as config_lib
from lm import models, sampling, sharding
from lm import tokenizer as tokenizer_lib
from lm.data import pipeline, sources
from lm.errors import ConfigError
from lm.training import (checkpointing, logger as logger_lib, optimizer as optimizer_lib,
                         rollouts as rollouts_lib, steps)

# Dense bf16 peak FLOP/s per device, for MFU. Unknown devices (CPU) show no MFU.
PEAK_FLOPS = {
    'H100': 989e12, 'H200': 989e12, 'A100': 312e12,
    'TPU v4': 275e12, 'TPU v5 lite': 197e12, 'TPU v5e': 197e12, 'TPU v5p': 459e12,
    'TPU v6 lite': 918e12, 'TPU v6e': 918e12,
}


def peak_flops_per_device() -> float | None:
  kind = jax.devices()[0].device_kind
  return next((flops for name, flops in PEAK_FLOPS.items() if name in kind), None)


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


def _device_batch(batch: dict, batch_sharding) -> dict:
  return {name: jax.make_array_from_process_local_data(batch_sharding, value)
          for name, value in batch.items()}


def _sample_prompt(validation_documents, objective_name: str, tokenizer,
                   max_length: int) -> str | None:
  """What the end-of-run sample continues: nothing after pretraining, else the first
  validation prompt that leaves room for the sample (None if none does)."""
  if objective_name == 'pretrain':
    return ''
  for index in range(len(validation_documents)):
    for example in validation_documents[index]:
      if 1 + len(tokenizer.encode(example['prompt'])) <= max_length:
        return example['prompt']
  return None


def train(config: ml_collections.ConfigDict, workdir: str, devices=None):
  """Trains (or resumes) the run in `workdir`; returns (logged metric rows, final state)."""
  config = ml_collections.ConfigDict(config.to_dict())  # A private copy to resolve in.
  devices = list(jax.devices() if devices is None else devices)

  # 1. Everything that can be wrong with the inputs, before compiling or writing.
  tokenizer = tokenizer_lib.build(config.tokenizer)
  config_lib.validate(config, len(devices), tokenizer.vocab_size)
  config.model.dtype = config_lib.resolve_dtype(config.model.dtype)
  objective_name = config.train.objective
  objective = steps.OBJECTIVES[objective_name]
  train_documents, validation_documents = sources.split(
      sources.build(config.data, objective_name), config.data.validation_fraction)
  local_batch_size = config.data.batch_size // jax.process_count()
  # GRPO's pipeline gives prompts, which its completions then fill to seq_len.
  data_seq_len = config.data.seq_len - (config.train.grpo.max_new_tokens
                                        if objective_name == 'grpo' else 0)
  make_data = functools.partial(pipeline.make_dataset, tokenizer=tokenizer,
                                seq_len=data_seq_len, batch_size=local_batch_size,
                                seed=config.seed, shuffle_window=config.data.shuffle_window,
                                objective=objective_name)
  train_iterator = iter(make_data(train_documents, train=True))
  validation_dataset = make_data(validation_documents, train=False)
  if next(iter(validation_dataset), None) is None:
    raise ConfigError(
        f'the validation split ({len(validation_documents)} documents) does not fill one'
        f' batch of config.data.batch_size={config.data.batch_size} x'
        f' config.data.seq_len={config.data.seq_len}; raise config.data.validation_fraction')

  checkpointer = checkpointing.Checkpointer(workdir, config.checkpoint.max_to_keep)
  start_step = checkpointer.latest_step()
  if start_step is not None:
    saved_config, saved_tokenizer = checkpointer.read_metadata(start_step)
    tokenizer_lib.check_same(saved_tokenizer, tokenizer, checkpointer.directory)
    checkpointing.check_compatible(saved_config, config, checkpointer.directory)
    # The step init_from resolved to when the run started: DPO reloads the same reference.
    config.train.init_from_step = saved_config.train.get('init_from_step', -1)

  # 2. Shapes, then shardings, then init or restore onto them.
  mesh = sharding.make_mesh(config.mesh, devices)
  model = models.build(ml_collections.FrozenConfigDict(config.model))
  optimizer = optimizer_lib.make_optimizer(config.train)
  schedule = optimizer_lib.learning_rate_schedule(config.train)
  init_boxed = steps.train_state_initializer(model, optimizer, config.data.seq_len)
  rollouts = (rollouts_lib.Rollouts(model, tokenizer, config.train.grpo, config.data.seq_len)
              if objective_name == 'grpo' else None)

  with sharding.activate(mesh):
    abstract_boxed = jax.eval_shape(init_boxed, jax.random.key(config.seed))
    state_shardings = sharding.logical_to_shardings(abstract_boxed, mesh)
    abstract_state = jax.tree.map(
        lambda value, sharding_: jax.ShapeDtypeStruct(value.shape, value.dtype,
                                                      sharding=sharding_),
        nn.meta.unbox(abstract_boxed), state_shardings)
    batch_sharding = sharding.batch_sharding(mesh)
    init = jax.jit(lambda rng: nn.meta.unbox(init_boxed(rng)), out_shardings=state_shardings)

    def initial_params():
      """The params the run starts from: config.train.init_from's, or a fresh init's."""
      if config.train.init_from:
        params, step = checkpointing.load_params(
            config.train.init_from, config.train.init_from_step, abstract_state.params,
            config, tokenizer)
        config.train.init_from_step = step  # Saved with every checkpoint's config.
        return params
      return init(jax.random.key(config.seed)).params

    # DPO's and GRPO's frozen reference (else None): the params the run started from.
    if start_step is None:
      if config.train.init_from:
        with_optimizer = jax.jit(
            lambda params: steps.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                                            opt_state=optimizer.init(params)),
            out_shardings=state_shardings, donate_argnums=0)
        state = with_optimizer(initial_params())
      else:
        state = init(jax.random.key(config.seed))
      start_step = 0
      # A copy, as the train step donates the state's buffers.
      reference_params = (jax.tree.map(jnp.copy, state.params) if objective.needs_reference
                          else None)
    else:
      state = checkpointer.restore(start_step, abstract_state, train_iterator)
      reference_params = initial_params() if objective.needs_reference else None
    reference_shardings = state_shardings.params if objective.needs_reference else None

    train_step = jax.jit(
        functools.partial(steps.train_step, model=model, optimizer=optimizer,
                          train_config=config.train),
        in_shardings=(state_shardings, batch_sharding, reference_shardings),
        out_shardings=(state_shardings, sharding.replicated(mesh)),
        donate_argnums=0)
    eval_step = jax.jit(
        functools.partial(steps.eval_step, model=model, train_config=config.train),
        in_shardings=(state_shardings.params, batch_sharding, reference_shardings),
        out_shardings=sharding.replicated(mesh))
    sampling_log_probs = jax.jit(
        functools.partial(steps.sampling_log_probs, model=model, train_config=config.train),
        in_shardings=(state_shardings.params, batch_sharding), out_shardings=batch_sharding)

  # 3. The loop.
  num_params = sum(math.prod(x.shape) for x in jax.tree.leaves(state.params))
  flops_per_token = models.FLOPS_PER_TOKEN[config.model.name](config.model, config.data.seq_len)
  peak_flops = peak_flops_per_device()
  # DPO's batch rows are pairs of sequences, GRPO's prompts with a group of completions
  # each. MFU counts the trained model's forward and backward, not the reference's
  # forward or GRPO's sampling.
  rows_per_example = {'dpo': 2, 'grpo': config.train.grpo.group_size}.get(objective_name, 1)
  tokens_per_step = config.data.batch_size * config.data.seq_len * rows_per_example
  log = logger_lib.MetricLogger(workdir, start_step, config.train.num_steps,
                                enabled=jax.process_index() == 0)
  documents = 'documents' if objective_name == 'pretrain' else 'files or lines of examples'
  start = (f'resuming from step {start_step}' if start_step else
           f'starting from step {config.train.init_from_step} of {config.train.init_from}'
           if config.train.init_from else
           'starting from scratch')
  log.print(f'{objective_name}: {num_params:,} parameters on a {dict(mesh.shape)} mesh of'
            f' {devices[0].device_kind}; {len(train_documents):,} training and'
            f' {len(validation_documents):,} validation {documents}; compute dtype'
            f' {config.model.dtype}; {start}')

  def evaluate(params) -> dict[str, float]:
    totals, rollout_totals, num_batches = {}, {}, 0
    with sharding.activate(mesh):
      for index, batch in enumerate(itertools.islice(validation_dataset,
                                                     config.train.eval_steps)):
        if rollouts:  # The same sampling keys at every evaluation.
          batch, rollout_metrics = rollouts(
              params, batch, rollouts_lib.rollout_key(config.seed, index, train=False))
          rollout_totals = {name: rollout_totals.get(name, 0.0) + value
                            for name, value in rollout_metrics.items()}
        sums = eval_step(params, _device_batch(batch, batch_sharding), reference_params)
        totals = {name: totals.get(name, 0.0) + float(value) for name, value in sums.items()}
        num_batches += 1
    count = max(totals.pop('count'), 1.0)
    row = {f'eval_{name}': value / count for name, value in totals.items()}
    # Rollout metrics are means over a batch's rows, and every batch has as many.
    row.update({f'eval_{name}': value / num_batches for name, value in rollout_totals.items()})
    if objective.loss is steps.token_loss:
      row['eval_perplexity'] = math.exp(min(row['eval_loss'], 50.0))
    return row

  # GRPO may take several optimizer steps on one rollout (PPO's clip keeps the policy
  # near the one that sampled); every other objective takes a new batch each step.
  updates_per_rollout = config.train.grpo.updates_per_rollout if rollouts else 1

  def next_batch(params, step: int) -> tuple[dict, dict]:
    batch, rollout_metrics = next(train_iterator), {}
    if rollouts:
      batch, rollout_metrics = rollouts(
          params, batch, rollouts_lib.rollout_key(config.seed, step, train=True))
    batch = _device_batch(batch, batch_sharding)
    if updates_per_rollout > 1:  # The later updates' ratios are against the sampler.
      batch['old_log_probs'] = sampling_log_probs(params, batch)
    return batch, rollout_metrics

  history = []
  step = start_step
  batch = None
  last_log_time, last_log_step = time.perf_counter(), step
  with _StopRequest() as stop, sharding.activate(mesh):
    while step < config.train.num_steps:
      if batch is None or step % updates_per_rollout == 0:
        batch, rollout_metrics = next_batch(state.params, step)
      state, metrics = train_step(state, batch, reference_params)
      step += 1
      log.advance(step)

      row = {}
      if step % config.train.log_every == 0 or step == config.train.num_steps:
        row = {name: float(value) for name, value in {**metrics, **rollout_metrics}.items()}
        if not math.isfinite(row['loss']) or not math.isfinite(row['grad_norm']):
          raise FloatingPointError(
              f'loss={row["loss"]} grad_norm={row["grad_norm"]} at step {step}; the last'
              f' good checkpoint is step {checkpointer.latest_step()} in {checkpointer.directory}')
        elapsed = time.perf_counter() - last_log_time
        tokens_per_second = (step - last_log_step) * tokens_per_step / elapsed
        row['learning_rate'] = float(schedule(step - 1))
        row['tokens_per_second'] = tokens_per_second
        if peak_flops:
          row['mfu'] = tokens_per_second * flops_per_token / (peak_flops * len(devices))
        last_log_time, last_log_step = time.perf_counter(), step
      if step % config.train.eval_every == 0 or step == config.train.num_steps:
        row.update(evaluate(state.params))
        last_log_time = time.perf_counter()  # Eval time is not training throughput.
      if row:
        log.write(step, row)
        history.append({'step': step, **row})

      # A checkpoint holds no rollout, so (but for the last) it falls between rollouts.
      between_rollouts = step % updates_per_rollout == 0
      if (between_rollouts and (step % config.checkpoint.every_steps == 0 or stop.requested)
          or step == config.train.num_steps):
        checkpointer.save(step, state, train_iterator, config, tokenizer)
      if stop.requested and between_rollouts:
        log.print(f'stopped at step {step}; checkpoint saved, run the same command to resume')
        break

  checkpointer.wait()
  checkpointer.close()
  if step >= config.train.num_steps and config.train.sample_tokens > 0:
    room = config.model.max_seq_len - config.train.sample_tokens
    prompt = _sample_prompt(validation_documents, objective_name, tokenizer, room)
    if prompt is None:
      log.print(f'no sample: no validation prompt is under {room} tokens')
    else:
      [sample] = sampling.complete(
          model, state.params, tokenizer, [prompt], max_new_tokens=config.train.sample_tokens,
          temperature=config.train.sample_temperature, seed=config.seed)
      log.print('sample:\n' + prompt + sample)
  log.close()
  return history, state
