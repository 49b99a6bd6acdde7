"""Direct preference optimisation (Rafailov et al. 2023) and its family of losses
(config.train.dpo_loss, lm/training/losses.DPO_LOSSES) on {prompt, chosen, rejected}.

Each example becomes two rows, bos + prompt + chosen + eos and the same with rejected,
each truncated and padded to `seq_len`, with `loss_mask` on the response and eos: a
batch is [B, 2, seq_len]. An example with a response cut away entirely is skipped. The
'stdlib_functions' source rejects each function's body with its lines reversed: the
same tokens in an order that cannot run.
"""

import grain
import jax
import jax.numpy as jnp
import numpy as np

from lm.data import pipeline
from lm.errors import check, check_number
from lm.objectives import base
from lm.training import losses


class _TokenizePair(grain.transforms.Map):
  """An example -> [2, seq_len] arrays: row 0 the chosen response, row 1 the rejected."""

  def __init__(self, tokenizer, seq_len: int, counts=None):
    self.tokenizer, self.seq_len, self.counts = tokenizer, seq_len, counts

  def map(self, example: dict) -> dict:
    rows = {name: np.zeros((2, self.seq_len), np.int32)
            for name in ('tokens', 'segment_ids', 'positions', 'loss_mask')}
    cut = False
    for row, response in enumerate((example['chosen'], example['rejected'])):
      tokens, loss_mask = pipeline.prompt_and_response(self.tokenizer, example['prompt'],
                                                       response)
      cut |= len(tokens) > self.seq_len
      tokens, loss_mask = tokens[:self.seq_len], loss_mask[:self.seq_len]
      length = len(tokens)
      rows['tokens'][row, :length] = tokens
      rows['loss_mask'][row, :length] = loss_mask
      rows['segment_ids'][row, :length] = 1
      rows['positions'][row, :length] = np.arange(length)
    if self.counts is not None:
      self.counts['examples'] += 1
      self.counts['examples_cut'] += cut
    return rows


class DPO(base.Objective):
  name = 'dpo'
  sources = base.POST_TRAINING_SOURCES
  count_name = 'num_pairs'

  def needs_reference(self, train_config) -> bool:
    """SimPO and ORPO read no reference: none is loaded, kept or run."""
    return losses.DPO_LOSSES[train_config.dpo_loss].needs_reference

  def validate(self, config) -> None:
    train = config.train
    check(train.dpo_loss in losses.DPO_LOSSES,
          f'config.train.dpo_loss={train.dpo_loss!r} is not one of {sorted(losses.DPO_LOSSES)}')
    check_number('config.train.dpo_beta', train.dpo_beta, above=0)
    check_number('config.train.dpo_nll_weight', train.dpo_nll_weight, at_least=0)
    check_number('config.train.dpo_label_smoothing', train.dpo_label_smoothing, at_least=0,
                 below=0.5, why='the probability that a label is flipped')
    uses = [name for name, loss in losses.DPO_LOSSES.items() if loss.uses_label_smoothing]
    check(train.dpo_label_smoothing == 0 or train.dpo_loss in uses,
          f'config.train.dpo_label_smoothing={train.dpo_label_smoothing} is read by'
          f' config.train.dpo_loss {uses} only, not {train.dpo_loss!r}; set it to 0')
    check_number('config.train.dpo_simpo_gamma', train.dpo_simpo_gamma, at_least=0)
    check_number('config.train.dpo_orpo_lambda', train.dpo_orpo_lambda, at_least=0)

  def build_source(self, data_config):
    return base.stdlib_or_jsonl_examples(data_config, ('prompt', 'chosen', 'rejected'),
                                         pairs=True)

  def rows(self, dataset, tokenizer, seq_len: int, counts=None):
    """{'tokens', 'segment_ids', 'positions', 'loss_mask'} int32 [2, seq_len]."""
    return pipeline.examples(dataset).map(_TokenizePair(tokenizer, seq_len, counts)).filter(
        pipeline.HasTargets(counts))

  def rows_per_example(self, train_config) -> int:
    return 2

  def batch_shapes(self, config) -> dict:
    shape = (config.data.batch_size, 2, config.data.seq_len)
    return {name: jax.ShapeDtypeStruct(shape, jnp.int32)
            for name in ('tokens', 'segment_ids', 'positions', 'loss_mask')}

  def loss(self, params, batch, reference_params, *, model, train_config):
    """config.train.dpo_loss on [B, 2, T] arrays: each pair's chosen (0) and rejected (1)
    sequence, with the response marked by `loss_mask`. Runs the reference model only for
    a loss that reads it (else `reference_params` is None). Returns (loss sum, metric
    sums, number of pairs)."""
    rows = {name: value.reshape(-1, value.shape[-1]) for name, value in batch.items()}
    targets_bt, weights_bt = losses.next_token_targets(rows)

    def log_probs_b2(params):
      logits_btv = model.apply({'params': params}, rows['tokens'], rows['segment_ids'],
                               rows['positions'])
      return losses.sequence_log_probs(logits_btv, targets_bt, weights_bt).reshape(-1, 2)

    policy_b2 = log_probs_b2(params)
    reference_b2 = (jax.lax.stop_gradient(log_probs_b2(reference_params))
                    if self.needs_reference(train_config) else None)
    pairs = losses.PreferencePairs(policy_b2, reference_b2,
                                   jnp.sum(weights_bt, axis=-1).reshape(-1, 2))
    settings = losses.PreferenceSettings(
        beta=train_config.dpo_beta, label_smoothing=train_config.dpo_label_smoothing,
        simpo_gamma=train_config.dpo_simpo_gamma, orpo_lambda=train_config.dpo_orpo_lambda)
    sums = losses.dpo(pairs, loss=train_config.dpo_loss, settings=settings,
                      nll_weight=train_config.dpo_nll_weight)
    return sums['loss'], sums, jnp.asarray(policy_b2.shape[0], jnp.float32)
