"""GGUF files run by llama.cpp itself (llama-cpp-python): a model of lm's own (byte
tokenizer, tied and scaled embeddings) written by `python -m experiments.convert
--to_gguf`, and tiny random transformers Llama (biases, head_dim != D / N, llama3 RoPE
scaling), Qwen2 (tied, q/k/v biases, a padded vocabulary) and Qwen3 (query/key norms)
models with byte-level BPE tokenizers, imported into lm and written out: transformers ->
lm -> llama.cpp. Each file loads, its next-token log-probabilities match lm's, greedy
generation and tokenization agree, and it holds the chat template and stop tokens.
(tests/unit/test_gguf.py checks the mapping and the refusals without llama.cpp.)"""

import functools
import json

import jax
import llama_cpp
import ml_collections
import numpy as np
import pytest
import tokenizers
import torch
import transformers

from experiments.configs import default
from lm import chat, models, sharding
from lm import tokenizer as tokenizer_lib
from lm.interop import gguf, hf
from lm.training import checkpointing

from helpers import WORDS, init_model, small_model_config, snapshot

PROMPTS = ['the cat sat on', 'def f(x):\n    return x + 1', 'Thanks ✓ — café 123', 'a']
TEXTS = [*PROMPTS, '  two  spaces\tand\ttabs\n\n', 'rivers near quiet trees, 4567.', '']
MESSAGES = [{'role': 'system', 'content': 'Be brief.'}, {'role': 'user', 'content': 'Hi ✓'},
            {'role': 'assistant', 'content': 'Hello.'}, {'role': 'user', 'content': 'Bye'}]
LENGTH = 64  # lm's forward pass runs at one padded length, compiled once.
NEW_TOKENS = 32
# Log-probabilities, llama.cpp against lm, largest absolute difference over every prompt
# position and vocabulary entry (see docs/open-models.md for the values seen).
TOLERANCE = {'f32': 1e-4, 'f16': 2e-2, 'q8_0': 0.25, 'q4_0': 1.0}


def log_softmax(logits):
  logits = np.asarray(logits, np.float64)
  shifted = logits - logits.max(-1, keepdims=True)
  return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


class Reference:
  """lm's logits and greedy tokens for `params`, at one padded length; each prompt's
  greedy tokens computed once for every file compared."""

  def __init__(self, model, params):
    self.params = params
    self.apply = jax.jit(lambda params, tokens, segments, positions: model.apply(
        {'params': params}, tokens, segments, positions))
    self.greedy = functools.cache(self._greedy)

  def logits(self, ids):
    tokens = np.zeros((1, LENGTH), np.int32)
    tokens[0, :len(ids)] = ids
    segments = (np.arange(LENGTH) < len(ids)).astype(np.int32)[None]
    positions = np.arange(LENGTH, dtype=np.int32)[None]
    return np.asarray(self.apply(self.params, tokens, segments, positions))[0, :len(ids)]

  def _greedy(self, ids: tuple) -> list:
    ids = list(ids)
    for _ in range(NEW_TOKENS):
      ids.append(int(np.argmax(self.logits(ids)[-1])))
    return ids[-NEW_TOKENS:]


def open_llama(path):
  # A float32 cache (llama.cpp's default is f16) so that f32 files compare at f32 precision;
  # one thread, as llama.cpp's threads spin while they wait for each other, which on a
  # busy machine took many times as long.
  return llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=LENGTH, n_threads=1,
                         n_threads_batch=1, type_k=llama_cpp.GGML_TYPE_F32,
                         type_v=llama_cpp.GGML_TYPE_F32, verbose=False)


def llama_logits(llm, ids):
  llm.reset()
  llm.eval(ids)
  return np.array(llm.scores[:len(ids)])


def llama_greedy(llm, ids):
  llm.reset()
  llm.eval(ids)
  generated = []
  for _ in range(NEW_TOKENS):
    generated.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
    llm.eval(generated[-1:])
  return generated


def compare(path, reference, tokenizer):
  """(largest log-prob difference, prompts whose greedy tokens agree) of the file at `path`
  against lm, over PROMPTS."""
  llm = open_llama(path)
  error, agreeing = 0.0, 0
  for prompt in PROMPTS:
    ids = tokenizer.prompt_ids(prompt)
    error = max(error, float(np.abs(log_softmax(llama_logits(llm, ids))
                                    - log_softmax(reference.logits(ids))).max()))
    agreeing += llama_greedy(llm, ids) == reference.greedy(tuple(ids))
  llm.close()
  return error, agreeing


def check_tokenizer(path, tokenizer):
  """llama.cpp tokenizes, adds bos, renders chats (as text) and stops as lm does."""
  llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
  special = tokenizer.matches_special_tokens
  for text in TEXTS:
    assert llm.tokenize(text.encode(), add_bos=False, special=special) \
        == tokenizer.encode(text).tolist(), text
    assert llm.tokenize(text.encode(), add_bos=True, special=special) \
        == tokenizer.prompt_ids(text), text
    assert llm.detokenize(tokenizer.encode(text).tolist()).decode() == text
  rendered = chat.render(tokenizer, MESSAGES, add_generation_prompt=True)
  assert llm.tokenize(rendered.text.encode(), add_bos=False, special=True) == rendered.ids.tolist()
  metadata = llm.metadata
  expected = tokenizer.chat_template if tokenizer.chat_template is not None \
      else chat.DEFAULT_TEMPLATE
  assert metadata['tokenizer.chat_template'] == expected
  assert llm.token_eos() == tokenizer.eos_id
  for stop in chat.end_of_turn_ids(tokenizer):
    assert llama_cpp.llama_vocab_is_eog(llama_cpp.llama_model_get_vocab(llm.model), stop)
  llm.close()


@pytest.fixture(scope='module')
def native(commands, tmp_path_factory):
  """A random model of lm's tiny config (byte tokenizer, tied and sqrt(D)-scaled
  embeddings) saved as a run, and its f32 export by the command."""
  root = tmp_path_factory.mktemp('native')
  config = default.get_config('tiny')
  config.model.dtype = 'float32'
  config.model = ml_collections.FrozenConfigDict(config.model)
  model, params = init_model(config.model, seed=1)
  checkpointer = checkpointing.Checkpointer(str(root / 'run'), max_to_keep=None)
  checkpointer.save_params(0, params, config, tokenizer_lib.ByteTokenizer())
  checkpointer.close()
  result = commands('experiments.convert', f'--workdir={root / "run"}',
                    f'--to_gguf={root / "f32.gguf"}', '--gguf_type=f32')
  return dict(root=root, config=config.model, reference=Reference(model, params),
              params=params, result=result)


def test_a_run_of_lm_runs_in_llama_cpp_as_it_does_in_lm(native, capsys):
  result, root = native['result'], native['root']
  assert result.returncode == 0, result.stderr
  assert '(llama, ' in result.stdout and 'tensors: 21 F32' in result.stdout, result.stdout
  tokenizer = tokenizer_lib.ByteTokenizer()
  check_tokenizer(root / 'f32.gguf', tokenizer)
  errors = {}
  for kind in ('f32', 'f16', 'q8_0', 'q4_0'):
    if kind != 'f32':
      gguf.write(str(root / f'{kind}.gguf'), native['config'], native['params'], tokenizer,
                 kind, np.asarray)
    errors[kind], agreeing = compare(root / f'{kind}.gguf', native['reference'], tokenizer)
    assert errors[kind] < TOLERANCE[kind], (kind, errors[kind])
    if kind in ('f32', 'f16'):
      assert agreeing == len(PROMPTS), kind
    elif kind == 'q8_0':
      assert agreeing >= len(PROMPTS) - 1
  with capsys.disabled():
    print('\nlm tiny model in llama.cpp: largest log-prob error '
          + ', '.join(f'{kind} {error:.2e}' for kind, error in errors.items()))


@pytest.mark.parametrize('fields, arch', [
    (dict(qk_norm=True, qkv_bias=True), 'qwen3'),
    (dict(qkv_bias=True, attention_out_bias=True, head_dim=16), 'llama'),
])
def test_biases_and_norms_of_lm_models_run_in_llama_cpp(fields, arch, tmp_path):
  """Settings transformers' classes do not combine so (Qwen3 with q/k/v biases alone) or
  that only lm's own configs give (head_dim twice D / N, untied and scaled embeddings)."""
  config = small_model_config(vocab_size=264, **fields)
  model, params = init_model(config, seed=3)
  noise = np.random.default_rng(0)
  params = jax.tree.map(lambda x: x + 0.1 * noise.normal(size=x.shape).astype(np.float32),
                        params)  # Biases and norms away from their initial values.
  assert gguf.architecture(config) == arch
  gguf.write(str(tmp_path / 'm.gguf'), config, params, tokenizer_lib.ByteTokenizer(), 'f32',
             np.asarray)
  error, agreeing = compare(tmp_path / 'm.gguf', Reference(model, params),
                            tokenizer_lib.ByteTokenizer())
  assert error < TOLERANCE['f32'] and agreeing == len(PROMPTS), (error, agreeing)


def test_a_sentencepiece_tokenizer_tokenizes_in_llama_cpp_as_in_lm(tmp_path):
  texts = [' '.join(np.random.default_rng(i).choice(WORDS, 12)) + f', {i}23.\n  x = {i}'
           for i in range(50)]
  tokenizer = tokenizer_lib.train_sentencepiece(texts, 300, str(tmp_path / 'sp.model'))
  config = small_model_config(vocab_size=304)
  _, params = init_model(config)
  gguf.write(str(tmp_path / 'sp.gguf'), config, params, tokenizer, 'f16', np.asarray)
  check_tokenizer(tmp_path / 'sp.gguf', tokenizer)


def test_an_existing_file_or_an_unknown_type_is_refused_in_one_line(native, commands):
  root = native['root']
  before = snapshot(root)
  (root / 'elsewhere').mkdir()
  (root / 'link.gguf').symlink_to(root / 'elsewhere' / 'target.gguf')
  for args, message in (
      ([f'--to_gguf={root / "f32.gguf"}'], f'--to_gguf={root / "f32.gguf"} exists'),
      ([f'--to_gguf={root / "link.gguf"}'], 'exists; give a new file path'),
      ([f'--to_gguf={root / "new.gguf"}', '--gguf_type=q5_k'], "--gguf_type='q5_k' is not one"),
      ([f'--to_gguf={root / "no" / "new.gguf"}'], 'no such directory'),
      ([f'--to_gguf={root / "new.gguf"}', '--to_hf'], 'exactly one of'),
  ):
    result = commands('experiments.convert', f'--workdir={root / "run"}', *args)
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0 and len(lines) == 1 and message in lines[0], result.stderr
  assert not (root / 'elsewhere' / 'target.gguf').exists() and not (root / 'new.gguf').exists()
  (root / 'link.gguf').unlink()
  (root / 'elsewhere').rmdir()
  after = snapshot(root)
  assert {name: after[name] for name in before} == before


def bpe_tokenizer(split_regex, specials):
  """A byte-level BPE trained on a few lines, split by `split_regex` (None: GPT-2's
  ByteLevel regex)."""
  pre = tokenizers.pre_tokenizers
  bpe = tokenizers.Tokenizer(tokenizers.models.BPE())
  if split_regex is None:
    bpe.pre_tokenizer = pre.ByteLevel(add_prefix_space=False)
  else:
    bpe.normalizer = tokenizers.normalizers.NFC()
    bpe.pre_tokenizer = pre.Sequence([pre.Split(tokenizers.Regex(split_regex), 'isolated'),
                                      pre.ByteLevel(add_prefix_space=False, use_regex=False)])
  bpe.decoder = tokenizers.decoders.ByteLevel()
  rng = np.random.default_rng(0)
  lines = [' '.join(rng.choice(WORDS, 12)) + ', 4567.\ndef f(x):\n    return x + 1\n'
           for _ in range(200)]
  bpe.train_from_iterator(lines, tokenizers.trainers.BpeTrainer(
      vocab_size=400, special_tokens=specials,
      initial_alphabet=pre.ByteLevel.alphabet()))
  return bpe


def save_llama():
  specials = ['<|begin_of_text|>', '<|end_of_text|>', '<|eot_id|>']
  bpe = bpe_tokenizer(None, specials)
  bpe.post_processor = tokenizers.processors.TemplateProcessing(
      single='<|begin_of_text|> $A', special_tokens=[('<|begin_of_text|>', 0)])
  fast = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=specials[0],
                                              eos_token=specials[1])
  fast.chat_template = (
      "{{ bos_token }}{% for m in messages %}{{ m['role'] }}\n{{ m['content'] }}<|eot_id|>"
      "{% endfor %}{% if add_generation_prompt %}assistant\n{% endif %}")
  config = transformers.LlamaConfig(
      vocab_size=bpe.get_vocab_size(), hidden_size=64, intermediate_size=96,
      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=24,
      attention_bias=True, max_position_embeddings=128, bos_token_id=0, eos_token_id=1,
      # Llama 3.1's rule, rescaling from position 16 on: llama.cpp's rope_freqs tensor.
      rope_scaling=dict(rope_type='llama3', factor=8.0, low_freq_factor=1.0,
                        high_freq_factor=4.0, original_max_position_embeddings=16))
  return fast, config


def save_qwen(config_class, **fields):
  specials = ['<|endoftext|>', '<|im_start|>', '<|im_end|>']
  bpe = bpe_tokenizer(gguf.QWEN2_SPLIT, specials)
  fast = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token='<|im_end|>',
                                              pad_token='<|endoftext|>')
  fast.chat_template = (
      "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
      "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
  config = config_class(
      vocab_size=bpe.get_vocab_size() + 5, hidden_size=64, intermediate_size=96,
      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
      tie_word_embeddings=True, max_position_embeddings=128, eos_token_id=2, **fields)
  return fast, config


@pytest.mark.parametrize('save, arch, pre', [
    (save_llama, 'llama', 'gpt-2'),
    (functools.partial(save_qwen, transformers.Qwen2Config), 'qwen2', 'qwen2'),
    (functools.partial(save_qwen, transformers.Qwen3Config, head_dim=16), 'qwen3', 'qwen2'),
], ids=['llama', 'qwen2', 'qwen3'])
def test_a_transformers_model_runs_in_llama_cpp_after_import(save, arch, pre, tmp_path,
                                                             capsys):
  fast, hf_config = save()
  fast.save_pretrained(tmp_path / 'hf')
  torch.manual_seed(0)
  original = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32).eval()
  with torch.no_grad():  # Biases and norms away from their initial values.
    for name, parameter in original.named_parameters():
      if 'norm' in name or name.endswith('bias'):
        parameter.add_(torch.randn_like(parameter) * 0.1)
  original.save_pretrained(tmp_path / 'hf')

  base = default.get_config().model
  base.dtype = 'float32'
  with open(tmp_path / 'hf' / 'config.json') as f:
    config = hf.model_config(json.load(f), base)
  model = models.build(config)
  mesh = sharding.inference_mesh(config.embed_dim, jax.devices()[:1])
  params = hf.load_params(str(tmp_path / 'hf'), config,
                          checkpointing.abstract_params(model, mesh))
  tokenizer = tokenizer_lib.from_hf_directory(str(tmp_path / 'hf'))
  path = tmp_path / 'model.gguf'
  gguf.write(str(path), config, params, tokenizer, 'f32', sharding.to_host)
  check_tokenizer(path, tokenizer)
  llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
  assert (llm.metadata['general.architecture'], llm.metadata['tokenizer.ggml.pre']) == (arch, pre)
  llm.close()

  reference = Reference(model, params)
  error, agreeing = compare(path, reference, tokenizer)
  assert error < TOLERANCE['f32'] and agreeing == len(PROMPTS), (error, agreeing)
  # The whole way: llama.cpp's next-token log-probs against transformers' own.
  ids = tokenizer.prompt_ids(PROMPTS[1])
  with torch.no_grad():
    theirs = original(torch.tensor([ids])).logits[0].numpy()
  llm = open_llama(path)
  chain = float(np.abs(log_softmax(llama_logits(llm, ids)) - log_softmax(theirs)).max())
  llm.close()
  assert chain < TOLERANCE['f32'], chain

  quantized = tmp_path / 'q8_0.gguf'
  gguf.write(str(quantized), config, params, tokenizer, 'q8_0', sharding.to_host)
  q8_error, q8_agreeing = compare(quantized, reference, tokenizer)
  assert q8_error < TOLERANCE['q8_0'] and q8_agreeing >= len(PROMPTS) - 1
  with capsys.disabled():
    print(f'\n{arch} from transformers in llama.cpp: largest log-prob error f32 {error:.2e}'
          f' (against transformers {chain:.2e}), q8_0 {q8_error:.2e}, greedy agreeing on'
          f' {q8_agreeing}/{len(PROMPTS)}')
