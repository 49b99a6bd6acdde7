import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm import models, sampling
from lm import flops
from lm.models import attention, layers

from helpers import init_model as init, jit_apply, small_model_config


model_config = small_model_config


def single_document(tokens_bt):
  batch, length = tokens_bt.shape
  return jnp.ones_like(tokens_bt), jnp.broadcast_to(jnp.arange(length), (batch, length))


def naive_attention(q_btnh, k_bskh, v_bskh, segment_ids_bt, window=0):
  """Loops over heads with K/V repeated per query head and an explicit mask."""
  _, length, num_heads, head_dim = q_btnh.shape
  groups = num_heads // k_bskh.shape[2]
  outputs = []
  for head in range(num_heads):
    q, k, v = q_btnh[:, :, head], k_bskh[:, :, head // groups], v_bskh[:, :, head // groups]
    scores = jnp.einsum('bth,bsh->bts', q, k) / np.sqrt(head_dim)
    distance = np.arange(length)[:, None] - np.arange(length)[None, :]
    allowed = ((distance >= 0) & (distance < (window or length))
               & (segment_ids_bt[:, :, None] == segment_ids_bt[:, None, :]))
    scores = jnp.where(allowed, scores, -jnp.inf)
    outputs.append(jnp.einsum('bts,bsh->bth', jax.nn.softmax(scores, axis=-1), v))
  return jnp.stack(outputs, axis=2)


@pytest.mark.parametrize('num_heads,num_kv_heads,window', [(4, 4, 0), (4, 2, 0), (6, 1, 0),
                                                           (4, 2, 1), (4, 2, 3), (6, 1, 20)])
def test_xla_attention_matches_naive_reference(num_heads, num_kv_heads, window):
  keys = jax.random.split(jax.random.key(num_heads * 10 + num_kv_heads), 3)
  q = jax.random.normal(keys[0], (2, 13, num_heads, 8))
  k = jax.random.normal(keys[1], (2, 13, num_kv_heads, 8))
  v = jax.random.normal(keys[2], (2, 13, num_kv_heads, 8))
  segment_ids = jnp.array([[1] * 5 + [2] * 6 + [0] * 2, [1] * 13])
  got = attention.xla_attention(q, k, v, segment_ids, window)
  want = naive_attention(q, k, v, segment_ids, window)
  valid = (segment_ids != 0)[:, :, None, None]
  np.testing.assert_allclose(np.where(valid, got, 0), np.where(valid, want, 0),
                             rtol=1e-5, atol=1e-6)


def test_changing_a_later_token_never_changes_earlier_logits():
  config = model_config()
  model, params = init(config)
  tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, config.vocab_size)
  changed = tokens.at[:, 9].set((tokens[:, 9] + 1) % config.vocab_size)
  apply = jit_apply(model)
  logits = apply({'params': params}, tokens, *single_document(tokens))
  logits_changed = apply({'params': params}, changed, *single_document(changed))
  np.testing.assert_allclose(logits[:, :9], logits_changed[:, :9], rtol=1e-6, atol=1e-6)
  assert not np.allclose(logits[:, 9:], logits_changed[:, 9:], atol=1e-3)


def test_a_sliding_window_hides_tokens_further_back_than_the_layers_can_carry():
  """Each layer looks back window - 1 tokens, so with L layers a token reaches the
  logits at most L * (window - 1) positions on, and no further (it does with none)."""
  window = 3
  config = model_config(sliding_window=window)
  changed_at, reach = 2, 2 * (window - 1)  # Two layers.
  tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, config.vocab_size)
  changed = tokens.at[:, changed_at].set((tokens[:, changed_at] + 1) % config.vocab_size)
  for sliding_window in (window, 0):
    model, params = init(model_config(sliding_window=sliding_window))
    apply = jit_apply(model)
    logits = apply({'params': params}, tokens, *single_document(tokens))
    logits_changed = apply({'params': params}, changed, *single_document(changed))
    after = changed_at + reach + 1
    assert not np.allclose(logits[:, after - 1], logits_changed[:, after - 1], atol=1e-4)
    assert np.allclose(logits[:, after:], logits_changed[:, after:], rtol=1e-6,
                       atol=1e-6) == bool(sliding_window)


@pytest.mark.parametrize('implementation', ['xla', 'pallas'])
def test_cached_decoding_in_a_sliding_window_gives_the_full_forward_logits(implementation):
  """Prefill of ragged prompts, then one token at a time past the window: the logits of
  a full forward pass with the same window (the Pallas decode kernel's reference here)."""
  window = 4
  config = model_config(sliding_window=window, attention=implementation)
  model, params = init(config)
  rng = np.random.default_rng(0)
  lengths = [2, 7, 5]
  prompts, lengths_b = sampling.pad_prompts(
      [list(rng.integers(3, 90, n)) for n in lengths], pad_id=0, multiple=8)
  continuation = rng.integers(3, 90, (3, 6))
  apply = jit_apply(model)
  segment_ids = (np.arange(8)[None] < lengths_b[:, None]).astype(np.int32)
  logits, variables = apply(
      {'params': params, 'cache': sampling.init_cache(model, batch_size=3, cache_length=16)},
      jnp.asarray(prompts), jnp.asarray(segment_ids), jnp.broadcast_to(jnp.arange(8), (3, 8)),
      decode=True)
  pieces = [logits]
  for step in range(continuation.shape[1]):
    token = jnp.asarray(continuation[:, step:step + 1], jnp.int32)
    step_logits, variables = apply({'params': params, 'cache': variables['cache']}, token,
                                   jnp.ones_like(token), jnp.asarray(lengths_b + step)[:, None],
                                   decode=True)
    pieces.append(step_logits)
  # The full forward of every row over one fixed-length buffer (a single compilation):
  # causal, so the zeros after a row's ids do not reach their logits.
  rows = [list(prompts[row, :length]) + list(continuation[row])
          for row, length in enumerate(lengths)]
  width = max(map(len, rows))
  ids = jnp.asarray([row + [0] * (width - len(row)) for row in rows], jnp.int32)
  full = apply({'params': params}, ids, *single_document(ids))
  for row, length in enumerate(lengths):
    want = full[row, :len(rows[row])]
    got = np.concatenate([pieces[0][row, :length]] + [p[row] for p in pieces[1:]])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_packed_documents_give_the_same_logits_as_each_document_alone():
  config = model_config()
  model, params = init(config)
  lengths = (5, 7, 3)
  documents = [jax.random.randint(jax.random.key(i), (1, n), 0, config.vocab_size)
               for i, n in enumerate(lengths)]
  padding = 1
  packed = jnp.concatenate(documents + [jnp.zeros((1, padding), jnp.int32)], axis=1)
  segment_ids = jnp.concatenate(
      [jnp.full((1, n), i + 1) for i, n in enumerate(lengths)] + [jnp.zeros((1, padding))],
      axis=1).astype(jnp.int32)
  positions = jnp.concatenate([jnp.arange(n) for n in lengths + (padding,)])[None]
  apply = jit_apply(model)
  packed_logits = apply({'params': params}, packed, segment_ids, positions)
  # Each document alone, all in one call (a single compilation): a row each, zeros after
  # it, which causal attention does not let reach its logits.
  width = max(lengths)
  alone_bt = jnp.concatenate([jnp.pad(d, ((0, 0), (0, width - d.shape[1]))) for d in documents])
  alone = apply({'params': params}, alone_bt, *single_document(alone_bt))
  start = 0
  for row, document in enumerate(documents):
    length = document.shape[1]
    np.testing.assert_allclose(packed_logits[:, start:start + length],
                               alone[row:row + 1, :length], rtol=1e-5, atol=1e-5)
    start += length


def test_rope_scores_depend_only_on_relative_position():
  q = jax.random.normal(jax.random.key(0), (1, 1, 1, 16))
  k = jax.random.normal(jax.random.key(1), (1, 1, 1, 16))
  def score(q_position, k_position):
    rq = layers.apply_rope(q, jnp.array([[q_position]]), 10_000.0)
    rk = layers.apply_rope(k, jnp.array([[k_position]]), 10_000.0)
    return float(jnp.sum(rq * rk))
  np.testing.assert_allclose(score(7, 3), score(104, 100), rtol=1e-4)
  assert abs(score(7, 3) - score(7, 5)) > 1e-3


def test_bfloat16_compute_stays_close_to_float32():
  model32, params = init(model_config())
  model16 = models.build(model_config(dtype='bfloat16'))
  tokens = jax.random.randint(jax.random.key(2), (2, 16), 0, 97)
  logits32 = jit_apply(model32)({'params': params}, tokens, *single_document(tokens))
  logits16 = jit_apply(model16)({'params': params}, tokens, *single_document(tokens))
  assert logits16.dtype == jnp.float32
  probs32, probs16 = jax.nn.softmax(logits32), jax.nn.softmax(logits16)
  np.testing.assert_allclose(probs16, probs32, atol=2e-2)


@pytest.fixture(scope='module')
def remat_loss_params_and_grads():
  """(loss, params, grads) of a plain model, computed once for each remat policy's test:
  loss(model, params) is the mean squared logits of fixed tokens."""
  model, params = init(model_config())
  tokens = jax.random.randint(jax.random.key(3), (2, 16), 0, 97)
  def loss(model, params):
    return jnp.mean(model.apply({'params': params}, tokens, *single_document(tokens)) ** 2)
  return loss, params, jax.jit(jax.grad(lambda p: loss(model, p)))(params)


@pytest.mark.parametrize('remat', ['full', 'save_dots'])
def test_remat_gives_the_same_gradients(remat, remat_loss_params_and_grads):
  loss, params, grads = remat_loss_params_and_grads
  model_remat = models.build(model_config(remat=remat))
  grads_remat = jax.jit(jax.grad(lambda p: loss(model_remat, p)))(params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               grads, grads_remat)


@pytest.mark.parametrize('tie_embeddings', [True, False])
def test_flops_count_covers_every_matmul_weight(tie_embeddings):
  config = model_config(tie_embeddings=tie_embeddings)
  _, params = init(config)
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  matmul_weights = sum(value.size for path, value in flat
                       if value.ndim > 1 and 'embedding' not in jax.tree_util.keystr(path))
  if tie_embeddings:  # The tied table is also the output matmul.
    matmul_weights += params['embed']['embedding'].size
  attention_flops = config.num_layers * 6 * 16 * config.num_heads * config.head_dim
  assert flops.flops_per_token(config, 16) == 6 * matmul_weights + attention_flops


def test_tied_embeddings_have_no_separate_head():
  _, params = init(model_config(tie_embeddings=True))
  assert 'lm_head' not in params
  _, params = init(model_config(tie_embeddings=False))
  assert params['lm_head']['kernel'].shape == (32, 97)


def test_pallas_attention_switch_gives_the_xla_logits():
  """On CPU `pallas` runs the flash-attention reference: the wiring and the reference."""
  model, params = init(model_config())
  model_pallas = models.build(model_config(attention='pallas'))
  tokens = jax.random.randint(jax.random.key(4), (2, 16), 0, 97)
  segment_ids = jnp.array([[1] * 6 + [2] * 10, [1] * 12 + [0] * 4])
  positions = jnp.array([list(range(6)) + list(range(10)), list(range(16))])
  np.testing.assert_allclose(
      jit_apply(model_pallas)({'params': params}, tokens, segment_ids, positions),
      jit_apply(model)({'params': params}, tokens, segment_ids, positions), rtol=1e-5, atol=1e-5)
