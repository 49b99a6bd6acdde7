"""grain pipelines: documents or examples -> token rows -> batches.

The shape every objective shares (`make_dataset`): the source's items, one stream's share
of them, shuffled and repeated forever with a fresh order each epoch when training; then the objective's own `rows` (tokenize, pack or pad to `seq_len`), a
shuffle window over rows, and the objective's `batches`. The building blocks the
objectives compose are here; what each objective's rows hold is in its module
(lm/objectives/).

Rows carry `segment_ids` (1, 2, ... per document; 0 = padding) and `positions` (index
within the document), which the model uses to keep documents apart. With `train=False`
the order is still fixed by the seed, so every evaluation sees the same rows.

Several processes (`Streams`): the items are split into `config.data.streams` streams,
each read, packed and batched on its own; each process runs its share of the streams and
gives their batches as its rows of the global batch. The global batches depend on the
number of streams, not of processes, so one process with the streams of two gives the
same run. Each process's streams' state is saved with each checkpoint, one file per
process (`get_state`, for grain's checkpoint handler).
"""

import json

import grain
import jax
import numpy as np

from lm import chat

# Items are read ahead by threads: grain's default, 500 items by 16 threads, reads whole
# files that a short run or an evaluation never uses (a tiny post-training run: 600 of the
# standard library's files, each parsed); 64 items keep a batch's reads ahead.
READ_OPTIONS = grain.ReadOptions(num_threads=4, prefetch_buffer_size=64)

# grain's packers name their outputs after the packed feature.
_RENAMES = {'tokens': 'tokens', 'tokens_segment_ids': 'segment_ids',
            'tokens_positions': 'positions', 'loss_mask': 'loss_mask'}


def make_dataset(documents, objective, tokenizer, *, seq_len: int, batch_size: int,
                 seed: int, train: bool, shuffle_window: int = 0, stream: int = 0,
                 num_streams: int = 1, counts=None) -> grain.IterDataset:
  """Batches of `objective`'s rows (see its `rows`) from stream `stream` of `num_streams`
  of `documents`, the source that `objective.source` built. `batch_size` is the stream's
  share of the global batch; `counts` as in Objective.rows.
  `shuffle_window` rows (pretraining: packed rows; post-training: examples) are shuffled
  together: a long document fills many consecutive rows and a file holds many examples,
  and a batch drawn from one trains badly and evaluates unrepresentatively."""
  dataset = grain.MapDataset.source(documents)[stream::num_streams]
  if train:
    dataset = dataset.seed(seed).shuffle().repeat(None)
  dataset = objective.rows(dataset, tokenizer, seq_len, counts)
  if shuffle_window > 1:
    dataset = grain.experimental.WindowShuffleIterDataset(
        dataset, window_size=shuffle_window, seed=seed)
  return objective.batches(dataset, seq_len=seq_len, batch_size=batch_size, seed=seed,
                           train=train)


def process_streams(num_streams: int) -> range:
  """The streams this process runs: an equal, contiguous share, in process order (the
  order of the processes' rows in a global batch)."""
  per_process = num_streams // jax.process_count()
  return range(jax.process_index() * per_process, (jax.process_index() + 1) * per_process)


class Streams:
  """This process's rows of each global batch: the batches of its streams (datasets from
  `make_dataset`), concatenated. Iterable again and again, like a dataset."""

  def __init__(self, datasets: list):
    self.datasets = datasets

  def __iter__(self) -> 'StreamsIterator':
    return StreamsIterator([iter(dataset) for dataset in self.datasets])


class StreamsIterator:
  """Next: one batch from each stream, concatenated. The state is bytes, as grain's
  checkpoint handler (grain.checkpoint) writes it for this process: JSON of each stream's
  iterator state."""

  def __init__(self, iterators: list):
    self.iterators = iterators

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    batches = [next(iterator) for iterator in self.iterators]
    return {name: np.concatenate([batch[name] for batch in batches]) for name in batches[0]}

  def get_state(self) -> bytes:
    return json.dumps([encode_tuples(it.get_state()) for it in self.iterators]).encode()

  def set_state(self, state: bytes) -> None:
    states = json.loads(state)
    if len(states) != len(self.iterators):
      raise ValueError(f'the state has {len(states)} streams, this process runs'
                       f' {len(self.iterators)}')
    for iterator, stream_state in zip(self.iterators, states):
      iterator.set_state(decode_tuples(stream_state))

  def start_prefetch(self) -> None:
    """grain's handler calls this after a restore; these iterators start on `next`."""


def encode_tuples(value):
  """JSON turns tuples into lists, and grain's packer compares its state with the tuple
  (-1, -1) to mean "no remainder"; a list would restore a phantom remainder and a
  different data order. Tuples are stored tagged and restored as tuples."""
  if isinstance(value, tuple):
    return {'__tuple__': [encode_tuples(v) for v in value]}
  if isinstance(value, list):
    return [encode_tuples(v) for v in value]
  if isinstance(value, dict):
    return {k: encode_tuples(v) for k, v in value.items()}
  return value


def decode_tuples(value):
  if isinstance(value, dict):
    if set(value) == {'__tuple__'}:
      return tuple(decode_tuples(v) for v in value['__tuple__'])
    return {k: decode_tuples(v) for k, v in value.items()}
  if isinstance(value, list):
    return [decode_tuples(v) for v in value]
  return value


def batch(rows: grain.IterDataset, batch_size: int) -> grain.IterDataset:
  """Stacked rows; a last, partial batch is dropped so every batch has one shape."""
  return rows.batch(batch_size, drop_remainder=True)


def with_model_names(packed: dict) -> dict:
  """A packed batch's arrays as int32 under the names the model and losses read."""
  return {name: packed[key].astype(np.int32) for key, name in _RENAMES.items()
          if key in packed}


class Examples(grain.experimental.FlatMapTransform):
  """A post-training item is a list of examples (a stdlib file holds many)."""
  max_fan_out = 1 << 16

  def flat_map(self, examples: list) -> list:
    return examples


def examples(dataset: grain.MapDataset) -> grain.IterDataset:
  """One element per example of the items' lists."""
  return grain.experimental.FlatMapIterDataset(dataset.to_iter_dataset(READ_OPTIONS),
                                              Examples())


def prompt_and_response(tokenizer, prompt, response, seq_len: int | None = None):
  """(tokens, loss_mask) of one example, cut to `seq_len` (None: whole); the mask is 1 on
  the answer's tokens, the only targets. The one rendering every objective shares:

  - strings: bos + prompt + response + eos, the mask on response and eos; prompt and
    response are encoded apart, as at sampling time;
  - conversations: `prompt` a list of {'role', 'content'} messages and `response` the
    assistant's (a list of messages, or a string: one assistant message; None: the
    conversation is all in `prompt`), rendered whole by the chat template (lm/chat.py),
    which writes bos and each turn's end once; the mask on the assistant messages of
    `response` (of `prompt` when `response` is None) and their ends of turn.
  """
  if isinstance(prompt, str):
    prompt_ids = np.asarray(tokenizer.prompt_ids(prompt), np.int32)
    response_ids = np.concatenate([tokenizer.encode(response), [tokenizer.eos_id]])
    tokens = np.concatenate([prompt_ids, response_ids]).astype(np.int32)
    loss_mask = (np.arange(len(tokens)) >= len(prompt_ids)).astype(np.int32)
  else:
    if isinstance(response, str):
      response = [{'role': 'assistant', 'content': response}]
    rendered = chat.render(tokenizer, list(prompt) + list(response or []))
    tokens, loss_mask = rendered.ids.astype(np.int32), rendered.assistant_mask.astype(np.int32)
    if response:  # Only the answer's turns are targets, not the assistant's in the prompt.
      start = len(chat.render(tokenizer, list(prompt), add_generation_prompt=True).ids)
      loss_mask[:start] = 0
  return tokens[:seq_len], loss_mask[:seq_len]


class HasTargets(grain.transforms.Filter):
  """`has_targets`, counting what it drops in counts['examples_skipped'] (see
  Objective.rows)."""

  def __init__(self, counts=None):
    self.counts = counts

  def filter(self, example: dict) -> bool:
    keep = has_targets(example)
    if not keep and self.counts is not None:
      self.counts['examples_skipped'] += 1
    return keep


def has_targets(example: dict) -> bool:
  """Every row has a response token (position 0 is bos, never one): an example whose
  prompt fills seq_len has no target left."""
  return bool(np.atleast_2d(example['loss_mask']).any(axis=-1).all())
