"""Distillation: a student trained on a teacher's next-token distributions (Hinton et al.
2015), with the divergences of GKD (Agarwal et al. 2024) and its on-policy batches.

The teacher (config.train.distill.teacher) is an `lm` run, trained here or imported from
Hugging Face (experiments/convert.py), of the student's tokenizer. It is restored onto
the run's mesh and, for each batch, run forward under the same sharding (in the step's
micro-batches); nothing of it is trained or saved. At each target position the loss
compares the two distributions over the next token at `temperature`:

  forward_kl   KL(teacher || student): the student covers all the teacher's mass;
  reverse_kl   KL(student || teacher): the student seeks the teacher's modes;
  jsd          GKD's generalized Jensen-Shannon divergence with weight beta,
               beta KL(T || M) + (1 - beta) KL(S || M), M = beta T + (1 - beta) S;

summed over the batch's targets, plus `token_loss_weight` times the ordinary next-token
cross-entropy on the data (reported apart as token_loss, the student's own NLL). With
`top_k` > 0 only the teacher's k likeliest ids are kept (a big vocabulary's [B, T, V]
logits may not fit) and both distributions are renormalised over them.

With `teacher_logits`, the teacher's logits of every batch of the run were written to a
directory once (experiments/distill_logits.py, as MaxText precomputes its teacher's top
k) and are read back instead: each batch's tokens are checked against those saved with
it, so a run whose data or seed differ is refused.

`data` says what the student reads: 'text', documents packed as pretraining packs them
(every token a target); 'examples', prompts and responses (one per row, the response
the only target), where `on_policy_fraction` of the training batches (GKD's lambda) are
instead the student's own completions of the prompts, sampled as GRPO samples, scored by
the teacher.
"""

import functools
import json
import math
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lm import chat, losses, sharding
from lm.data import pipeline
from lm.errors import ConfigError, check, check_number
from lm.objectives import base, grpo, pretrain

DIVERGENCES = ('forward_kl', 'reverse_kl', 'jsd')
DATA = ('text', 'examples')
# The teacher's logit of an id past the tokenizer's (a model's padding rows), and the
# student's there: finite, so that 0 * (log p - log q) stays 0 and its gradient too.
_NO_ID = -1e9


class Settings(NamedTuple):
  """config.train.distill, with its defaults (`default_config`)."""
  teacher: str = ''  # The teacher run's workdir (required).
  divergence: str = 'forward_kl'  # One of DIVERGENCES.
  beta: float = 0.5  # jsd's interpolation weight, in (0, 1).
  temperature: float = 1.0  # Of both distributions.
  token_loss_weight: float = 0.0  # Of the next-token cross-entropy on the data.
  top_k: int = 0  # 0: the teacher's whole distribution; k: its k likeliest ids.
  data: str = 'text'  # One of DATA.
  on_policy_fraction: float = 0.0  # GKD's lambda; with data='examples'.
  max_new_tokens: int = 64  # Of an on-policy completion; prompts get the rest of seq_len.
  sampling_temperature: float = 1.0  # Of the student's on-policy samples.
  # A directory of the teacher's logits of this run's batches, written once by
  # experiments.distill_logits and read instead of running the teacher ('': run it).
  teacher_logits: str = ''


def default_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(Settings()._asdict())


def kl(p_log, q_log):
  """KL(p || q) over the last axis, of log-probabilities."""
  return jnp.sum(jnp.exp(p_log) * (p_log - q_log), axis=-1)


def divergence(student_log_probs, teacher_log_probs, kind: str, beta: float = 0.5):
  """The divergence `kind` (DIVERGENCES) of the student's distribution from the
  teacher's, per position, from log-probabilities over the last axis."""
  if kind == 'forward_kl':
    return kl(teacher_log_probs, student_log_probs)
  if kind == 'reverse_kl':
    return kl(student_log_probs, teacher_log_probs)
  mixture = jnp.logaddexp(teacher_log_probs + math.log(beta),
                          student_log_probs + math.log1p(-beta))
  return (beta * kl(teacher_log_probs, mixture)
          + (1 - beta) * kl(student_log_probs, mixture))


def distill_loss(params, batch, reference_params, *, model, settings: Settings):
  """The divergence (and the weighted token loss) on a batch with the teacher's logits:
  'teacher_logits' [B, T, V], or its top k, 'teacher_top_logits' and 'teacher_top_ids'
  [B, T, k]. Returns (loss sum, metric sums, number of targets)."""
  del reference_params
  logits_btv = model.apply({'params': params}, batch['tokens'], batch['segment_ids'],
                           batch['positions']).astype(jnp.float32)
  targets_bt, weights_bt = losses.next_token_targets(batch)
  if 'teacher_top_ids' in batch:
    student = jnp.take_along_axis(logits_btv, batch['teacher_top_ids'], axis=-1)
    teacher = batch['teacher_top_logits']
  else:
    teacher = batch['teacher_logits']
    student = jnp.where(teacher > _NO_ID / 2, logits_btv, _NO_ID)
  temperature = settings.temperature
  divergence_bt = divergence(jax.nn.log_softmax(student / temperature),
                             jax.nn.log_softmax(teacher / temperature),
                             settings.divergence, settings.beta)
  divergence_sum = jnp.sum(divergence_bt * weights_bt)
  token_loss_sum, _, count = losses.cross_entropy(logits_btv, targets_bt, weights_bt)
  total = divergence_sum + settings.token_loss_weight * token_loss_sum
  return total, {'loss': total, 'divergence': divergence_sum,
                 'token_loss': token_loss_sum}, count


def teacher_outputs(teacher_params, batch, *, teacher_model, vocab_size: int,
                    width: int, top_k: int, num_microbatches: int) -> dict:
  """The teacher's logits of a batch's rows, over the tokenizer's `vocab_size` ids: the
  top `top_k` of them ('teacher_top_logits', 'teacher_top_ids'), or all, `width` wide
  (the student's vocabulary; its padding ids at _NO_ID), in micro-batches."""
  def forward(rows):
    logits_btv = teacher_model.apply(
        {'params': teacher_params}, rows['tokens'], rows['segment_ids'],
        rows['positions']).astype(jnp.float32)[..., :vocab_size]
    if top_k:
      values, ids = jax.lax.top_k(logits_btv, top_k)
      return {'teacher_top_logits': values, 'teacher_top_ids': ids.astype(jnp.int32)}
    padding = [(0, 0), (0, 0), (0, width - vocab_size)]
    return {'teacher_logits': jnp.pad(logits_btv, padding, constant_values=_NO_ID)}
  rows = {name: batch[name] for name in ('tokens', 'segment_ids', 'positions')}
  outputs = jax.lax.map(forward, losses.microbatches(rows, num_microbatches))
  return jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:]), outputs)


def on_policy(seed: int, step: int, fraction: float) -> bool:
  """Whether training batch `step` is the student's own samples: fixed by the seed, so a
  resumed run makes the batches the uninterrupted one would have."""
  return fraction > 0 and np.random.default_rng([seed, step]).random() < fraction


TEACHER_ARRAYS = ('teacher_logits', 'teacher_top_logits', 'teacher_top_ids')
_LOGITS_META = 'teacher_logits.json'


def logits_path(directory: str, step: int, *, train: bool) -> str:
  """Where experiments.distill_logits writes the teacher's logits of a training step's
  batch, or of an evaluation's batch `step`."""
  return os.path.join(directory, 'train' if train else 'eval', f'{step:08d}.npz')


def logits_meta(directory: str, field: str) -> dict:
  """What experiments.distill_logits wrote the directory for (written last, so a
  directory without it is unfinished), or a ConfigError naming `field`."""
  path = os.path.join(directory, _LOGITS_META)
  try:
    with open(path, encoding='utf-8') as f:
      return json.load(f)
  except FileNotFoundError:
    raise ConfigError(f'{field}={directory}: no {_LOGITS_META} (write it with'
                      ' python -m experiments.distill_logits, which writes it last)') from None
  except (OSError, ValueError) as error:
    raise ConfigError(f'{field}={directory}: {path} is unreadable ({error})') from None


def write_logits_meta(directory: str, meta: dict) -> None:
  with open(os.path.join(directory, _LOGITS_META), 'w', encoding='utf-8') as f:
    json.dump(meta, f, indent=1)


def logits_meta_for(config) -> dict:
  """What a run's saved teacher logits must have been written for: the same batches
  (data, seed, micro-batches) and the same top k, for at least its steps."""
  return {'data': {k: v for k, v in config.data.to_dict().items() if k != 'streams'},
          'seed': config.seed, 'top_k': config.train.distill.top_k,
          'num_steps': config.train.num_steps, 'eval_steps': config.train.eval_steps,
          'data_kind': config.train.distill.data}


def _check_logits_meta(config) -> None:
  field = 'config.train.distill.teacher_logits'
  directory = config.train.distill.teacher_logits
  saved, wanted = logits_meta(directory, field), logits_meta_for(config)
  for name in ('data', 'seed', 'top_k', 'data_kind'):
    check(saved[name] == wanted[name], f'{field}={directory} was written for {name}='
          f'{saved[name]!r}, and this run has {wanted[name]!r}: the saved logits are of'
          ' other batches; write them again for this config')
  for name in ('num_steps', 'eval_steps'):
    check(saved[name] >= wanted[name], f'{field}={directory} holds {saved[name]} batches'
          f' for {name}, fewer than config.train.{name}={wanted[name]}')


class _Rollouts:
  """Host rows -> the device batch with the teacher's logits of it; with data='examples',
  rows of each prompt and its response, or (on-policy batches) the student's completion."""

  def __init__(self, setup, tokenizer, config, teacher):
    settings = config.train.distill
    teacher_model, self.teacher_params = teacher or (None, None)
    self.settings, self.tokenizer, self.seed = settings, tokenizer, config.seed
    self.seq_len, self.model = config.data.seq_len, setup.model
    self.batch_sharding = setup.batch_sharding
    self.stop_ids = chat.end_of_turn_ids(tokenizer)
    if settings.teacher_logits:  # Read from disk: no teacher is run.
      self.teacher = None
      return
    self.teacher = jax.jit(
        functools.partial(teacher_outputs, teacher_model=teacher_model,
                          vocab_size=min(tokenizer.vocab_size, config.model.vocab_size),
                          width=config.model.vocab_size, top_k=settings.top_k,
                          num_microbatches=config.train.grad_accumulation_steps),
        out_shardings=setup.batch_sharding)

  def __call__(self, params, host_batch: dict, step: int, *, train: bool, more_prompts=None,
               reference_params=None):
    del more_prompts, reference_params
    metrics = {}
    if self.settings.data == 'examples':
      if train and on_policy(self.seed, step, self.settings.on_policy_fraction):
        host_batch, completions = grpo.complete_prompts(
            self.model, params, host_batch['prompt_tokens'], host_batch['prompt_length'],
            grpo.rollout_key(self.seed, step, train=True), self.stop_ids,
            max_new_tokens=self.settings.max_new_tokens, seq_len=self.seq_len,
            temperature=self.settings.sampling_temperature, pad_id=self.tokenizer.pad_id,
            batch_sharding=self.batch_sharding)
        metrics['completion_length'] = float(np.mean([len(c) for c in completions]))
      else:
        host_batch = self.example_rows(host_batch)
      metrics['on_policy'] = float('completion_length' in metrics)
    if self.teacher is None:
      return self.saved(host_batch, step, train), metrics
    batch = sharding.global_batch(host_batch, self.batch_sharding)
    return {**batch, **self.teacher(self.teacher_params, batch)}, metrics

  def saved(self, host_batch: dict, step: int, train: bool) -> dict:
    """The batch with the teacher's logits saved for it, this process's rows of them."""
    path = logits_path(self.settings.teacher_logits, step, train=train)
    try:
      with np.load(path) as saved:
        saved = dict(saved)
    except OSError as error:
      raise ConfigError(f'config.train.distill.teacher_logits: {path} is unreadable'
                        f' ({error})') from None
    rows = len(host_batch['tokens'])
    mine = slice(jax.process_index() * rows, (jax.process_index() + 1) * rows)
    check(np.array_equal(saved['tokens'][mine], host_batch['tokens']),
          f'config.train.distill.teacher_logits: {path} was written for other tokens than'
          f' this run\'s {"training step" if train else "evaluation batch"} {step} (another'
          ' config.data.streams or process count?): write them again for this run')
    arrays = {name: saved[name][mine] for name in TEACHER_ARRAYS if name in saved}
    return sharding.global_batch({**host_batch, **arrays}, self.batch_sharding)

  def example_rows(self, prompts: dict) -> dict:
    """Each example's prompt and response, as SFT renders them, one to a row."""
    rows = {name: np.zeros((len(prompts['example']), self.seq_len), np.int32)
            for name in ('tokens', 'segment_ids', 'positions', 'loss_mask')}
    for row, text in enumerate(prompts['example']):
      example = json.loads(str(text))
      tokens, loss_mask = pipeline.prompt_and_response(
          self.tokenizer, example['prompt'], example['response'], self.seq_len)
      rows['tokens'][row, :len(tokens)], rows['loss_mask'][row, :len(tokens)] = (tokens,
                                                                                 loss_mask)
      rows['segment_ids'][row, :len(tokens)] = 1
      rows['positions'][row, :len(tokens)] = np.arange(len(tokens))
    return rows


class _Text(pretrain.Pretrain):
  """data='text': pretraining's documents and rows."""
  name = 'distill'


class _Examples(base.Objective):
  """data='examples': GRPO's prompt rows, each with its example (and response) as JSON."""
  name = 'distill'
  sources = base.POST_TRAINING_SOURCES + base.ARITHMETIC_SOURCES

  def build_source(self, data_config):
    return base.stdlib_or_jsonl_examples(data_config, ('prompt', 'response'), keep_all=True)

  def data_seq_len(self, config) -> int:
    return config.data.seq_len - config.train.distill.max_new_tokens  # On-policy room.

  def rows(self, dataset, tokenizer, seq_len: int, counts=None):
    return pipeline.examples(dataset).map(grpo.TokenizePrompt(tokenizer, seq_len)).filter(
        grpo.prompt_fits)


class Distill(base.Objective):
  name = 'distill'
  sources = tuple(dict.fromkeys(_Text.sources + _Examples.sources))
  items = 'documents or examples'

  def default_config(self):
    return default_config()

  def settings(self, train_config) -> Settings:
    return Settings(**train_config.distill.to_dict())

  def validate(self, config) -> None:
    distill, name = config.train.distill, 'config.train.distill.'
    check(distill.teacher or distill.teacher_logits, f"{name}teacher is empty: give the"
          " teacher run's workdir (an lm run, or a Hugging Face model imported with"
          f' experiments.convert --from_hf), or {name}teacher_logits')
    for field, allowed in (('divergence', DIVERGENCES), ('data', DATA)):
      check(distill[field] in allowed,
            f'{name}{field}={distill[field]!r} is not one of {list(allowed)}')
    if distill.divergence == 'jsd':
      check_number(name + 'beta', distill.beta, above=0, below=1,
                   why='0 and 1 are forward_kl and reverse_kl')
    check_number(name + 'temperature', distill.temperature, above=0)
    check_number(name + 'token_loss_weight', distill.token_loss_weight, at_least=0)
    check_number(name + 'top_k', distill.top_k, at_least=0,
                 at_most=config.model.vocab_size, why='config.model.vocab_size')
    check_number(name + 'on_policy_fraction', distill.on_policy_fraction, at_least=0,
                 at_most=1)
    check(distill.on_policy_fraction == 0 or distill.data == 'examples',
          f'{name}on_policy_fraction={distill.on_policy_fraction} needs {name}data='
          "'examples': the student completes their prompts")
    if distill.data == 'examples':
      check_number(name + 'max_new_tokens', distill.max_new_tokens, at_least=1,
                   below=config.data.seq_len, why='config.data.seq_len: prompts get the rest')
      check_number(name + 'sampling_temperature', distill.sampling_temperature, above=0)
    if distill.teacher_logits:
      check(distill.on_policy_fraction == 0, f'{name}teacher_logits holds the teacher\'s'
            ' logits of the data; on-policy batches (on_policy_fraction > 0) need the'
            f' teacher run: give {name}teacher instead')
      _check_logits_meta(config)

  def data_reader(self, train_config) -> base.Objective:
    return _Examples() if train_config.distill.data == 'examples' else _Text()

  def batch_shapes(self, config) -> dict:
    shape, distill = (config.data.batch_size, config.data.seq_len), config.train.distill
    names = ('tokens', 'segment_ids', 'positions') + (
        ('loss_mask',) if distill.data == 'examples' else ())
    shapes = {name: jax.ShapeDtypeStruct(shape, jnp.int32) for name in names}
    if distill.top_k:
      shapes['teacher_top_logits'] = jax.ShapeDtypeStruct((*shape, distill.top_k),
                                                          jnp.float32)
      shapes['teacher_top_ids'] = jax.ShapeDtypeStruct((*shape, distill.top_k), jnp.int32)
    else:
      shapes['teacher_logits'] = jax.ShapeDtypeStruct((*shape, config.model.vocab_size),
                                                      jnp.float32)
    return shapes

  def models_read(self, train_config) -> list[tuple[str, str, str]]:
    if train_config.distill.teacher_logits:
      return []
    return [('config.train.distill.teacher', train_config.distill.teacher, 'lm')]

  def make_rollout(self, setup, tokenizer, config, models=()):
    return _Rollouts(setup, tokenizer, config, models[0] if models else None)

  def loss(self, params, batch, reference_params, *, model, settings):
    return distill_loss(params, batch, reference_params, model=model, settings=settings)
