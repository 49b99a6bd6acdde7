"""Pretraining: next-token prediction on documents packed into rows.

Each document becomes bos + tokens + eos; documents are concatenated and split into
rows of exactly `seq_len` (a long document continues in the next row as a new segment),
every token a target.
"""

from typing import NamedTuple

import grain
import numpy as np

from lm import losses
from lm.data import arithmetic, pipeline, sources
from lm.objectives import base


class TokenLoss(NamedTuple):
  """What the token loss reads (pretraining's and SFT's)."""
  z_loss_weight: float  # config.train.z_loss_weight


def token_loss(params, batch, *, model, settings: TokenLoss):
  """Next-token cross-entropy on the weighted targets of [B, T] arrays, plus the z-loss.
  Returns (objective sum, metric sums, number of tokens)."""
  logits_btv = model.apply({'params': params}, batch['tokens'], batch['segment_ids'],
                           batch['positions'])
  targets_bt, weights_bt = losses.next_token_targets(batch)
  loss_sum, z_loss_sum, num_tokens = losses.cross_entropy(logits_btv, targets_bt, weights_bt)
  total = loss_sum + settings.z_loss_weight * z_loss_sum
  return total, {'loss': loss_sum, 'z_loss': z_loss_sum}, num_tokens


class _Tokenize(grain.transforms.Map):
  def __init__(self, tokenizer):
    self.tokenizer = tokenizer

  def map(self, text: str) -> dict:
    # As the tokenizer encodes a text (its bos where it adds one), then eos.
    tokens = np.asarray([*self.tokenizer.prompt_ids(text), self.tokenizer.eos_id])
    return {'tokens': tokens.astype(np.int32)}


class Pretrain(base.Objective):
  name = 'pretrain'
  sources = ('stdlib', 'text', 'jsonl', 'arithmetic')
  reports_perplexity = True
  items = 'documents'

  def build_source(self, data_config):
    if data_config.source == 'stdlib':
      return sources.stdlib_source()
    if data_config.source == 'arithmetic':  # The task's problems with their solutions.
      return arithmetic.Texts()
    if data_config.source == 'text':
      return sources.TextFiles(sources.expand_paths(data_config.path),
                               bad_records=data_config.bad_records)
    return sources.jsonl_texts(data_config)

  def rows(self, dataset, tokenizer, seq_len: int, counts=None):
    """{'tokens', 'segment_ids', 'positions'} int32 [seq_len]."""
    dataset = dataset.map(_Tokenize(tokenizer)).to_iter_dataset(pipeline.READ_OPTIONS)
    return grain.experimental.ConcatThenSplitIterDataset(
        dataset, length_struct={'tokens': seq_len})

  def batches(self, rows, *, seq_len: int, batch_size: int, seed: int, train: bool):
    return pipeline.batch(rows, batch_size).map(pipeline.with_model_names)

  def settings(self, train_config) -> TokenLoss:
    return TokenLoss(train_config.z_loss_weight)

  def loss(self, params, batch, reference_params, *, model, settings):
    del reference_params
    return token_loss(params, batch, model=model, settings=settings)

  def sample_prompt(self, validation_documents, tokenizer, max_length: int) -> str:
    return ''  # The model's own start.
