"""Supervised fine-tuning on {prompt, response} examples.

Each example becomes bos + prompt + response + eos, truncated to `seq_len`, with
`loss_mask` 1 on the response and eos (the only targets); examples are packed whole into
rows, first fit, none split across two. An example whose prompt fills `seq_len` has no
target left and is skipped.
"""

import grain

from lm.data import pipeline
from lm.objectives import base, pretrain


class _Tokenize(grain.transforms.Map):
  def __init__(self, tokenizer, seq_len: int):
    self.tokenizer, self.seq_len = tokenizer, seq_len

  def map(self, example: dict) -> dict:
    tokens, loss_mask = pipeline.prompt_and_response(self.tokenizer, example['prompt'],
                                                     example['response'], self.seq_len)
    return {'tokens': tokens, 'loss_mask': loss_mask}


class SFT(base.Objective):
  name = 'sft'
  sources = base.POST_TRAINING_SOURCES
  reports_perplexity = True

  def build_source(self, data_config):
    return base.stdlib_or_jsonl_examples(data_config, ('prompt', 'response'))

  def rows(self, dataset, tokenizer, seq_len: int):
    """{'tokens', 'loss_mask'} int32 [length <= seq_len], one example each."""
    return pipeline.examples(dataset).map(_Tokenize(tokenizer, seq_len)).filter(
        pipeline.has_targets)

  def batches(self, rows, *, seq_len: int, batch_size: int, seed: int, train: bool):
    """{'tokens', 'segment_ids', 'positions', 'loss_mask'} int32 [batch_size, seq_len]."""
    packed = grain.experimental.FirstFitPackIterDataset(
        rows, length_struct={'tokens': seq_len, 'loss_mask': seq_len},
        num_packing_bins=batch_size, seed=seed, shuffle_bins=train)
    return pipeline.batch(packed, batch_size).map(pipeline.with_model_names)

  def loss(self, params, batch, reference_params, *, model, train_config):
    return pretrain.token_loss(params, batch, reference_params, model=model,
                               train_config=train_config)
