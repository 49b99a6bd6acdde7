"""SFT and DPO: their data, and their losses against direct computations; the runs that
start from another run's checkpoint are in tests/integration/test_post_training_runs.py."""

import functools
import textwrap

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from lm import objectives, tokenizer as tokenizer_lib
from lm.data import pipeline, sources
from lm.errors import ConfigError
from lm import losses
from lm.training import optimizer as optimizer_lib, steps

from helpers import constant_rate_train_config, init_model, jit_apply, small_model_config

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


def direct_log_probs(apply, params, tokens, loss_mask):
  """log p(response | prompt) of each row ([pair, chosen or rejected, T] arrays): the
  log-probabilities of the response's tokens, each at the position before it, summed.
  The padding after a row cannot change a causal model's earlier logits, so each row is
  run as one document."""
  tokens, loss_mask = np.asarray(tokens), np.asarray(loss_mask)
  rows = tokens.reshape(-1, tokens.shape[-1])
  logits = apply({'params': params}, rows, np.ones_like(rows),
                 np.broadcast_to(np.arange(rows.shape[1]), rows.shape))
  log_probs = jax.nn.log_softmax(logits)[:, :-1]  # Position t - 1 predicts token t.
  picked = jnp.take_along_axis(log_probs, rows[:, 1:, None], axis=-1)[..., 0]
  response = loss_mask.reshape(rows.shape)[:, 1:] == 1
  return jnp.sum(jnp.where(response, picked, 0.0), axis=1).reshape(tokens.shape[:-1])


@functools.cache
def dpo_model():
  """A one-layer model of the byte tokenizer's vocabulary, its params and its compiled
  apply, made once for the DPO tests (which only read them)."""
  model, params = init_model(small_model_config(vocab_size=TOKENIZER.vocab_size,
                                                num_layers=1), length=32)
  return model, params, jit_apply(model)


@functools.cache
def dpo_setup(nll_weight=0.0):
  """(the model's apply, its params, a batch of three pairs (numpy), DPO's loss), each
  compiled once for the tests."""
  model, params, apply = dpo_model()
  batch = next(iter(batches(DPO_EXAMPLES, 'dpo', batch_size=3)))
  train_config = constant_rate_train_config(objective='dpo')
  train_config.dpo.update(beta=0.5, nll_weight=nll_weight)
  loss = jax.jit(functools.partial(objectives.OBJECTIVES['dpo'].loss, model=model,
                                   settings=train_config.dpo))
  return apply, params, batch, loss


@pytest.mark.parametrize('nll_weight', [0.0, 0.3])
def test_dpo_loss_matches_a_direct_computation(nll_weight):
  apply, reference, batch, loss = dpo_setup(nll_weight)
  # A policy away from the reference: the reference's params, perturbed.
  rng = np.random.default_rng(1)
  policy = jax.tree.map(
      lambda x: x + 0.05 * rng.standard_normal(x.shape, np.float32), reference)
  total, sums, count = loss(policy, batch, reference)
  policy_log_probs = np.asarray(direct_log_probs(apply, policy, batch['tokens'],
                                                 batch['loss_mask']), np.float64)
  reference_log_probs = np.asarray(direct_log_probs(apply, reference, batch['tokens'],
                                                    batch['loss_mask']), np.float64)
  want = 0.5 * (policy_log_probs - reference_log_probs)  # [pair, chosen or rejected]
  # Per chosen token: the response and its eos.
  chosen_nll = -policy_log_probs[:, 0] / batch['loss_mask'][:, 0].sum(axis=-1)
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
    log_probs = direct_log_probs(apply, params, batch['tokens'], batch['loss_mask'])
    return jnp.sum(log_probs[:, 0] - log_probs[:, 1])
  grads = jax.jit(jax.grad(lambda p: loss(p, batch, params)[0]))(params)
  want = jax.tree.map(lambda g: -0.25 * g, jax.jit(jax.grad(log_ratio))(params))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), grads, want)


def test_dpo_steps_on_one_batch_learn_its_preferences():
  _, params, batch, _ = dpo_setup()
  model, _, _ = dpo_model()
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


