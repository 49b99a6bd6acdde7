"""SFT and DPO: their data, their losses against direct computations, and runs that start
from another run's checkpoint."""

import functools
import textwrap

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from experiments.configs import dpo as dpo_config, sft as sft_config
from lm import models, objectives, tokenizer as tokenizer_lib
from lm.data import pipeline, sources
from lm.errors import ConfigError
from lm import losses
from lm.training import checkpointing, loop, optimizer as optimizer_lib, steps

from helpers import (WORDS, constant_rate_train_config, init_model, jit_apply,
                     make_tiny_config, post_training_config, small_model_config)

TOKENIZER = tokenizer_lib.ByteTokenizer()
SFT_EXAMPLES = [[{'prompt': f'question {i}?', 'response': ' answer' * (i % 4 + 1)}]
                for i in range(30)]
DPO_EXAMPLES = [[{'prompt': f'q{i}:', 'chosen': ' yes' * (i % 3 + 1), 'rejected': ' no'}]
                for i in range(30)]


def batches(examples, objective, *, seq_len=32, batch_size=2, train=False, shuffle_window=0):
  return pipeline.make_dataset(examples, objectives.OBJECTIVES[objective], TOKENIZER,
                               seq_len=seq_len, batch_size=batch_size, seed=0, train=train,
                               shuffle_window=shuffle_window)


def test_function_examples_split_signature_docstring_and_body():
  source = textwrap.dedent('''\
      class Box:
          def get(self, key):
              """Returns the item.

              More text that the prompt leaves out.
              """
              value = self.items[key]

              return value

          def only_docstring(self):
              """Nothing else."""

      def undocumented():
          return 1

      async def fetch(url,
                      timeout=3):
          """Fetch url."""
          return await get(url, timeout)
      ''')
  examples = sources.function_examples(source, pairs=False)
  assert examples == [
      {'prompt': 'def get(self, key):\n    """Returns the item."""\n',
       'response': '    value = self.items[key]\n\n    return value\n'},
      {'prompt': 'async def fetch(url,\n                timeout=3):\n    """Fetch url."""\n',
       'response': '    return await get(url, timeout)\n'},
  ]
  pairs = sources.function_examples(source, pairs=True)
  assert pairs == [  # fetch's one-line body cannot be reversed into anything else.
      {'prompt': examples[0]['prompt'], 'chosen': examples[0]['response'],
       'rejected': '    return value\n\n    value = self.items[key]\n'}]
  assert sources.function_examples('def broken(:\n', pairs=False) == []


def test_sft_rows_pack_whole_examples_and_mask_all_but_the_response():
  seen = []
  for batch in batches(SFT_EXAMPLES, 'sft', seq_len=48):  # The longest example is 42.
    for tokens, segment_ids, positions, loss_mask in zip(
        batch['tokens'], batch['segment_ids'], batch['positions'], batch['loss_mask']):
      assert (tokens[segment_ids == 0] == 0).all() and (loss_mask[segment_ids == 0] == 0).all()
      for segment in np.unique(segment_ids[segment_ids > 0]):
        where = segment_ids == segment
        np.testing.assert_array_equal(positions[where], np.arange(where.sum()))
        text = TOKENIZER.decode(tokens[where][loss_mask[where] == 0])
        response = TOKENIZER.decode(tokens[where][loss_mask[where] == 1])
        assert tokens[where][0] == TOKENIZER.bos_id and tokens[where][-1] == TOKENIZER.eos_id
        seen.append((text, response))
  want = {(e['prompt'], e['response']) for [e] in SFT_EXAMPLES}
  assert set(seen) <= want and len(seen) == len(set(seen)) >= 20  # Whole, none twice.


def test_sft_targets_are_the_response_and_eos_only():
  batch = {'tokens': jnp.array([[1, 10, 11, 20, 21, 2, 1, 12, 22, 2, 0]]),
           'segment_ids': jnp.array([[1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 0]]),
           'loss_mask': jnp.array([[0, 0, 0, 1, 1, 1, 0, 0, 1, 1, 0]])}
  targets, weights = losses.next_token_targets(batch)
  np.testing.assert_array_equal(weights[0], [0, 0, 1, 1, 1, 0, 0, 1, 1, 0, 0])
  np.testing.assert_array_equal(targets[0][weights[0] == 1], [20, 21, 2, 22, 2])


def test_dpo_rows_hold_the_chosen_then_the_rejected_response():
  batch = next(iter(batches(DPO_EXAMPLES, 'dpo', batch_size=3)))
  assert {name: value.shape for name, value in batch.items()} == {
      name: (3, 2, 32) for name in ('tokens', 'segment_ids', 'positions', 'loss_mask')}
  for index in range(3):
    [example] = DPO_EXAMPLES[index]
    for row, response in enumerate((example['chosen'], example['rejected'])):
      tokens, loss_mask = batch['tokens'][index, row], batch['loss_mask'][index, row]
      length = int(batch['segment_ids'][index, row].sum())
      assert TOKENIZER.decode(tokens[:length][loss_mask[:length] == 0]) == example['prompt']
      assert TOKENIZER.decode(tokens[:length][loss_mask[:length] == 1]) == response
      np.testing.assert_array_equal(batch['positions'][index, row, :length], np.arange(length))


def test_examples_whose_prompt_fills_the_row_are_skipped():
  examples = [[{'prompt': 'x' * 40, 'response': 'lost'}], [{'prompt': 'p', 'response': 'kept'}]]
  [batch] = list(batches(examples, 'sft', batch_size=1))
  assert TOKENIZER.decode(batch['tokens'][0][batch['loss_mask'][0] == 1]) == 'kept'


def direct_log_prob(apply, params, tokens, loss_mask):
  """log p(response | prompt) of one row, token by token. The padding after the row
  cannot change a causal model's earlier logits, so the row is run as one document."""
  logits = apply({'params': params}, tokens[None], jnp.ones_like(tokens)[None],
                 jnp.arange(len(tokens))[None])[0]
  log_probs = jax.nn.log_softmax(logits)
  return sum(log_probs[t - 1, tokens[t]] for t in range(1, len(tokens)) if loss_mask[t])


def dpo_setup(nll_weight=0.0):
  model, params = init_model(small_model_config(vocab_size=TOKENIZER.vocab_size), length=32)
  batch = jax.tree.map(jnp.asarray, next(iter(batches(DPO_EXAMPLES, 'dpo', batch_size=3))))
  train_config = constant_rate_train_config(objective='dpo')
  train_config.dpo.update(beta=0.5, nll_weight=nll_weight)
  loss = functools.partial(objectives.OBJECTIVES['dpo'].loss, model=model,
                           settings=train_config.dpo)
  return jit_apply(model), params, batch, loss


@pytest.mark.parametrize('nll_weight', [0.0, 0.3])
def test_dpo_loss_matches_a_direct_computation(nll_weight):
  apply, reference, batch, loss = dpo_setup(nll_weight)
  # A policy away from the reference: the reference's params, perturbed.
  leaves, tree = jax.tree.flatten(reference)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  policy = jax.tree.unflatten(tree, [x + 0.05 * jax.random.normal(k, x.shape)
                                     for x, k in zip(leaves, keys)])
  total, sums, count = loss(policy, batch, reference)
  want, chosen_nll = [], []
  for index in range(3):
    rewards = []
    for row in range(2):
      tokens, mask = batch['tokens'][index, row], batch['loss_mask'][index, row]
      policy_log_prob = direct_log_prob(apply, policy, tokens, mask)
      rewards.append(0.5 * (policy_log_prob - direct_log_prob(apply, reference, tokens, mask)))
      if row == 0:  # Per chosen token: the response and its eos.
        chosen_nll.append(-policy_log_prob / int(mask.sum()))
    want.append(rewards)
  want, chosen_nll = np.array(want, np.float64), np.array(chosen_nll, np.float64)
  margins = want[:, 0] - want[:, 1]
  assert count == 3
  np.testing.assert_allclose(
      total, np.sum(np.log1p(np.exp(-margins))) + nll_weight * chosen_nll.sum(), rtol=1e-5)
  np.testing.assert_allclose(sums['chosen_nll'], chosen_nll.sum(), rtol=1e-5)
  np.testing.assert_allclose(sums['reward_margin'], margins.sum(), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(sums['chosen_reward'], want[:, 0].sum(), rtol=1e-4, atol=1e-6)
  assert sums['reward_accuracy'] == np.sum(margins > 0)


def test_dpo_at_the_reference_is_log_2_with_the_log_likelihood_ratio_gradient():
  apply, params, batch, loss = dpo_setup()
  total, sums, _ = loss(params, batch, params)
  np.testing.assert_allclose(total, 3 * np.log(2.0), rtol=1e-6)
  assert sums['reward_accuracy'] == 0 and sums['reward_margin'] == 0
  # d/dm -log sigmoid(m) = -1/2 at m = 0: the gradient is -beta/2 times that of
  # sum(log p(chosen) - log p(rejected)), here summed token by token.
  def log_ratio(params):
    total = 0.0
    for index in range(3):
      for row, sign in ((0, 1.0), (1, -1.0)):
        total += sign * direct_log_prob(apply, params, batch['tokens'][index, row],
                                        batch['loss_mask'][index, row])
    return total
  grads = jax.grad(lambda p: loss(p, batch, params)[0])(params)
  want = jax.tree.map(lambda g: -0.25 * g, jax.grad(log_ratio)(params))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), grads, want)


def test_dpo_steps_on_one_batch_learn_its_preferences():
  _, params, batch, _ = dpo_setup()
  model = models.build(small_model_config(vocab_size=TOKENIZER.vocab_size))
  train_config = constant_rate_train_config(objective='dpo', learning_rate=3e-3, num_steps=20)
  train_config.dpo.beta = 0.5
  optimizer = optimizer_lib.make_optimizer(train_config)
  state = steps.TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params))
  step = jax.jit(functools.partial(steps.train_step, model=model, optimizer=optimizer,
                                   objective=objectives.OBJECTIVES['dpo'],
                                   settings=train_config.dpo))
  frozen = steps.Frozen(reference=jax.tree.map(jnp.copy, params))
  history = [step(state, batch, frozen)]
  for _ in range(10):
    state, metrics = step(history[-1][0], batch, frozen)
    history.append((state, metrics))
  first, last = history[0][1], history[-1][1]
  np.testing.assert_allclose(first['loss'], np.log(2.0), rtol=1e-6)
  assert last['loss'] < 0.5 * first['loss'] and last['reward_accuracy'] == 1.0
  assert first['num_pairs'] == 3


def test_sft_starts_from_the_init_from_params(pretrained, tmp_path):
  workdir, pretrained_params = pretrained
  config = post_training_config(sft_config, workdir, num_steps=2, warmup_steps=1,
                                eval_every=2)
  config.checkpoint.every_steps = 1
  history, _ = loop.train(config, str(tmp_path), jax.devices()[:1])
  # The first step's learning rate is the warmup's zero: after it, the params are still
  # those the run started from.
  after_first = checkpointing.restore_for_inference(str(tmp_path), step=1).params
  jax.tree.map(np.testing.assert_array_equal, after_first, pretrained_params)
  assert history[-1]['eval_loss'] > 0 and history[-1]['num_tokens'] > 0


def test_dpo_trains_from_its_reference_and_resumes(pretrained, tmp_path):
  workdir, _ = pretrained
  config = post_training_config(dpo_config, workdir, num_steps=4, log_every=1,
                                learning_rate=1e-3)
  history, _ = loop.train(config, str(tmp_path), jax.devices()[:1])
  rows = {row['step']: row for row in history}
  np.testing.assert_allclose(rows[1]['loss'], np.log(2.0), rtol=1e-6)  # policy = reference
  assert rows[4]['loss'] != rows[1]['loss'] and 'eval_reward_accuracy' in rows[4]
  # The step init_from resolved to is recorded, so a resumed run reloads the same
  # reference even if that workdir has saved newer steps since.
  saved_config, _ = checkpointing.Checkpointer(str(tmp_path), None).read_metadata(4)
  assert saved_config.train.init_from == workdir and saved_config.train.init_from_step == 2
  config.train.num_steps = 6
  resumed, _ = loop.train(config, str(tmp_path), jax.devices()[:1])
  assert [row['step'] for row in resumed if 'loss' in row] == [5, 6]
  config.train.update(num_steps=8, init_from_step=1)
  with pytest.raises(ConfigError, match=r'train.init_from_step: checkpoint has 2, config has 1'):
    loop.train(config, str(tmp_path), jax.devices()[:1])


@pytest.mark.parametrize('case', ['no checkpoints', 'no such step', 'other model',
                                  'other objective'])
def test_bad_post_training_starts_are_refused_by_name(case, pretrained, tmp_path):
  workdir, _ = pretrained
  config = post_training_config(sft_config, workdir)
  if case == 'no checkpoints':
    config.train.init_from = str(tmp_path / 'nothing')
    message = r'config.train.init_from=.*nothing.*: no checkpoints'
  elif case == 'no such step':
    config.train.init_from_step = 7
    message = r'config.train.init_from_step=7: .*checkpoints has steps \[2\]'
  elif case == 'other model':
    config.model.num_layers = 3
    message = r'model.num_layers: checkpoint has 2, config has 3'
  else:  # Resuming a pretraining workdir as SFT.
    config.train.init_from = ''
    message = r"train.objective: checkpoint has 'pretrain', config has 'sft'"
    tmp_path = workdir
  with pytest.raises(ConfigError, match=message):
    loop.train(config, str(tmp_path), jax.devices()[:1])


def test_jsonl_examples_name_the_line_missing_a_field(tmp_path):
  path = tmp_path / 'pairs.jsonl'
  path.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": "b"}\n')
  config = ml_collections.ConfigDict(dict(source='jsonl', path=str(path), bad_records='error'))
  with pytest.raises(ConfigError, match=r"pairs.jsonl:2 has no field 'rejected'"):
    objectives.OBJECTIVES['dpo'].source(config)
  config.bad_records = 'skip'
  source = objectives.OBJECTIVES['dpo'].source(config)
  assert len(source) == 1 and source[0] == [{'prompt': 'a', 'chosen': 'b', 'rejected': 'c'}]
  with pytest.raises(ConfigError, match=r"config.data.source='text' is not one of"):
    objectives.OBJECTIVES['sft'].source(ml_collections.ConfigDict(dict(source='text', path='')))


def test_init_from_refuses_a_different_tokenizer_of_the_same_vocabulary_size(tmp_path):
  """Two sentencepiece models of 290 pieces trained on different text: the same model
  shapes, other ids for the same text. Post-training must not start from the checkpoint
  with the other one."""
  paths = [str(tmp_path / 'prose.model'), str(tmp_path / 'code.model')]
  prose = tokenizer_lib.train_sentencepiece([' '.join(WORDS) + '.\n'] * 50, 290, paths[0])
  code = tokenizer_lib.train_sentencepiece(['def f(x):\n    return x\n'] * 50, 290, paths[1])
  assert prose.vocab_size == code.vocab_size and prose.to_dict() != code.to_dict()
  config = make_tiny_config(tmp_path / 'corpus')
  config.tokenizer.update(kind='sentencepiece', path=paths[0])
  config.model.vocab_size = 296
  config.train.update(num_steps=1, warmup_steps=0, eval_every=1)
  workdir = str(tmp_path / 'pretrained')
  loop.train(config, workdir, jax.devices()[:1])

  config = post_training_config(sft_config, workdir, num_steps=1, warmup_steps=0)
  config.tokenizer.update(kind='sentencepiece', path=paths[1])
  config.model.vocab_size = 296
  with pytest.raises(ConfigError, match=r'tokenizer mismatch: the checkpoint in'
                                        r' .*pretrained/checkpoints/1 .*\(config.tokenizer\)'):
    loop.train(config, str(tmp_path / 'sft'), jax.devices()[:1])
