"""orbax checkpoints under `<workdir>/checkpoints`: everything a run needs to resume.

Each step directory holds the train state (params, optimizer state, step), the data
iterator's state and the size and CRC of each data file it counts items of, the config,
the tokenizer and a fingerprint of all of them. orbax writes
into a temporary directory and renames it when complete, so a run killed mid-write
leaves the last finished checkpoint intact; unfinished ones are removed on the next
start. A finished checkpoint that cannot be read back, or whose arrays or JSON no longer
match their fingerprint, is moved to `<workdir>/set_aside/` (`Checkpointer.set_aside`), never
deleted. DPO's and GRPO's reference params are kept in `<workdir>/reference`, so a run
resumes even after its `init_from` run has pruned that step.
"""

import contextlib
import functools
import fcntl
import hashlib
import json
import os
import shutil
import sys
from typing import NamedTuple

import flax
import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from lm import config as config_lib
from lm import distributed, lora, models, quantization, sharding
from lm import tokenizer as tokenizer_lib
from lm.errors import ConfigError, check, check_no_links, open_own

# Model fields that decide parameter shapes; the rest (dtype, attention, remat) may
# change between runs of the same checkpoint.
_SHAPE_FIELDS = ('name', 'vocab_size', 'num_layers', 'layer_pattern', 'embed_dim', 'num_heads',
                 'num_kv_heads', 'head_dim', 'mlp_dim', 'tie_embeddings', 'qkv_bias',
                 'attention_out_bias', 'qk_norm', 'mamba_expand', 'mamba_state_dim',
                 'mamba_dt_rank', 'mamba_conv_width')


@jax.jit
def fingerprint(tree) -> dict:
  """Per leaf, the wrapping uint32 sum of its bits: exact and independent of sharding
  and summation order, and changed by any one flipped bit."""
  def leaf(x):
    if x.dtype.itemsize == 1:
      bits = x.astype(jnp.uint32)
    elif x.dtype.itemsize == 2:
      bits = jax.lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32)
    else:  # 8-byte types become [..., 2] uint32.
      bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    return jnp.sum(bits, dtype=jnp.uint32)
  return {jax.tree_util.keystr(path): leaf(x)
          for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _fingerprint_json(tree) -> dict[str, int]:
  return {name: int(value) for name, value in jax.device_get(fingerprint(tree)).items()}


def _json_fingerprint(items: dict) -> dict[str, str]:
  """{'json:NAME': sha256 of the item as JSON with sorted keys}: what a flipped byte in a
  JSON item changes, where the item would still parse."""
  return {f'json:{name}': hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()
          for name, value in items.items()}


class _Snapshot:
  """An iterator's state as grain's checkpoint handler saves it (get_state -> bytes)."""

  def __init__(self, state: bytes):
    self.state = state

  def get_state(self) -> bytes:
    return self.state


def _data_key(process: int, processes: int) -> str:
  return f'json:data:{process}-of-{processes}'


def _data_fingerprints(state: bytes, gather: bool = True) -> dict[str, str]:
  """{'json:data:I-of-N': sha256 of process I's data state}: every process's, gathered
  (the fingerprint is written once), or with `gather=False` this process's alone."""
  digest = hashlib.sha256(json.dumps(json.loads(state), sort_keys=True).encode()).digest()
  if not gather:
    return {_data_key(jax.process_index(), jax.process_count()): digest.hex()}
  rows = distributed.all_gather(np.frombuffer(digest, np.uint32))
  return {_data_key(i, len(rows)): row.tobytes().hex() for i, row in enumerate(rows)}


def _verify(saved: dict, now: dict, exact: bool = False) -> None:
  """Raises ValueError if an entry of `now` differs from the saved fingerprint (`exact`:
  or the two name different arrays). JSON entries are skipped in checkpoints from before
  they were recorded; so is everything in checkpoints from before there was a fingerprint."""
  if not saved:
    return
  changed = [name for name, value in now.items()
             if saved.get(name, value if name.startswith('json:') else None) != value]
  arrays = lambda names: {name for name in names if not name.startswith('json:')}
  if changed or (exact and arrays(saved) != arrays(now)):
    raise ValueError(f'its contents do not match their fingerprint ({len(changed)} changed,'
                     f' first {changed[:1]})')


def _before_fingerprints(directory: str) -> bool:
  """Whether the checkpoint in `directory` is of the format from before fingerprints: its
  data state one JSON file (`data/metadata`), and orbax's record of its items naming none."""
  try:
    with open(os.path.join(directory, '_CHECKPOINT_METADATA'), encoding='utf-8') as f:
      if 'fingerprint' in json.load(f).get('item_handlers', {}):
        return False
  except (OSError, ValueError, AttributeError):
    pass
  return os.path.isfile(os.path.join(directory, 'data', 'metadata'))


@flax.struct.dataclass
class _ParamsOnly:
  params: dict  # Named '.params' in the fingerprint, as a TrainState's are.


class Checkpointer:

  def __init__(self, workdir: str, max_to_keep: int | None, read_only: bool = False):
    self.directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
    if read_only and not os.path.isdir(self.directory):
      raise ConfigError(f'--workdir={workdir}: no checkpoints in {self.directory}')
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            cleanup_tmp_directories=not read_only,
            create=not read_only,
            read_only=read_only,
        ),
        item_names=('state', 'data', 'sources', 'config', 'tokenizer', 'fingerprint'),
    )

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, data_iterator, files: dict, config, tokenizer):
    """Everything, from every process: orbax writes each process's shards of the arrays
    and, once, the JSON items; grain's handler writes each process's data state. `files`:
    the data source's (sources.TextFiles.files)."""
    items = dict(sources=files, config=config.to_dict(), tokenizer=tokenizer.to_dict())
    data = _Snapshot(data_iterator.get_state())  # Now, not when the write runs.
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=grain.checkpoint.CheckpointSave(data),
        **{name: ocp.args.JsonSave(value) for name, value in items.items()},
        fingerprint=ocp.args.JsonSave({**_fingerprint_json(state), **_json_fingerprint(items),
                                       **_data_fingerprints(data.state)}),
    ))

  def save_params(self, step: int, params, config, tokenizer) -> None:
    """Params alone, with the config and tokenizer (an imported model: no optimizer or
    data state); restore_params, load_params and restore_for_inference read it."""
    items = dict(config=config.to_dict(), tokenizer=tokenizer.to_dict())
    state = _ParamsOnly(params)
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        **{name: ocp.args.JsonSave(value) for name, value in items.items()},
        fingerprint=ocp.args.JsonSave({**_fingerprint_json(state), **_json_fingerprint(items)}),
    ))
    self.manager.wait_until_finished()

  def processes(self, step: int) -> int | None:
    """How many processes wrote checkpoint `step`'s data state (None: not known)."""
    try:
      names = os.listdir(os.path.join(self.directory, str(step), 'data'))
    except OSError:  # Unreadable: restoring it fails, and sets it aside.
      return None
    counts = {name.rsplit('-of-', 1)[1].split('.')[0] for name in names if '-of-' in name}
    return int(counts.pop()) if len(counts) == 1 else (1 if 'metadata' in names else None)

  def _restore_with_fingerprint(self, step: int, **items) -> tuple[dict, dict]:
    """(restored items, saved fingerprint: {} in checkpoints from before there was one).
    Raises ValueError for a checkpoint of this format without its fingerprint: deleted,
    it would let every other change pass unverified."""
    directory = os.path.join(self.directory, str(step))
    if os.path.isdir(os.path.join(directory, 'fingerprint')):
      items['fingerprint'] = ocp.args.JsonRestore()
    elif not _before_fingerprints(directory):
      raise ValueError('its fingerprint is missing')
    if not items:
      return {}, {}
    restored = dict(self.manager.restore(step, args=ocp.args.Composite(**items)))
    return restored, restored.pop('fingerprint', None) or {}

  def read_metadata(self, step: int) -> tuple[ml_collections.ConfigDict, dict]:
    """The (config, tokenizer dict) saved at `step`, without touching the arrays."""
    restored, saved = self._restore_with_fingerprint(
        step, config=ocp.args.JsonRestore(), tokenizer=ocp.args.JsonRestore())
    _verify(saved, _json_fingerprint(restored))
    config = ml_collections.ConfigDict(restored['config'])
    if config.model.name == 'transformer':  # DecoderLM's name in older checkpoints.
      config.model.name = 'decoder'
    config_lib.fill_added_model_fields(config.model)
    config_lib.fill_added_sections(config)
    return config, restored['tokenizer']

  def read_sources(self, step: int) -> dict | None:
    """The data files the run had read when it saved `step` ({path: [bytes, CRC-32]}),
    or None for a checkpoint from before they were recorded."""
    if not os.path.isdir(os.path.join(self.directory, str(step), 'sources')):
      _, saved = self._restore_with_fingerprint(step)
      if 'json:sources' in saved:
        raise ValueError('its record of the data files is missing')
      return None
    restored, saved = self._restore_with_fingerprint(step, sources=ocp.args.JsonRestore())
    _verify(saved, _json_fingerprint(restored))
    return restored['sources']

  def restore(self, step: int, abstract_state, data_iterator=None):
    """Restores the state onto the shardings of `abstract_state` (ShapeDtypeStructs) and,
    if given, rewinds `data_iterator` (a pipeline.StreamsIterator) to where this
    process's streams were at `step`."""
    items = {'state': ocp.args.StandardRestore(abstract_state)}
    legacy = os.path.join(self.directory, str(step), 'data', 'metadata')
    if data_iterator is not None and not os.path.exists(legacy):
      items['data'] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored, saved = self._restore_with_fingerprint(step, **items)
    now = _fingerprint_json(restored['state'])
    if data_iterator is not None and os.path.exists(legacy):
      # One process's single stream, as JSON, from before grain's handler wrote it.
      with open(legacy) as f:
        state = json.load(f)
      now.update(_json_fingerprint({'data': state}))
      data_iterator.set_state(json.dumps([state]).encode())
    elif data_iterator is not None:
      key = _data_key(jax.process_index(), jax.process_count())
      now[key] = _data_fingerprints(data_iterator.get_state(), gather=False)[key]
    _verify(saved, now, exact=True)
    return restored['state']

  def restore_params(self, step: int, abstract_params, convert=None):
    """Only the params saved at `step`, onto the shardings of `abstract_params`
    (ShapeDtypeStructs); the optimizer state is never read. With `convert` (a function
    of a dict of some of the top-level entries, e.g. QLoRA's quantization), each entry
    (the embedding, a layer) is read and converted before the next is read, so memory
    peaks at one entry as saved plus what was converted."""
    _, saved = self._restore_with_fingerprint(step)
    # The state's fingerprint names params leaves '.params[...]'; these are '[...]'.
    saved = {name[len('.params'):]: value for name, value in saved.items()
             if name.startswith('.params')}
    parts = [abstract_params] if convert is None else [
        {name: entry} for name, entry in abstract_params.items()]
    params = {}
    for part in parts:
      item = {'params': part}
      with ocp.PyTreeCheckpointer() as checkpointer:
        restored = checkpointer.restore(
            os.path.join(self.directory, str(step), 'state'),
            args=ocp.args.PyTreeRestore(
                item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
                partial_restore=True))['params']
      _verify(saved, _fingerprint_json(restored))
      params.update(restored if convert is None else convert(restored))
    return params

  def set_aside(self, step: int, error: Exception | None) -> None:
    """Moves checkpoint `step` to `<workdir>/set_aside/` and says so in one line. Every
    process calls this when any failed to read the step (`error`: this one's, or None)."""
    set_aside = os.path.join(os.path.dirname(self.directory), 'set_aside')
    target = os.path.join(set_aside, str(step))
    suffix = 1
    while os.path.exists(target):
      target, suffix = os.path.join(set_aside, f'{step}.{suffix}'), suffix + 1
    if jax.process_index() == 0:
      os.makedirs(set_aside, exist_ok=True)
      shutil.move(os.path.join(self.directory, str(step)), target)
      reason = ('another process could not read it' if error is None else
                f'{type(error).__name__}: ' + (str(error).strip().splitlines() or [''])[0][:200])
      print(f'checkpoint step {step} cannot be read ({reason}); moved to {target}',
            file=sys.stderr, flush=True)
    distributed.barrier(f'set_aside_{step}')
    self.manager.reload()

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.close()


class WorkdirLock:
  """Holds `<workdir>/lock` for a run's lifetime, so a second run on the same workdir is
  refused. An flock: the kernel releases it when the process dies, so a killed run
  leaves nothing stuck. With several processes, process 0 holds it for all."""

  def __init__(self, workdir: str):
    self.file, problem = None, None
    if jax.process_index() == 0:
      try:
        self.file = self._lock(workdir)
      except ConfigError as error:
        problem = error
    if not distributed.all_ok(problem is None):
      raise problem or ConfigError(f'--workdir={workdir}: process 0 could not lock it')

  @staticmethod
  def _lock(workdir: str):
    if os.path.exists(workdir) and not os.path.isdir(workdir):
      raise ConfigError(f'--workdir={workdir} is a file, not a directory')
    check_no_links('--workdir', workdir)
    try:
      os.makedirs(workdir, exist_ok=True)
      file = open_own(os.path.join(workdir, 'lock'), 'a+')
    except OSError as error:
      raise ConfigError(f'--workdir={workdir}: cannot write there ({error.strerror})') from error
    try:
      fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as error:
      file.close()
      raise ConfigError(f'--workdir={workdir} is in use by a running run; wait for it to'
                        ' end or use another workdir') from error
    return file

  def release(self):
    if self.file is not None:
      self.file.close()  # Closing releases the flock.


# Data fields and the seed that decide a resumed run's data stream: its iterator state
# means nothing for another stream.
_DATA_FIELDS = ('source', 'path', 'text_field', 'seq_len', 'batch_size', 'shuffle_window',
                'validation_fraction', 'bad_records', 'streams')


_LORA_FIELDS = ('rank', 'alpha', 'targets', 'base_dtype', 'tile_size')


def check_compatible(saved_config, config, directory: str, *, resuming: bool = True) -> None:
  """Raises, naming the fields, if the checkpoint's parameter shapes differ from the
  config's or, when `resuming` the run, if its objective does (its data state is another
  pipeline's)."""
  differences = [
      f'model.{field}: checkpoint has {saved_config.model[field]!r}, config has'
      f' {config.model[field]!r}'
      for field in _SHAPE_FIELDS if saved_config.model[field] != config.model[field]]
  saved_head, head = saved_config.model.get('head', 'lm'), config.model.get('head', 'lm')
  if resuming and saved_head != head:  # Another tree of params (PPO's config.train.ppo.critic).
    differences.append(f'model.head: checkpoint has {saved_head!r}, config has {head!r}'
                       ' (set by the objective: config.train.ppo.critic for PPO)')
  if resuming:  # The same run: the same objective, started from the same params.
    # Checkpoints from before these fields existed are pretraining runs from scratch.
    saved = {'objective': saved_config.train.get('objective', 'pretrain'),
             'init_from': saved_config.train.get('init_from', ''),
             'init_from_step': saved_config.train.get('init_from_step', -1)}
    for field, value in saved.items():
      if config.train[field] != value and not (field == 'init_from_step'
                                               and config.train[field] == -1):
        hint = (' (to start from it, give its workdir as config.train.init_from)'
                if field == 'objective' else '')
        differences.append(f'train.{field}: checkpoint has {value!r}, config has'
                           f' {config.train[field]!r}{hint}')
    differences += [
        f'data.{field}: checkpoint has {saved_config.data[field]!r}, config has'
        f' {config.data[field]!r}'
        for field in _DATA_FIELDS
        if field in saved_config.data and saved_config.data[field] != config.data[field]]
    if saved_config.get('seed', config.seed) != config.seed:
      differences.append(f'seed: checkpoint has {saved_config.seed}, config has {config.seed}')
    # The adapters' shapes and what their base is (the dropout may change).
    differences += [
        f'lora.{field}: checkpoint has {saved_config.lora[field]!r}, config has'
        f' {config.lora[field]!r}'
        for field in _LORA_FIELDS if saved_config.lora[field] != config.lora[field]
        and (lora.enabled(saved_config.lora) or lora.enabled(config.lora))]
  if differences:
    raise ConfigError(f'the checkpoint in {directory} does not match the config ('
                     + '; '.join(differences) + '): '
                     + ('use a new --workdir, or the settings it was trained with'
                        if resuming else 'use the model settings it was trained with'))


@contextlib.contextmanager
def unreadable_as_config_error(named: str, checkpointer: Checkpointer, step: int):
  """A checkpoint that another run reads (sample, evaluate, init_from) is never moved:
  one that cannot be read, or no longer matches its fingerprint, is named in one line."""
  try:
    yield
  except ConfigError:
    raise
  except Exception as error:  # pylint: disable=broad-except (tensorstore, JSON, orbax...)
    reason = (str(error).strip().splitlines() or [''])[0][:200]
    raise ConfigError(f'{named}: checkpoint {os.path.join(checkpointer.directory, str(step))}'
                      f' cannot be read ({type(error).__name__}: {reason})') from error


def save_reference(workdir: str, params) -> None:
  """The frozen reference params, once per run, in the run's own workdir."""
  path = os.path.join(os.path.abspath(workdir), 'reference')
  if not os.path.exists(path):
    with ocp.StandardCheckpointer() as checkpointer:
      checkpointer.save(path, params)


def restore_reference(workdir: str, abstract_params):
  """The run's saved reference params onto `abstract_params`' shardings, or None."""
  path = os.path.join(os.path.abspath(workdir), 'reference')
  if not os.path.isdir(path):
    return None
  with ocp.StandardCheckpointer() as checkpointer:
    return checkpointer.restore(path, abstract_params)


def read_init_from(workdir: str, step: int) -> tuple[int, ml_collections.ConfigDict, dict]:
  """(step, config, tokenizer dict) of `workdir`'s checkpoint at `step` (-1: the latest),
  for config.train.init_from; named in one line when missing or unreadable."""
  directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
  source = Checkpointer(workdir, max_to_keep=None, read_only=True) if os.path.isdir(
      directory) else None
  steps = source.manager.all_steps() if source else []
  if not steps:
    raise ConfigError(f'config.train.init_from={workdir!r}: no checkpoints in {directory}')
  step = max(steps) if step == -1 else step
  if step not in steps:
    raise ConfigError(f'config.train.init_from_step={step}: {directory} has steps'
                      f' {sorted(steps)}')
  with unreadable_as_config_error(f'config.train.init_from={workdir!r}', source, step):
    saved_config, saved_tokenizer = source.read_metadata(step)
  source.close()
  if quantization.scheme_of(saved_config):  # Steps would move floats made of its integers.
    raise ConfigError(f'config.train.init_from={workdir!r} holds a model quantized to'
                      f' {saved_config.quantization.scheme} (experiments.quantize, from'
                      f' {saved_config.quantization.source}): train from the run it was'
                      ' quantized from')
  return step, saved_config, saved_tokenizer


def load_params(workdir: str, step: int, abstract_params, config, tokenizer, convert=None):
  """(params, step) of the checkpoint at `step` (-1: the latest) in `workdir`
  (config.train.init_from), checked against this run's model and tokenizer, onto the
  shardings of `abstract_params`; with `convert`, converted one top-level entry at a time
  as they are read (Checkpointer.restore_params)."""
  step, saved_config, saved_tokenizer = read_init_from(workdir, step)
  source = Checkpointer(workdir, max_to_keep=None, read_only=True)
  directory = os.path.join(source.directory, str(step))
  tokenizer_lib.check_same(saved_tokenizer, tokenizer, directory)
  check_compatible(saved_config, config, directory, resuming=False)
  fresh = _fresh_head(saved_config, config, workdir, abstract_params)
  trunk_abstract = {name: value for name, value in abstract_params.items()
                    if name not in fresh}
  with unreadable_as_config_error(f'config.train.init_from={workdir!r}', source, step):
    if lora.enabled(saved_config.lora):
      params = _merged_params(source, step, saved_config, tokenizer, trunk_abstract)
      params = params if convert is None else convert(params)
    else:
      params = source.restore_params(step, trunk_abstract, convert)
  source.close()
  check_finite(params, f'config.train.init_from={workdir!r}', step)
  if 'critic' in fresh:  # PPO's separate critic starts as the policy's trunk.
    fresh['critic'] = {**{name: jax.tree.map(jnp.copy, params[name])
                          for name in abstract_params['critic'] if name != 'score'},
                       **fresh['critic']}
  return {**params, **(fresh if convert is None or not fresh else convert(fresh))}, step


def load_reward_model(workdir: str, flag: str, abstract_params, config, tokenizer) -> dict:
  """The params of the reward model in `workdir` (its latest step; adapters folded in),
  onto the shardings of `abstract_params` (a 'score' model of `config`'s shapes): PPO's
  critic, started from it (checked at start by `check_reward_model`)."""
  checkpointer, step, saved_config, _ = _inference_metadata(workdir, None, 'score', flag)
  with unreadable_as_config_error(f'{flag}={workdir}', checkpointer, step):
    if lora.enabled(saved_config.lora):
      params = _merged_params(checkpointer, step, saved_config, tokenizer, abstract_params)
    else:
      params = checkpointer.restore_params(step, abstract_params)
  checkpointer.close()
  check_finite(params, f'{flag}={workdir}', step)
  return params


# What each config.model.head adds to the trunk beyond a language model's params.
# (Not 'value': LoRA's targets name attention's by that name.)
_HEAD_PARAMS = {'lm': (), 'score': ('score',), 'lm_value': ('value_head',),
                'lm_critic': ('critic',)}


def check_head(saved_config, config, workdir: str) -> None:
  """A run starts from a model with its own head, or from a language model's trunk (a
  fresh head beside it); a reward model has no logits for a language model."""
  saved_head, head = saved_config.model.get('head', 'lm'), config.model.get('head', 'lm')
  check(saved_head != 'score' or head == 'score', f'config.train.init_from={workdir!r} is'
        f' a model with model.head={saved_head!r} (a reward model): config.train.objective='
        f'{config.train.objective!r} trains a model with model.head={head!r}; start from'
        ' a language model (pretrained, SFT or imported)')


def _fresh_head(saved_config, config, workdir: str, abstract_params) -> dict:
  """The entries of this run's head that the saved model lacks ('score' of a reward
  model, 'value_head' of PPO's value head, the head of PPO's 'critic'), fresh from
  config.seed (the same at every start, so a LoRA base is the same on resuming); {} if
  none."""
  check_head(saved_config, config, workdir)
  names = (set(_HEAD_PARAMS[config.model.get('head', 'lm')])
           - set(_HEAD_PARAMS[saved_config.model.get('head', 'lm')]))
  if not names:
    return {}
  model = models.build(config.model)
  # A critic (PPO's separate one) is new only in its head: its trunk is the policy's.
  part = lambda tree: {  # pylint: disable=unnecessary-lambda-assignment
      name: {'score': tree[name]['score']} if name == 'critic' else tree[name]
      for name in names}
  shardings = jax.tree.map(lambda x: x.sharding, part(abstract_params))
  init = lambda rng: part(nn.meta.unbox(  # pylint: disable=unnecessary-lambda-assignment
      models.init_variables(model, rng)['params']))
  return jax.jit(init, out_shardings=shardings)(jax.random.key(config.seed))


def _merged_params(checkpointer, step, saved_config, tokenizer, plain_abstract):
  """A LoRA run's model at `step` as plain params onto `plain_abstract`'s shardings: its
  base (its own config.train.init_from's params, quantized as it trained on them) with
  the adapters folded in."""
  stored_boxed, adapters_boxed = lora.abstract_split(models.build(saved_config.model),
                                                     saved_config.lora)
  mesh = jax.tree.leaves(plain_abstract)[0].sharding.mesh
  adapters = checkpointer.restore_params(step, _abstract(adapters_boxed, mesh))
  base, _ = load_params(saved_config.train.init_from, saved_config.train.init_from_step,
                        plain_abstract, saved_config, tokenizer)
  if saved_config.lora.base_dtype:
    base = lora.quantize_base(base, stored_boxed)
  shardings = jax.tree.map(lambda x: x.sharding, plain_abstract)
  return jax.jit(functools.partial(lora.merge, lora_config=saved_config.lora),
                 out_shardings=shardings)(base, adapters)


def _abstract(boxed, mesh) -> dict:
  return sharding.abstract_arrays(boxed, sharding.logical_to_shardings(boxed, mesh))


def abstract_params(model, mesh) -> dict:
  """The model's params as ShapeDtypeStructs with their shardings on `mesh`."""
  return _abstract(jax.eval_shape(lambda rng: models.init_variables(model, rng)['params'],
                                  jax.random.key(0)), mesh)


@jax.jit
def _finite(tree):
  return jax.tree.map(lambda x: jnp.isfinite(x).all(), tree)


def non_finite(params) -> list[str]:
  """The paths ('layer_0/mlp/wi/kernel') of the arrays of `params` holding a NaN or Inf."""
  finite = sharding.to_host(_finite(params))
  return [jax.tree_util.keystr(path, simple=True, separator='/')
          for path, ok in jax.tree_util.tree_leaves_with_path(finite) if not ok]


def check_finite(params, source: str, step: int) -> None:
  """Refuses params holding a NaN or Inf, naming `source` (the flag that named the run)
  and the step: they would sample, score, export and train on without complaint."""
  bad = non_finite(params)
  if bad:
    raise ConfigError(f'{source}: the params of step {step} are not finite (NaN or Inf),'
                      f' e.g. {bad[0]}')


_HEAD_KINDS = {'lm': 'a language model', 'score': 'a reward model',
               'lm_value': 'a language model with a value head',
               'lm_critic': 'a language model with a critic'}


class Restored(NamedTuple):
  step: int
  config: ml_collections.ConfigDict
  tokenizer: object
  model: object
  params: dict
  mesh: jax.sharding.Mesh  # Sample and score under sharding.activate(mesh).


def _inference_metadata(workdir: str, step: int | None, head: str, flag: str):
  """(checkpointer, step, config, tokenizer dict) of `workdir`'s checkpoint at `step`
  (None: the latest), refused in one line naming `flag` if there is none or its model's
  head is not `head` (None: either)."""
  directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
  if not os.path.isdir(directory):
    raise ConfigError(f'{flag}={workdir}: no checkpoints in {directory}')
  checkpointer = Checkpointer(workdir, max_to_keep=None, read_only=True)
  steps = sorted(checkpointer.manager.all_steps())
  if step is None and not steps:
    raise ConfigError(f'{flag}={workdir}: no checkpoints in {checkpointer.directory}')
  if step is not None and step not in steps:
    raise ConfigError(f'--step={step}: {checkpointer.directory} has no checkpoint for it'
                      f' (it has steps {steps})')
  step = steps[-1] if step is None else step
  with unreadable_as_config_error(f'{flag}={workdir}', checkpointer, step):
    config, tokenizer_dict = checkpointer.read_metadata(step)
  saved_head = config.model.get('head', 'lm')
  if head in (None, 'lm') and saved_head in ('lm_value', 'lm_critic'):  # PPO's: its policy.
    config.model.head = saved_head = 'lm'
  check(head in (None, saved_head), f'{flag}={workdir} holds a model with model.head='
        f'{saved_head!r} ({_HEAD_KINDS[saved_head]}); this reads one with {head!r}'
        f' ({_HEAD_KINDS.get(head)})')
  return checkpointer, step, config, tokenizer_dict


def inference_config(workdir: str, step: int | None, head: str | None,
                     flag: str = '--workdir') -> tuple[int, ml_collections.ConfigDict]:
  """(step, config) of the checkpoint restore_for_inference would read, without its
  arrays: what a command checks before it reads them."""
  checkpointer, step, config, _ = _inference_metadata(workdir, step, head, flag)
  checkpointer.close()
  return step, config


def check_reward_model(workdir: str, flag: str, tokenizer, config=None) -> None:
  """At a run's start: `workdir` (named by `flag`) holds a reward model that reads the
  run's tokens (a reward model of another tokenizer would score other ids) and, given
  `config`, has its model's shapes (to start PPO's critic)."""
  checkpointer, _, saved_config, saved = _inference_metadata(workdir, None, 'score', flag)
  checkpointer.close()
  if config is not None:
    differences = [f'model.{field}: reward model has {saved_config.model[field]!r}, policy has'
                   f' {config.model[field]!r}' for field in _SHAPE_FIELDS
                   if saved_config.model[field] != config.model[field]]
    check(not differences, f'{flag}={workdir}: the reward model does not fit the policy'
          f' ({"; ".join(differences)}): the critic starts from a reward model of the'
          ' policy\'s shapes')
  if saved != tokenizer.to_dict():
    theirs = tokenizer_lib.from_dict(saved)
    raise ConfigError(
        f'{flag}: the reward model {workdir} reads the ids of a {theirs.kind} tokenizer'
        f' of {theirs.vocab_size} ids, and this run\'s policy a different {tokenizer.kind}'
        f' tokenizer of {tokenizer.vocab_size} ids (config.tokenizer): train the reward'
        ' model from this policy\'s model, or the policy with its tokenizer')


def restore_for_inference(workdir: str, step: int | None = None, head: str = 'lm',
                          flag: str = '--workdir', mesh=None,
                          keep_quantized: bool = False,
                          kv_cache_dtype: str | None = None) -> Restored:
  """The checkpoint at `step` (default: latest), its params split over `mesh` (default: a
  mesh of every device of every process, sharding.inference_mesh) by the logical axis
  rules, with the model and tokenizer built from the config and tokenizer saved with it.
  Params that are not finite are refused, and so is a model whose config.model.head is
  not `head` (a reward model where a language model is read, or the reverse; None takes
  either), naming `flag`. A quantized run (experiments/quantize.py, config.quantization)
  comes, with `keep_quantized`, as its quantized model and params (integer weights that
  each product dequantizes: what sample and evaluate run); else dequantized, as the
  plain model's params (what an export or a merge reads). `kv_cache_dtype` replaces
  config.model.kv_cache_dtype, the decoding cache's (an inference choice)."""
  checkpointer, step, config, tokenizer_dict = _inference_metadata(workdir, step, head, flag)
  if kv_cache_dtype is not None:
    config.model.kv_cache_dtype = kv_cache_dtype
  with unreadable_as_config_error(f'{flag}={workdir}', checkpointer, step):
    model = models.build(config.model)
    mesh = mesh or sharding.inference_mesh(config.model.embed_dim)
    tokenizer = tokenizer_lib.from_dict(tokenizer_dict)
    if lora.enabled(config.lora):  # Adapters: folded into their base.
      params = _merged_params(checkpointer, step, config, tokenizer,
                              abstract_params(model, mesh))
    elif quantization.scheme_of(config):
      model, params = _quantized_params(checkpointer, step, config.quantization, model, mesh,
                                        keep_quantized)
    else:
      params = checkpointer.restore_params(step, abstract_params(model, mesh))
  checkpointer.close()
  check_finite(params, f'{flag}={workdir}', step)
  return Restored(step, config, tokenizer, model, params, mesh)


def _quantized_params(checkpointer, step, quantization_config, model, mesh, keep_quantized):
  """(model, params) of a quantized run: the quantized model and its stored params, or
  the plain model and the params dequantized, onto `mesh`."""
  quantized_model = quantization.quantize_model(model, quantization_config.scheme,
                                                quantization_config.group_size)
  params = checkpointer.restore_params(step, quantization.abstract_arrays(
      quantization.abstract_params(quantized_model), mesh))
  if keep_quantized:
    return quantized_model, params
  shardings = jax.tree.map(lambda x: x.sharding, abstract_params(model, mesh))
  return model, jax.jit(quantization.dequantize, out_shardings=shardings)(params)
