"""`python -m experiments.convert` end to end: a transformers checkpoint (a tiny random
Llama with a BPE tokenizer trained here) becomes an lm run that sample, SFT and export
accept unchanged, and comes back out as a directory transformers opens. (The commands run
through conftest's `commands`.)"""

import json
import os

import jax
import numpy as np
import pytest
import torch
import transformers

from experiments.configs import sft as sft_config
from lm import chat
from lm import tokenizer as tokenizer_lib
from lm.training import loop

from conftest import copy_run
from helpers import WORDS, post_training_config, snapshot

MESSAGES = [{'role': 'system', 'content': 'Be brief.'},
            {'role': 'user', 'content': 'Write a function that adds one.'},
            {'role': 'assistant', 'content': 'def f(x):\n    return x + 1'},
            {'role': 'user', 'content': 'Thanks ✓'}]


def write_checkpoint(directory):
  """A Llama-3-shaped tiny model and a byte-level BPE tokenizer, as transformers saves them."""
  import tokenizers
  from tokenizers import decoders, models, pre_tokenizers, trainers
  bpe = tokenizers.Tokenizer(models.BPE())
  bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  bpe.decoder = decoders.ByteLevel()
  specials = ['<|begin_of_text|>', '<|end_of_text|>', '<|eot_id|>']
  rng = np.random.default_rng(0)
  lines = [' '.join(rng.choice(WORDS, 12)) + '\ndef f(x):\n    return x + 1\n' for _ in range(200)]
  bpe.train_from_iterator(lines, trainers.BpeTrainer(
      vocab_size=400, special_tokens=specials,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  fast = transformers.PreTrainedTokenizerFast(
      tokenizer_object=bpe, bos_token=specials[0], eos_token=specials[1])
  fast.chat_template = (
      "{{ bos_token }}{% for m in messages %}<|eot_id|>{{ m['role'] }}\n{{ m['content'] }}"
      "<|eot_id|>{% endfor %}{% if add_generation_prompt %}<|eot_id|>assistant\n{% endif %}")
  fast.save_pretrained(directory)
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
      vocab_size=bpe.get_vocab_size(), hidden_size=64, intermediate_size=96,
      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
      max_position_embeddings=512, bos_token_id=fast.bos_token_id,
      eos_token_id=fast.eos_token_id))
  model.save_pretrained(directory)
  return model.eval(), fast


def logits(model, ids):
  with torch.no_grad():
    return model(torch.tensor([ids])).logits[0].numpy()


@pytest.fixture(scope='module')
def hf_checkpoint(commands, tmp_path_factory):
  """write_checkpoint's model imported by the command: {'hf': its directory, 'reference':
  the transformers model, 'fast': its tokenizer, 'workdir': the imported run (read, never
  written), 'result': the command's}."""
  root = tmp_path_factory.mktemp('hf_checkpoint')
  reference, fast = write_checkpoint(root / 'hf')
  imported = commands('experiments.convert', f'--from_hf={root / "hf"}',
                      f'--workdir={root / "imported"}')
  return dict(hf=root / 'hf', reference=reference, fast=fast, workdir=root / 'imported',
              result=imported)


def test_import_sample_fine_tune_and_export_through_the_commands(hf_checkpoint, commands,
                                                                 tmp_path):
  reference, fast, imported = (hf_checkpoint[key] for key in ('reference', 'fast', 'result'))
  assert imported.returncode == 0, imported.stderr
  assert 'imported' in imported.stdout
  workdir = copy_run(hf_checkpoint['workdir'], tmp_path / 'imported')

  sampled = commands('experiments.sample', f'--workdir={workdir}', '--prompt=the cat',
                     '--temperature=0', '--max_new_tokens=8')
  assert sampled.returncode == 0, sampled.stderr
  assert '--- prompt' in sampled.stdout
  evaluated = commands('experiments.evaluate', f'--workdir={workdir}', '--task=arithmetic_choice',
                       '--limit=4')
  assert evaluated.returncode == 0, evaluated.stderr
  assert 'arithmetic_choice' in evaluated.stdout
  chatted = commands('experiments.sample', f'--workdir={workdir}', '--chat', '--prompt=hello',
                     '--system=be brief', '--temperature=0', '--max_new_tokens=8')
  assert chatted.returncode == 0, chatted.stderr
  assert "--- prompt: 'hello'" in chatted.stdout

  # Training in the imported workdir itself is refused, and it is left as it was.
  before = snapshot(workdir)
  refused = commands('experiments.train', '--config=experiments/configs/default.py:tiny',
                     f'--workdir={workdir}', '--config.model.name=from_init',
                     f'--config.train.init_from={workdir}')
  assert refused.returncode != 0 and 'imported from' in refused.stderr, refused.stderr
  assert len(refused.stderr.strip().splitlines()) == 1
  after = snapshot(workdir)
  after.pop('lock', None)  # The run's lock file, empty, is all it adds.
  assert after == before

  tuned = tmp_path / 'sft'
  sft = commands('experiments.train', '--config=experiments/configs/sft.py:tiny',
                 f'--workdir={tuned}', '--config.model.name=from_init',
                 f'--config.train.init_from={workdir}', '--config.train.num_steps=2',
                 '--config.train.eval_every=2', '--config.checkpoint.every_steps=2')
  assert sft.returncode == 0, sft.stderr

  output = tmp_path / 'exported'
  exported = commands('experiments.convert', '--to_hf', f'--workdir={workdir}',
                      f'--output={output}')
  assert exported.returncode == 0, exported.stderr
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(output, dtype=torch.float32)
  tokenizer = transformers.AutoTokenizer.from_pretrained(output)
  text = 'the cat sat\ndef f(x):\n    return x'
  ids = fast(text).input_ids
  assert tokenizer(text).input_ids == ids
  np.testing.assert_allclose(logits(reloaded.eval(), ids), logits(reference, ids), rtol=0,
                             atol=0)

  # The fine-tuned run exports too, with weights that moved.
  moved = commands('experiments.convert', '--to_hf', f'--workdir={tuned}',
                   f'--output={tmp_path / "tuned"}')
  assert moved.returncode == 0, moved.stderr
  tuned_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / 'tuned',
                                                                  dtype=torch.float32)
  assert not np.allclose(logits(tuned_model.eval(), ids), logits(reference, ids))
  with open(output / 'config.json') as f:
    assert json.load(f)['architectures'] == ['LlamaForCausalLM']

  # The checkpoint's chat template comes back as lm renders it, and generation stops at
  # its end of turn (<|eot_id|>) as well as at eos.
  ours = tokenizer_lib.from_hf_directory(str(hf_checkpoint['hf']))
  for opened in (False, True):
    assert tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=opened) \
        == chat.render_text(ours, MESSAGES, add_generation_prompt=opened)
  with open(output / 'generation_config.json') as f:
    assert json.load(f) == dict(bos_token_id=fast.bos_token_id, pad_token_id=fast.eos_token_id,
                                eos_token_id=[fast.eos_token_id,
                                              fast.convert_tokens_to_ids('<|eot_id|>')])


def test_weights_that_are_not_finite_are_refused_on_import(commands, tmp_path):
  from safetensors.numpy import load_file, save_file  # pylint: disable=import-outside-toplevel
  write_checkpoint(tmp_path / 'hf')
  path = tmp_path / 'hf' / 'model.safetensors'
  tensors = load_file(path)
  tensors['model.layers.1.mlp.down_proj.weight'][0, 0] = np.nan
  save_file(tensors, path, metadata={'format': 'pt'})
  result = commands('experiments.convert', f'--from_hf={tmp_path / "hf"}',
                    f'--workdir={tmp_path / "w"}')
  assert result.returncode == 1 and 'Traceback' not in result.stderr, result.stderr[-2000:]
  line = result.stderr.strip().splitlines()[-1]
  assert line.startswith(f'error: --from_hf={tmp_path / "hf"}: its weights are not finite'
                         ' (NaN or Inf), e.g. layer_1/'), line
  assert not os.path.exists(tmp_path / 'w' / 'checkpoints') or not os.listdir(
      tmp_path / 'w' / 'checkpoints')


def test_bad_convert_input_is_one_line(commands, tmp_path):
  (tmp_path / 'empty').mkdir()
  llama = {'architectures': ['LlamaForCausalLM'], 'vocab_size': 300, 'hidden_size': 64,
           'num_hidden_layers': 2, 'intermediate_size': 96, 'num_attention_heads': 4}
  for name, config_json in (
      ('bad', {'architectures': ['GPT2LMHeadModel']}),
      ('typed', {**llama, 'num_hidden_layers': '2'}),
      ('heads', {**llama, 'num_key_value_heads': 3}),
      ('rope', {**llama, 'rope_scaling': {'rope_type': 'llama3', 'factor': 8.0}}),
  ):
    (tmp_path / name).mkdir()
    (tmp_path / name / 'config.json').write_text(json.dumps(config_json))
  for args, named in (
      ([f'--from_hf={tmp_path / "missing"}'], 'no such directory'),
      ([f'--from_hf={tmp_path / "empty"}'], 'config.json'),
      ([f'--from_hf={tmp_path / "bad"}'], 'architectures'),
      ([f'--from_hf={tmp_path / "typed"}'], f'{tmp_path / "typed" / "config.json"}:'
                                            ' "num_hidden_layers": "2" must be a positive integer'),
      ([f'--from_hf={tmp_path / "heads"}'], '"num_key_value_heads": 3 must divide'
                                            ' "num_attention_heads": 4'),
      ([f'--from_hf={tmp_path / "rope"}'], '"rope_scaling.low_freq_factor" is missing'),
      (['--to_hf'], '--output'),
      ([], 'exactly one of'),
  ):
    result = commands('experiments.convert', f'--workdir={tmp_path / "w"}', *args)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and named in lines[0], result.stderr


def test_a_run_trained_on_conversations_exports_the_template_it_was_trained_with(
    pretrained, commands, tmp_path):
  """A byte-tokenizer run fine-tuned on conversations (rendered with lm's default
  template): transformers renders and tokenizes them as lm did, and stops at eos."""
  workdir, _ = pretrained
  config = post_training_config(sft_config, workdir, num_steps=2, log_every=2, eval_every=2)
  config.data.update(source='stdlib_chats', seq_len=256, validation_fraction=0.3)
  loop.train(config, str(tmp_path / 'chats'), jax.devices()[:1])
  output = tmp_path / 'exported'
  exported = commands('experiments.convert', '--to_hf', f'--workdir={tmp_path / "chats"}',
                      f'--output={output}')
  assert exported.returncode == 0, exported.stderr
  tokenizer = transformers.AutoTokenizer.from_pretrained(output)
  ours = tokenizer_lib.ByteTokenizer()
  for opened in (False, True):
    rendered = chat.render(ours, MESSAGES, add_generation_prompt=opened)
    assert tokenizer.apply_chat_template(MESSAGES, tokenize=False,
                                         add_generation_prompt=opened) == rendered.text
    assert tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=opened)[
        'input_ids'] == rendered.ids.tolist()
  with open(output / 'generation_config.json') as f:
    assert json.load(f) == dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)
  generation = transformers.GenerationConfig.from_pretrained(output)
  assert (generation.bos_token_id, generation.eos_token_id) == (1, 2)


def test_lora_on_an_imported_model_merges_into_a_checkpoint_transformers_opens(
    hf_checkpoint, commands, tmp_path):
  from lm.training import checkpointing  # pylint: disable=import-outside-toplevel
  reference, fast, workdir = (hf_checkpoint[key] for key in ('reference', 'fast', 'workdir'))
  assert hf_checkpoint['result'].returncode == 0, hf_checkpoint['result'].stderr
  adapted = tmp_path / 'lora'
  trained = commands('experiments.train', '--config=experiments/configs/sft_lora.py:tiny',
                     f'--workdir={adapted}', '--config.model.name=from_init',
                     f'--config.train.init_from={workdir}', '--config.train.num_steps=2',
                     '--config.train.eval_every=2', '--config.checkpoint.every_steps=2',
                     '--config.lora.rank=4', '--config.train.learning_rate=0.05')
  assert trained.returncode == 0, trained.stderr
  assert 'adapter parameters (rank 4) on a frozen base' in trained.stdout
  sampled = commands('experiments.sample', f'--workdir={adapted}', '--prompt=the cat',
                     '--temperature=0', '--max_new_tokens=4')
  assert sampled.returncode == 0, sampled.stderr

  merged = tmp_path / 'merged'
  result = commands('experiments.merge', f'--workdir={adapted}', f'--output={merged}')
  assert result.returncode == 0, result.stderr
  again = commands('experiments.merge', f'--workdir={workdir}', f'--output={tmp_path / "m2"}')
  assert again.returncode != 0 and 'nothing to merge' in again.stderr
  assert len(again.stderr.strip().splitlines()) == 1
  run_merged = checkpointing.restore_for_inference(str(merged))
  assert run_merged.config.lora.rank == 0 and str(adapted) in run_merged.config.merged_from
  exported = commands('experiments.convert', '--to_hf', f'--workdir={merged}',
                      f'--output={tmp_path / "out"}')
  assert exported.returncode == 0, exported.stderr
  direct = commands('experiments.convert', '--to_hf', f'--workdir={adapted}',
                    f'--output={tmp_path / "direct"}')
  assert direct.returncode == 0, direct.stderr
  ids = fast('the cat sat\ndef f(x):\n    return x').input_ids
  opened = [logits(transformers.AutoModelForCausalLM.from_pretrained(
      tmp_path / name, dtype=torch.float32).eval(), ids) for name in ('out', 'direct')]
  np.testing.assert_array_equal(opened[0], opened[1])
  assert not np.allclose(opened[0], logits(reference, ids), atol=1e-3)  # The adapters moved.
  tokens = np.asarray([ids], np.int32)
  ours = run_merged.model.apply({'params': run_merged.params}, tokens, np.ones_like(tokens),
                                np.arange(len(ids), dtype=np.int32)[None])[0]
  np.testing.assert_allclose(np.asarray(ours), opened[0], rtol=1e-4, atol=1e-4)
