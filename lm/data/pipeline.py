"""grain pipelines: documents -> tokens -> packed [batch, seq_len] rows.

Each document becomes bos + tokens + eos; documents are concatenated and split into
rows of exactly `seq_len` (a long document continues in the next row as a new
segment). Rows carry `segment_ids` (1, 2, ... per document; 0 = padding) and
`positions` (index within the document), which the model uses to keep documents
apart. The training stream is shuffled with a fixed seed, repeats forever with a
fresh order each epoch, and is sharded across processes; its iterator state is
saved with each checkpoint.
"""

import grain
import jax
import numpy as np

# grain's packer names its outputs after the packed feature.
_RENAMES = {'tokens': 'tokens', 'tokens_segment_ids': 'segment_ids',
            'tokens_positions': 'positions'}


class _Tokenize(grain.transforms.Map):
  def __init__(self, tokenizer):
    self.tokenizer = tokenizer

  def map(self, text: str) -> dict:
    ids = self.tokenizer.encode(text)
    tokens = np.concatenate([[self.tokenizer.bos_id], ids, [self.tokenizer.eos_id]])
    return {'tokens': tokens.astype(np.int32)}


def _to_batch(packed: dict) -> dict:
  return {name: packed[key].astype(np.int32) for key, name in _RENAMES.items()}


def make_dataset(documents, tokenizer, *, seq_len: int, batch_size: int, seed: int,
                 train: bool, shuffle_window: int = 0) -> grain.IterDataset:
  """Batches of {'tokens', 'segment_ids', 'positions'}, each int32 [batch_size, seq_len].

  `batch_size` is this process's share of the global batch. `shuffle_window` packed
  rows are shuffled together: a long document fills many consecutive rows, and a
  batch drawn from one document trains badly and evaluates unrepresentatively. With
  `train=False` the order is still fixed by `seed`, so every evaluation sees the same rows.
  """
  dataset = grain.MapDataset.source(documents)
  dataset = dataset[jax.process_index()::jax.process_count()]
  if train:
    dataset = dataset.seed(seed).shuffle().repeat(None)
  dataset = dataset.map(_Tokenize(tokenizer)).to_iter_dataset()
  dataset = grain.experimental.ConcatThenSplitIterDataset(
      dataset, length_struct={'tokens': seq_len})
  if shuffle_window > 1:
    dataset = grain.experimental.WindowShuffleIterDataset(
        dataset, window_size=shuffle_window, seed=seed)
  # Validation keeps its last, partly padded batch out so every batch has one shape.
  return dataset.batch(batch_size, drop_remainder=True).map(_to_batch)
