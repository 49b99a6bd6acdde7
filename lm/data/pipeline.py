"""grain pipelines: documents or examples -> tokens -> [batch, seq_len] rows.

Pretraining: each document becomes bos + tokens + eos; documents are concatenated and
split into rows of exactly `seq_len` (a long document continues in the next row as a
new segment). SFT: each example becomes bos + prompt + response + eos, truncated to
`seq_len`, with `loss_mask` 1 on the response and eos (the only targets), and examples
are packed whole into rows (first fit). DPO: each example becomes two rows, bos +
prompt + chosen + eos and the same with rejected, each truncated and padded to
`seq_len`, so a batch is [batch, 2, seq_len]. An example with a response cut away
entirely is skipped. GRPO: each example is kept whole, as JSON text for its reward, with
bos + prompt right-padded to `seq_len` (here the prompt's budget); longer prompts are
skipped. The rollout (lm/training/rollouts.py) turns a batch of prompts into rows.

Rows carry `segment_ids` (1, 2, ... per document; 0 = padding) and `positions` (index
within the document), which the model uses to keep documents apart. The training
stream is shuffled with a fixed seed, repeats forever with a fresh order each epoch,
and is sharded across processes; its iterator state is saved with each checkpoint.
"""

import json

import grain
import jax
import numpy as np

# grain's packers name their outputs after the packed feature.
_RENAMES = {'tokens': 'tokens', 'tokens_segment_ids': 'segment_ids',
            'tokens_positions': 'positions', 'loss_mask': 'loss_mask'}


class _Tokenize(grain.transforms.Map):
  def __init__(self, tokenizer):
    self.tokenizer = tokenizer

  def map(self, text: str) -> dict:
    ids = self.tokenizer.encode(text)
    tokens = np.concatenate([[self.tokenizer.bos_id], ids, [self.tokenizer.eos_id]])
    return {'tokens': tokens.astype(np.int32)}


def _prompt_and_response(tokenizer, prompt: str, response: str, seq_len: int):
  """(tokens, loss_mask) of bos + prompt + response + eos, cut to seq_len; the mask is 1
  on the response and eos. Prompt and response are encoded apart, as at sampling time."""
  prompt_ids = np.concatenate([[tokenizer.bos_id], tokenizer.encode(prompt)])
  response_ids = np.concatenate([tokenizer.encode(response), [tokenizer.eos_id]])
  tokens = np.concatenate([prompt_ids, response_ids])[:seq_len].astype(np.int32)
  loss_mask = (np.arange(len(tokens)) >= len(prompt_ids)).astype(np.int32)
  return tokens, loss_mask


class _TokenizeSft(grain.transforms.Map):
  def __init__(self, tokenizer, seq_len: int):
    self.tokenizer, self.seq_len = tokenizer, seq_len

  def map(self, example: dict) -> dict:
    tokens, loss_mask = _prompt_and_response(self.tokenizer, example['prompt'],
                                             example['response'], self.seq_len)
    return {'tokens': tokens, 'loss_mask': loss_mask}


class _TokenizePair(grain.transforms.Map):
  """A DPO example -> [2, seq_len] arrays: row 0 the chosen response, row 1 the rejected."""

  def __init__(self, tokenizer, seq_len: int):
    self.tokenizer, self.seq_len = tokenizer, seq_len

  def map(self, example: dict) -> dict:
    rows = {name: np.zeros((2, self.seq_len), np.int32)
            for name in ('tokens', 'segment_ids', 'positions', 'loss_mask')}
    for row, response in enumerate((example['chosen'], example['rejected'])):
      tokens, loss_mask = _prompt_and_response(self.tokenizer, example['prompt'], response,
                                               self.seq_len)
      length = len(tokens)
      rows['tokens'][row, :length] = tokens
      rows['loss_mask'][row, :length] = loss_mask
      rows['segment_ids'][row, :length] = 1
      rows['positions'][row, :length] = np.arange(length)
    return rows


class _TokenizePrompt(grain.transforms.Map):
  def __init__(self, tokenizer, seq_len: int):
    self.tokenizer, self.seq_len = tokenizer, seq_len

  def map(self, example: dict) -> dict:
    ids = [self.tokenizer.bos_id, *self.tokenizer.encode(example['prompt'])]
    kept = ids[:self.seq_len]  # A longer prompt is filtered out by its length.
    tokens = np.zeros(self.seq_len, np.int32)
    tokens[:len(kept)] = kept
    # As JSON text: examples' fields may differ, and a batch stacks each key into one array.
    return {'example': json.dumps(example), 'prompt_tokens': tokens,
            'prompt_length': np.int32(len(ids))}


def _prompt_fits(example: dict) -> bool:
  return example['prompt_length'] <= len(example['prompt_tokens'])


def _has_targets(example: dict) -> bool:
  """Every row has a response token (position 0 is bos, never one)."""
  return bool(np.atleast_2d(example['loss_mask']).any(axis=-1).all())


class _Examples(grain.experimental.FlatMapTransform):
  """A post-training item is a list of examples (a stdlib file holds many)."""
  max_fan_out = 1 << 16

  def flat_map(self, examples: list) -> list:
    return examples


def _to_batch(packed: dict) -> dict:
  return {name: packed[key].astype(np.int32) for key, name in _RENAMES.items()
          if key in packed}


def make_dataset(documents, tokenizer, *, seq_len: int, batch_size: int, seed: int,
                 train: bool, shuffle_window: int = 0,
                 objective: str = 'pretrain') -> grain.IterDataset:
  """Batches of {'tokens', 'segment_ids', 'positions'} and, after pretraining,
  'loss_mask': int32 [batch_size, seq_len], for DPO [batch_size, 2, seq_len]; for GRPO,
  prompts: 'example' (JSON texts), 'prompt_tokens' [batch_size, seq_len], 'prompt_length'.

  `documents` come from `sources.build(..., objective)`. `batch_size` is this process's
  share of the global batch. `shuffle_window` packed rows (pretraining) or examples
  are shuffled together: a long document fills many consecutive rows and a file holds
  many examples, and a batch drawn from one trains badly and evaluates
  unrepresentatively. With `train=False` the order is still fixed by `seed`, so every
  evaluation sees the same rows.
  """
  dataset = grain.MapDataset.source(documents)
  dataset = dataset[jax.process_index()::jax.process_count()]
  if train:
    dataset = dataset.seed(seed).shuffle().repeat(None)
  if objective == 'pretrain':
    dataset = dataset.map(_Tokenize(tokenizer)).to_iter_dataset()
    dataset = grain.experimental.ConcatThenSplitIterDataset(
        dataset, length_struct={'tokens': seq_len})
  else:
    dataset = grain.experimental.FlatMapIterDataset(dataset.to_iter_dataset(), _Examples())
    if objective == 'grpo':
      dataset = dataset.map(_TokenizePrompt(tokenizer, seq_len)).filter(_prompt_fits)
    else:
      tokenize = _TokenizeSft if objective == 'sft' else _TokenizePair
      # An example whose prompt fills seq_len has no target left: it is skipped.
      dataset = dataset.map(tokenize(tokenizer, seq_len)).filter(_has_targets)
  if shuffle_window > 1:
    dataset = grain.experimental.WindowShuffleIterDataset(
        dataset, window_size=shuffle_window, seed=seed)
  if objective == 'sft':  # Whole examples, first fit into rows: none is split across two.
    dataset = grain.experimental.FirstFitPackIterDataset(
        dataset, length_struct={'tokens': seq_len, 'loss_mask': seq_len},
        num_packing_bins=batch_size, seed=seed, shuffle_bins=train)
  # Validation keeps its last, partly padded batch out so every batch has one shape.
  dataset = dataset.batch(batch_size, drop_remainder=True)
  return dataset.map(_to_batch) if objective in ('pretrain', 'sft') else dataset
