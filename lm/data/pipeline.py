"""grain pipelines: documents or examples -> token rows -> batches.

The shape every objective shares (`make_dataset`): the source's items, this process's
share of them, shuffled and repeated forever with a fresh order each epoch when
training; then the objective's own `rows` (tokenize, pack or pad to `seq_len`), a
shuffle window over rows, and the objective's `batches`. The building blocks the
objectives compose are here; what each objective's rows hold is in its module
(lm/objectives/).

Rows carry `segment_ids` (1, 2, ... per document; 0 = padding) and `positions` (index
within the document), which the model uses to keep documents apart. With `train=False`
the order is still fixed by the seed, so every evaluation sees the same rows. The
training iterator's state is saved with each checkpoint.
"""

import grain
import jax
import numpy as np

# grain's packers name their outputs after the packed feature.
_RENAMES = {'tokens': 'tokens', 'tokens_segment_ids': 'segment_ids',
            'tokens_positions': 'positions', 'loss_mask': 'loss_mask'}


def make_dataset(documents, objective, tokenizer, *, seq_len: int, batch_size: int,
                 seed: int, train: bool, shuffle_window: int = 0) -> grain.IterDataset:
  """Batches of `objective`'s rows (see its `rows`) from `documents`, the source that
  `objective.source` built. `batch_size` is this process's share of the global batch.
  `shuffle_window` rows (pretraining: packed rows; post-training: examples) are shuffled
  together: a long document fills many consecutive rows and a file holds many examples,
  and a batch drawn from one trains badly and evaluates unrepresentatively."""
  dataset = grain.MapDataset.source(documents)
  dataset = dataset[jax.process_index()::jax.process_count()]
  if train:
    dataset = dataset.seed(seed).shuffle().repeat(None)
  dataset = objective.rows(dataset, tokenizer, seq_len)
  if shuffle_window > 1:
    dataset = grain.experimental.WindowShuffleIterDataset(
        dataset, window_size=shuffle_window, seed=seed)
  return objective.batches(dataset, seq_len=seq_len, batch_size=batch_size, seed=seed,
                           train=train)


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
  return grain.experimental.FlatMapIterDataset(dataset.to_iter_dataset(), Examples())


def prompt_and_response(tokenizer, prompt: str, response: str, seq_len: int):
  """(tokens, loss_mask) of bos + prompt + response + eos, cut to seq_len; the mask is 1
  on the response and eos. Prompt and response are encoded apart, as at sampling time."""
  prompt_ids = np.concatenate([[tokenizer.bos_id], tokenizer.encode(prompt)])
  response_ids = np.concatenate([tokenizer.encode(response), [tokenizer.eos_id]])
  tokens = np.concatenate([prompt_ids, response_ids])[:seq_len].astype(np.int32)
  loss_mask = (np.arange(len(tokens)) >= len(prompt_ids)).astype(np.int32)
  return tokens, loss_mask


def has_targets(example: dict) -> bool:
  """Every row has a response token (position 0 is bos, never one): an example whose
  prompt fills seq_len has no target left."""
  return bool(np.atleast_2d(example['loss_mask']).any(axis=-1).all())
