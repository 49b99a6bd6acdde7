"""What an objective is: the one place that says how its data become rows, its rows a
loss, and what its settings (config.train.<name>) are. The loop, the config checks and
the data pipeline read an objective only through this interface.

A new objective is a module in lm/objectives/ with a subclass of `Objective`, and one
line in the registry (lm/objectives/__init__.py).
"""

import jax
import jax.numpy as jnp

from lm import chat
from lm.data import arithmetic, pipeline, sources
from lm.errors import ConfigError


class Objective:
  """Defaults are pretraining's where one exists; a subclass overrides what differs."""
  name: str
  # config.data.source values this objective reads.
  sources: tuple[str, ...]
  # What a loss's sums are averaged over ('num_tokens', 'num_pairs'), logged by that name.
  count_name = 'num_tokens'
  # Whether evaluation adds exp(loss), for losses that are a per-token NLL.
  reports_perplexity = False
  # What an item of its source is, for the start-up line.
  items = 'files or lines of examples'

  # Its settings, and start-up checks before anything is compiled or written.

  def model_head(self, train_config) -> str:
    """What the model ends in (config.model.head, lm/models/decoder.py): 'lm', next-token
    logits; 'score', a number per position (a reward model); 'lm_value' and
    'lm_critic', logits and a critic's values (PPO)."""
    del train_config
    return 'lm'

  def params_from(self, train_config) -> list[tuple[str, str, str]]:
    """(entry of the params, config field, workdir) for each part of a fresh run's
    params taken from another run (PPO's critic from a reward model): a reward model of
    the run's shapes and tokenizer, checked at start."""
    del train_config
    return []

  def default_config(self):
    """config.train.<name>: this objective's own settings with their defaults (an
    ml_collections.ConfigDict), or None for an objective without any."""
    return None

  def settings(self, train_config):
    """What its loss reads: its own section of `config.train`."""
    return train_config[self.name] if self.default_config() is not None else None

  def validate(self, config) -> None:
    """Raises ConfigError naming a field of this objective's settings (or one of the
    run's it cannot work with)."""

  def source(self, data_config, train_config=None):
    """The random-access source of `config.data`, checked against `sources` and, given
    `train_config`, for the fields its settings read in every example
    (`record_fields`)."""
    if data_config.source not in self.sources:
      raise ConfigError(f'config.data.source={data_config.source!r} is not one of'
                        f' {self.sources} (the sources of config.train.objective={self.name!r})')
    source = self.build_source(data_config)
    if train_config is not None and (needed := self.record_fields(train_config)):
      _check_fields(source, *needed)
    return source

  def record_fields(self, train_config) -> tuple[tuple[str, ...], str]:
    """((fields, ...), the setting that reads them): the fields every example must have
    for this run's settings (a reward's reference answer), or ()."""
    del train_config
    return ()

  def build_source(self, data_config):
    raise NotImplementedError

  def data_reader(self, train_config) -> 'Objective':
    """The objective whose source, rows and batches the run reads: itself, or, for one
    whose settings choose another's data (distillation), that one's."""
    del train_config
    return self

  # Data (lm/data/pipeline.make_dataset).

  def data_seq_len(self, config) -> int:
    """The length of the pipeline's rows."""
    return config.data.seq_len

  def rows(self, dataset, tokenizer, seq_len: int, counts=None):
    """grain MapDataset of source items -> IterDataset of rows (dicts of arrays).
    `counts` (a collections.Counter, or None) tallies the examples read ('examples'),
    those cut to seq_len ('examples_cut') and those left with no target and skipped
    ('examples_skipped'), for the run's log."""
    raise NotImplementedError

  def batches(self, rows, *, seq_len: int, batch_size: int, seed: int, train: bool):
    """IterDataset of rows -> IterDataset of batches the loss reads."""
    del seq_len, seed, train
    return pipeline.batch(rows, batch_size)

  def needs_reference(self, train_config) -> bool:
    """Whether the loss reads frozen reference params (the params the run started from);
    if not, the loop neither loads nor keeps them and the loss gets None."""
    del train_config
    return False

  def rows_per_example(self, train_config) -> int:
    """Model rows per batch element (DPO: a pair), for tokens/s and MFU."""
    del train_config
    return 1

  # The step (lm/training/steps.py).

  # The int32 [B, T] arrays of a batch the loss reads.
  batch_fields = ('tokens', 'segment_ids', 'positions')

  def batch_shapes(self, config) -> dict:
    """The train step's batch as ShapeDtypeStructs, for compiling it without data
    (lm/aot.py); equal to what `batches` (or `make_rollout`) gives."""
    shape = (config.data.batch_size, config.data.seq_len)
    return {name: jax.ShapeDtypeStruct(shape, jnp.int32) for name in self.batch_fields}

  def loss(self, params, batch, reference_params, *, model, settings):
    """(objective sum, metric sums, count): sums over the batch and what they are
    averaged over, so gradient accumulation and data parallelism divide once by the
    true count. `settings` is `self.settings(config.train)`."""
    raise NotImplementedError

  # The loop (lm/training/loop.py).

  def models_read(self, train_config) -> list[tuple[str, str, str]]:
    """(config field, workdir, model.head) of each trained model its batches read (a
    reward model, 'score'; a teacher, 'lm'): the loop checks them at start (that model
    kind, of the run's tokenizer) and restores them onto the run's mesh for
    `make_rollout`."""
    del train_config
    return []

  def make_rollout(self, setup, tokenizer, config, models=()):
    """None, or a callable (params, host batch, step, *, train, more_prompts,
    reference_params) -> (device batch, metrics) that makes each batch from the model's
    own samples (GRPO, PPO) or adds what other models say of it (a teacher's logits);
    `more_prompts()`, when training, gives the next host batch, for a rollout that
    replaces some of its prompts (GRPO's dynamic sampling), and `reference_params` are
    the reference model's (or None). `models`: (model, params) of each of `models_read`,
    restored. A rollout that samples reports 'completion_length' (tokens per row)."""
    del setup, tokenizer, config, models

  def update_batch(self, batch, step, settings):
    """The part of a batch that optimizer step `step` (traced) trains on, of the
    `updates_per_batch` steps the batch serves (PPO: a mini-batch of an epoch)."""
    del step, settings
    return batch

  def updates_per_batch(self, train_config) -> int:
    """Optimizer steps each batch serves; checkpoints fall between batches."""
    del train_config
    return 1

  def sample_prompt(self, validation_documents, tokenizer, max_length: int) -> str | None:
    """What the end-of-run sample continues: the first validation prompt that leaves
    room for the sample (None if none does)."""
    for index in range(len(validation_documents)):
      for example in validation_documents[index]:
        prompt = prompt_text(example, tokenizer)
        if 1 + len(tokenizer.encode(prompt)) <= max_length:
          return prompt
    return None


def _check_fields(source, fields: tuple[str, ...], setting: str) -> None:
  """Every example of `source` (items are lists of examples) has `fields`, or a
  ConfigError names the first item that lacks one (file:line for JSON lines)."""
  for index in range(len(source)):
    for example in source[index]:
      missing = [field for field in fields if field not in example]
      if missing:
        raise ConfigError(f'{source.keys[index]}: no field {missing[0]!r}, which {setting}'
                          f' reads in every example')


def prompt_text(example: dict, tokenizer) -> str:
  """An example's prompt as the model sees it: a string as it is; a conversation (a
  'messages' one up to its first assistant turn, or a 'prompt' of messages) rendered by
  the chat template with the assistant's turn opened (chat.prompt_text)."""
  if 'messages' in example:
    messages = example['messages']
    first = next((i for i, m in enumerate(messages) if m['role'] == 'assistant'),
                 len(messages))
    messages = messages[:first]
  elif isinstance(example['prompt'], list):
    messages = example['prompt']
  else:
    return example['prompt']
  return chat.prompt_text(tokenizer, messages)


def stdlib_or_jsonl_examples(data_config, fields: tuple[str, ...], *, pairs: bool = False,
                             keep_all: bool = False, messages: bool = False,
                             numbers: tuple[str, ...] = ()):
  """A post-training source: 'stdlib_functions', 'stdlib_chats' or 'arithmetic' (built
  in), or 'jsonl' lines with `fields` (each a string or a conversation; with `messages`,
  or a whole 'messages' conversation; `numbers`: optional numeric fields)."""
  if data_config.source == 'stdlib_functions':
    return sources.stdlib_functions(pairs=pairs)
  if data_config.source == 'stdlib_chats':
    return sources.stdlib_chats()
  if data_config.source == 'arithmetic':
    return arithmetic.Problems(pairs=pairs)
  return sources.jsonl_examples(data_config, fields, keep_all, messages, numbers)


POST_TRAINING_SOURCES = ('stdlib_functions', 'jsonl')
# Generated arithmetic word problems with worked solutions and answers (lm/data/arithmetic.py).
ARITHMETIC_SOURCES = ('arithmetic',)
# Conversations of the standard library's functions, for SFT (sources.stdlib_chats).
CHAT_SOURCES = ('stdlib_chats',)
