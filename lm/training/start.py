"""A run's start: its config resolved and checked, then its state restored from the
workdir, taken from config.train.init_from, or made fresh, with the params it reads
and does not train (a LoRA base, an objective's reference) beside it.

`resolve` is the one way every entry point and benchmark turns a config into the run's.
"""

import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections

from lm import config as config_lib
from lm import distributed, objectives
from lm import tokenizer as tokenizer_lib
from lm.data import sources
from lm.errors import ConfigError, check
from lm.training import checkpointing, steps


def resolve(config, num_devices: int):
  """(a checked copy of `config` for a run on `num_devices`, with what it leaves to the
  run filled in: the model of init_from ('from_init'), the dtype, the data streams; the
  tokenizer). Raises ConfigError naming the field."""
  config = ml_collections.ConfigDict(config.to_dict())
  if config.model.name == 'from_init':
    tokenizer = _model_from_init(config)
  else:
    tokenizer = tokenizer_lib.build(config.tokenizer)
  objective = objectives.get(config.train.objective)
  # Logits, or a reward model's score: the objective's choice, recorded with the run.
  config.model.head = objective.model_head(config.train)
  config_lib.validate(config, num_devices, tokenizer.vocab_size)
  objective.validate(config)
  if config.train.init_from:  # A model of the other head, refused before the workdir is touched.
    try:
      _, saved, _ = checkpointing.read_init_from(config.train.init_from,
                                                 config.train.init_from_step)
    except ConfigError:  # Gone (a resumed run reads its own) or unreadable (named at start).
      saved = None
    if saved is not None:
      checkpointing.check_head(saved, config, config.train.init_from)
  for field, path, head in objective.models_read(config.train):
    check_model_read(path, field, head, tokenizer)
  for _, field, path in objective.params_from(config.train):
    if os.path.exists(path):  # Gone: a resumed run reads its own (a new one names it).
      checkpointing.check_reward_model(path, field, tokenizer, config)
  config.model.dtype = config_lib.resolve_dtype(config.model.dtype)
  config.data.streams = config.data.streams or jax.process_count()
  return config, tokenizer


def check_model_read(workdir: str, field: str, head: str, tokenizer) -> None:
  """A model a run's batches read (`field` names it; Objective.models_read) is a run's
  checkpoint with `head` and the run's tokenizer: a model of other ids would read, or
  say, other tokens."""
  if head == 'score':
    checkpointing.check_reward_model(workdir, field, tokenizer)
    return
  # pylint: disable-next=protected-access
  checkpointer, _, _, saved = checkpointing._inference_metadata(workdir, None, head, field)
  checkpointer.close()
  if saved != tokenizer.to_dict():
    theirs = tokenizer_lib.from_dict(saved)
    raise ConfigError(
        f'{field}={workdir} reads the ids of a {theirs.kind} tokenizer of'
        f' {theirs.vocab_size} ids, and this run a different {tokenizer.kind} tokenizer of'
        f' {tokenizer.vocab_size} ids (config.tokenizer): they must share one')


# What a run chooses for itself when it takes its model from config.train.init_from.
_RUN_MODEL_FIELDS = ('dtype', 'attention', 'remat', 'mamba_scan', 'kv_cache_dtype')


def _model_from_init(config) -> object:
  """config.model.name 'from_init': config.model and config.tokenizer become those of the
  config.train.init_from checkpoint (an imported model's, say), keeping this config's
  dtype, attention, remat, mamba_scan and kv_cache_dtype. Returns the tokenizer stored
  with it."""
  check(config.train.init_from, 'config.model.name="from_init" needs config.train.init_from')
  _, saved, saved_tokenizer = checkpointing.read_init_from(config.train.init_from,
                                                           config.train.init_from_step)
  kept = {field: config.model[field] for field in _RUN_MODEL_FIELDS}
  config.model = saved.model
  config.model.update(kept)
  config.tokenizer = saved.tokenizer
  return tokenizer_lib.from_dict(saved_tokenizer)


class Start(NamedTuple):
  step: int  # 0, or the step of the checkpoint resumed.
  state: steps.TrainState
  frozen: steps.Frozen  # What the steps read and do not train.
  # The config as every checkpoint records it: init_from's step resolved.
  run_config: ml_collections.ConfigDict


def start(config, workdir: str, setup, tokenizer, checkpointer, train_iterator,
          files: dict) -> Start:
  """Restores the newest readable checkpoint of `workdir` (rewinding `train_iterator`,
  if its data `files` are those it read), else starts from config.train.init_from or from
  scratch, onto `setup`'s shardings."""
  init_from_step = config.train.init_from_step
  # A loss without one (SimPO, ORPO) gets None: no reference is loaded, kept or run.
  needs_reference = setup.objective.needs_reference(config.train)
  restored = _restore_latest(checkpointer, setup, train_iterator, files, config, tokenizer)
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
    parts = setup.objective.params_from(config.train)  # PPO's critic from a reward model.
    if config.train.init_from and not setup.base:
      params, init_from_step = checkpointing.load_params(
          config.train.init_from, init_from_step, setup.abstract_state.params, config,
          tokenizer)
    else:  # From scratch, or LoRA's fresh adapters (so the reference is the base).
      state = setup.init(jax.random.key(config.seed))
      params = state.params if parts else None
    for entry, field, source in parts:
      params[entry] = checkpointing.load_reward_model(
          source, field, setup.abstract_state.params[entry], config, tokenizer)
    if params is not None:
      state = setup.with_optimizer(params)
    start_step = 0
    # A copy, as the train step donates the state's buffers.
    reference_params = jax.tree.map(jnp.copy, state.params) if needs_reference else None
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
  run_config = ml_collections.ConfigDict(config.to_dict())
  run_config.train.init_from_step = init_from_step
  return Start(start_step, state, steps.Frozen(base=base_params, reference=reference_params),
               run_config)


def _reference_params(setup, config, tokenizer, init_from_step: int):
  """A resumed run's reference: the params it started from (config.train.init_from's at
  `init_from_step`, or the fresh init's: with LoRA, the fresh adapters)."""
  if config.train.init_from and not setup.base:
    return checkpointing.load_params(config.train.init_from, init_from_step,
                                     setup.abstract_state.params, config, tokenizer)[0]
  return setup.init(jax.random.key(config.seed)).params


def _restore_latest(checkpointer, setup, train_iterator, files, config, tokenizer):
  """(step, state, saved config) of the newest checkpoint that reads back whole, with
  finite params, on every process, or None. Others are set aside, not deleted; a mismatch
  with the config, the data files or the number of processes is refused."""
  while (step := checkpointer.latest_step()) is not None:
    metadata, error = _attempt(checkpointer.read_metadata, step)
    if error is None:
      saved_files, error = _attempt(checkpointer.read_sources, step)
    if not distributed.all_ok(error is None):
      checkpointer.set_aside(step, error)
      continue
    saved_config, saved_tokenizer = metadata
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
    if saved_files is not None:  # Recorded since checkpoints of this format.
      sources.check_same_files(saved_files, files, step, checkpointer.directory)
    state, error = _attempt(checkpointer.restore, step, setup.abstract_state, train_iterator)
    if error is None and (bad := checkpointing.non_finite(state.params)):
      # Poisoned (written before saves were checked): resuming from it fails forever.
      error = ValueError(f'its params are not finite (NaN or Inf), e.g. {bad[0]}')
    if not distributed.all_ok(error is None):
      checkpointer.set_aside(step, error)
      continue
    return step, state, saved_config
  return None


def _attempt(read, *args):
  """(read(*args), None), or (None, the exception): whether a checkpoint reads back is
  agreed by every process before any acts on it."""
  try:
    return read(*args), None
  except Exception as caught:  # pylint: disable=broad-except
    return None, caught
