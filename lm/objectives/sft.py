"""Supervised fine-tuning on {prompt, response} examples and on conversations.

Each example becomes bos + prompt + response + eos, or a conversation ({"messages":
[...]}, or a prompt and response that are lists of messages) rendered by the model's chat
template (lm/chat.py), truncated to `seq_len`, with `loss_mask` 1 on the response and eos,
or on every assistant turn and its end (the only targets); examples are packed whole
into rows, first fit, none split across two. An example left with no target (a prompt
that fills `seq_len`) is skipped, never trained on with an all-zero mask; the examples
cut and skipped are counted as they are read, and logged (examples_cut, _skipped).
"""

import grain

from lm.data import pipeline
from lm.objectives import base, pretrain


class _Tokenize(grain.transforms.Map):
  def __init__(self, tokenizer, seq_len: int, counts):
    self.tokenizer, self.seq_len, self.counts = tokenizer, seq_len, counts

  def map(self, example: dict) -> dict:
    tokens, loss_mask = _tokens(self.tokenizer, example, None)
    if self.counts is not None:
      self.counts['examples'] += 1
      self.counts['examples_cut'] += len(tokens) > self.seq_len
    return {'tokens': tokens[:self.seq_len], 'loss_mask': loss_mask[:self.seq_len]}


def _tokens(tokenizer, example: dict, seq_len: int | None):
  if 'messages' in example:
    return pipeline.prompt_and_response(tokenizer, example['messages'], None, seq_len)
  return pipeline.prompt_and_response(tokenizer, example['prompt'], example['response'],
                                      seq_len)


class SFT(base.Objective):
  name = 'sft'
  sources = base.POST_TRAINING_SOURCES + base.CHAT_SOURCES + base.ARITHMETIC_SOURCES
  reports_perplexity = True

  def build_source(self, data_config):
    return base.stdlib_or_jsonl_examples(data_config, ('prompt', 'response'), messages=True)

  def rows(self, dataset, tokenizer, seq_len: int, counts=None):
    """{'tokens', 'loss_mask'} int32 [length <= seq_len], one example each."""
    return pipeline.examples(dataset).map(_Tokenize(tokenizer, seq_len, counts)).filter(
        pipeline.HasTargets(counts))

  batch_fields = ('tokens', 'segment_ids', 'positions', 'loss_mask')

  def batches(self, rows, *, seq_len: int, batch_size: int, seed: int, train: bool):
    """{'tokens', 'segment_ids', 'positions', 'loss_mask'} int32 [batch_size, seq_len]."""
    packed = grain.experimental.FirstFitPackIterDataset(
        rows, length_struct={'tokens': seq_len, 'loss_mask': seq_len},
        num_packing_bins=batch_size, seed=seed, shuffle_bins=train)
    return pipeline.batch(packed, batch_size).map(pipeline.with_model_names)

  def settings(self, train_config) -> pretrain.TokenLoss:
    return pretrain.TokenLoss(train_config.z_loss_weight)

  def loss(self, params, batch, reference_params, *, model, settings):
    del reference_params
    return pretrain.token_loss(params, batch, model=model, settings=settings)
