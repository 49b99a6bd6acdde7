"""Functions the tests share: small configs, a generated corpus, a model and its params.

Imported after tests/conftest.py has set up JAX's environment (the CPU backend, 8 fake
devices): pytest loads conftest.py before any test module.
"""

import functools
import hashlib
import os
import random

import flax.linen as nn
import jax
import ml_collections

from experiments.configs import default
from lm import models

# Defined with the environment that conftest.py sets before jax is imported.
from conftest import FAST_CPU_COMPILE

# The repository root, where commands run (`python -m experiments.NAME`).
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WORDS = ('the cat sat on a mat while dogs ran far away from big red trees and small'
         ' blue houses near quiet rivers').split()


def cpu_subprocess_env(**extra):
  """The environment of a command a test runs: JAX on the CPU with one device (the fake 8
  would make every step slower), compiling at -O0 as here."""
  return {**os.environ, 'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': FAST_CPU_COMPILE, **extra}


def snapshot(directory) -> dict[str, str]:
  """{relative path: sha256} of every file under `directory`: what a refused run must
  leave as it was."""
  files = {}
  for parent, subdirectories, names in os.walk(directory):  # Links: where they point.
    for name in subdirectories + names:
      path = os.path.join(parent, name)
      if os.path.islink(path):
        files[os.path.relpath(path, directory)] = 'link to ' + os.readlink(path)
      elif name in names:
        with open(path, 'rb') as f:
          files[os.path.relpath(path, directory)] = hashlib.sha256(f.read()).hexdigest()
  return files


def write_corpus(directory, num_files: int = 40, seed: int = 0) -> str:
  """Small text files of random sentences; returns a glob for them."""
  rng = random.Random(seed)
  os.makedirs(directory, exist_ok=True)
  for index in range(num_files):
    sentences = [' '.join(rng.choices(WORDS, k=rng.randint(4, 12))) + '.'
                 for _ in range(rng.randint(2, 12))]
    with open(os.path.join(directory, f'doc_{index:03d}.txt'), 'w') as f:
      f.write(' '.join(sentences))
  return os.path.join(directory, '*.txt')


def small_model_config(**overrides) -> ml_collections.FrozenConfigDict:
  """The default model config (every field) at test size, float32, then `overrides`."""
  config = default.get_config().model
  config.update(vocab_size=97, num_layers=2, embed_dim=32, num_heads=4, num_kv_heads=2,
                head_dim=8, mlp_dim=48, max_seq_len=64, tie_embeddings=False, dtype='float32',
                mamba_state_dim=8, mamba_dt_rank=4)
  config.update(overrides)
  return ml_collections.FrozenConfigDict(config)


def constant_rate_train_config(**fields):
  """The default train config at a constant learning rate without weight decay, for
  tests that take steps by hand; then `fields`."""
  config = default.get_config().train
  config.update(warmup_steps=0, final_learning_rate_ratio=1.0, weight_decay=0.0)
  config.update(fields)
  return config


def init_model(config, length: int = 16, seed: int = 0):
  """The model of `config` and its unboxed params."""
  model = models.build(config)
  variables = models.init_variables(model, jax.random.key(seed), length=length)
  return model, nn.meta.unbox(variables['params'])


def jit_apply(model):
  """model.apply compiled, once per shape: eager Flax dispatches op by op, which for these
  small models on the CPU took several times as long as compiling the whole forward.
  decode=True returns (logits, variables) with the cache mutable, as apply would."""
  @functools.partial(jax.jit, static_argnames='decode')
  def apply(variables, tokens, segment_ids, positions, decode=False):
    if decode:
      return model.apply(variables, tokens, segment_ids, positions, decode=True,
                         mutable=['cache'])
    return model.apply(variables, tokens, segment_ids, positions)
  return apply


def make_tiny_config(corpus_directory):
  """The default config's tiny variant on a small generated corpus, in float32."""
  config = default.get_config('tiny')
  config.data.update(source='text', path=write_corpus(str(corpus_directory)),
                     validation_fraction=0.25)
  config.model.dtype = 'float32'
  config.train.sample_tokens = 0
  return config


def post_training_config(module, workdir, **train):
  """`module`'s tiny config, in float32, starting from the run in `workdir`."""
  config = module.get_config('tiny')
  config.data.update(validation_fraction=0.3)
  config.model.dtype = 'float32'
  config.train.update(init_from=workdir, sample_tokens=0, **train)
  return config


class OtherTokenizer:
  """A tokenizer that is not the byte tokenizer, for the checks that refuse a model of
  other ids (a reward model, a teacher)."""
  kind, vocab_size = 'sentencepiece', 290

  def to_dict(self):
    return {'kind': self.kind, 'model_proto': 'other'}


class ChoicesOneByOne:
  """choice_log_likelihoods from a fake scorer's continuation_log_likelihoods, pair by
  pair (the metrics' tests need no shared-context pass)."""

  def choice_log_likelihoods(self, records):
    return [self.continuation_log_likelihoods([(context, choice) for choice in choices])
            for context, choices in records]
