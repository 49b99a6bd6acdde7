"""Generation throughput on a mixed workload: the engine (continuous batching over pages)
against static batching (lm.sampling.generate), as a table.

  python -m experiments.benchmark_engine [--requests=256 --slots=32] [--transformers]
      [--min_new=16 --max_new=512 --min_prompt=8 --max_prompt=256]
      [--config.model.num_layers=12 --config.model.embed_dim=768 ...]

Requests draw their prompt length and their number of new tokens log-uniformly between
the bounds (a few long ones among many short, as chat and chain-of-thought give), from
--seed. Greedy decoding with no stop id, so each request generates exactly its number of
tokens in both paths; random weights (speed does not depend on them).

- static: batches of --slots requests in arrival order, each padded to its longest
  prompt and run for its longest completion (lm.sampling.generate): what `lm` did before
  the engine, a row that finished early holding its slot.
- engine: the same requests through lm.engine with --slots slots, as many pages as
  static batching's largest cache holds (the same memory).
- transformers (--transformers): the model exported to Hugging Face's format and run by
  transformers' `generate` on the same batches as static, left-padded, PyTorch on the
  same device kind (its CPU build here).

Tokens/s counts generated tokens only, over the best wall time of --repeats runs of
each path taken in turn, after a first run that compiles every shape it meets.
"""

import time

from absl import app, flags
import flax.linen as nn
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np

from lm import config as config_lib
from lm import models, sampling
from lm.engine.engine import Engine, SamplingParams
from lm.tokenizer import ByteTokenizer

_CONFIG = config_flags.DEFINE_config_file(
    'config', 'experiments/configs/default.py', 'Config whose model to run; override '
    'fields as --config.model.FIELD=VALUE for a larger model.')
_REQUESTS = flags.DEFINE_integer('requests', 256, 'Requests in the workload.')
_SLOTS = flags.DEFINE_integer('slots', 32, 'Rows of a batch (static) or slots (engine).')
_MIN_NEW, _MAX_NEW = (flags.DEFINE_integer('min_new', 16, 'Fewest new tokens of a request.'),
                      flags.DEFINE_integer('max_new', 512, 'Most new tokens of a request.'))
_MIN_PROMPT, _MAX_PROMPT = (flags.DEFINE_integer('min_prompt', 8, 'Shortest prompt.'),
                            flags.DEFINE_integer('max_prompt', 256, 'Longest prompt.'))
_PAGE_SIZE = flags.DEFINE_integer('page_size', 16, "The engine's page size.")
_CHUNK = flags.DEFINE_integer('chunk', 16, "The engine's prefill chunk (smaller suits the CPU).")
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of the workload.')
_DTYPE = flags.DEFINE_string('dtype', 'auto', 'Compute dtype (auto: bf16 on GPU/TPU).')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Timed runs of each path, taken in turn; the'
                                ' best is shown (this machine is shared).')
_TRANSFORMERS = flags.DEFINE_bool(
    'transformers', False, "Also time transformers' generate (PyTorch, the model exported"
    ' with lm.interop.hf) on batches of --slots, left-padded.')


def workload(vocab_size: int) -> list[tuple[list[int], int]]:
  """(prompt ids, new tokens) of each request, log-uniform lengths."""
  rng = np.random.default_rng(_SEED.value)
  draw = lambda low, high: int(np.exp(rng.uniform(np.log(low), np.log(high + 1))))
  return [([int(t) for t in rng.integers(3, vocab_size, size=draw(_MIN_PROMPT.value,
                                                                   _MAX_PROMPT.value))],
           draw(_MIN_NEW.value, _MAX_NEW.value)) for _ in range(_REQUESTS.value)]


def run_static(model, params, requests) -> None:
  stop = jnp.asarray([-1], jnp.int32)
  for start in range(0, len(requests), _SLOTS.value):
    batch = requests[start:start + _SLOTS.value]
    prompts_bt, lengths_b = sampling.pad_prompts([p for p, _ in batch], pad_id=0)
    new = max(n for _, n in batch)
    out, _ = sampling.generate(params, jnp.asarray(prompts_bt), jnp.asarray(lengths_b),
                               jax.random.key(0), stop, model=model, max_new_tokens=new,
                               cache_length=prompts_bt.shape[1] + new)
    out.block_until_ready()


def run_engine(engine, requests) -> None:
  engine.pool.clear_cache()  # No prompt of this run is found cached from the last.
  completions = engine.generate([p for p, _ in requests],
                                [SamplingParams(max_tokens=n, stop_ids=()) for _, n in requests])
  assert [len(c.token_ids) for c in completions] == [n for _, n in requests]


def transformers_run(model, params):
  """The same model in transformers (float32), and a run of the workload through its
  generate: each batch until its longest completion, as static batching."""
  import tempfile  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  from lm.interop import hf  # pylint: disable=import-outside-toplevel
  directory = tempfile.mkdtemp()
  hf.save_model(directory, model.config, params)
  theirs = transformers.AutoModelForCausalLM.from_pretrained(directory,
                                                            dtype=torch.float32).eval()

  def run(requests):
    for start in range(0, len(requests), _SLOTS.value):
      batch = requests[start:start + _SLOTS.value]
      longest, new = max(len(p) for p, _ in batch), max(n for _, n in batch)
      ids = torch.zeros((len(batch), longest), dtype=torch.long)
      mask = torch.zeros_like(ids)
      for row, (prompt, _) in enumerate(batch):  # Left-padded, as generate wants.
        ids[row, longest - len(prompt):] = torch.tensor(prompt)
        mask[row, longest - len(prompt):] = 1
      with torch.no_grad():
        theirs.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                        do_sample=False, eos_token_id=None, pad_token_id=0)
  return run


def main(argv):
  del argv
  config = _CONFIG.value
  dtype = config.model.dtype = config_lib.resolve_dtype(_DTYPE.value)
  longest = _MAX_PROMPT.value + _MAX_NEW.value
  config.model.max_seq_len = max(config.model.max_seq_len, longest + 64)
  model = models.build(config.model)
  params = nn.meta.unbox(models.init_variables(model, jax.random.key(0))['params'])
  requests = workload(config.model.vocab_size)
  tokens = sum(n for _, n in requests)
  # The same memory: static batching's largest cache is slots x (padded prompt + new).
  static_slots = _SLOTS.value * (-(-_MAX_PROMPT.value // 64) * 64 + _MAX_NEW.value)
  engine = Engine(model, params, ByteTokenizer(), slots=_SLOTS.value,
                  page_size=_PAGE_SIZE.value, chunk=_CHUNK.value, max_length=longest,
                  num_pages=static_slots // _PAGE_SIZE.value + 1)
  paths = [('static', lambda r: run_static(model, params, r)),
           ('engine', lambda r: run_engine(engine, r))]
  if _TRANSFORMERS.value:
    paths.append(('transformers', transformers_run(model, params)))
  for _, run in paths:
    run(requests)  # Compiles every shape it meets (static: one per batch's lengths).
  best = {name: float('inf') for name, _ in paths}
  for _ in range(_REPEATS.value):
    for name, run in paths:
      start = time.perf_counter()
      run(requests)
      best[name] = min(best[name], time.perf_counter() - start)
  rows = [(name, seconds, tokens / seconds) for name, seconds in best.items()]
  params_count = sum(x.size for x in jax.tree.leaves(params))
  print(f'{len(requests)} requests, {tokens:,} new tokens (prompts {_MIN_PROMPT.value}-'
        f'{_MAX_PROMPT.value}, new {_MIN_NEW.value}-{_MAX_NEW.value}, log-uniform), '
        f'{_SLOTS.value} slots, {params_count:,} params, {dtype}, {jax.devices()[0].device_kind}')
  print('| path | wall s | new tokens/s | engine vs this |')
  print('|---|---|---|---|')
  for name, seconds, rate in rows:
    print(f'| {name} | {seconds:.1f} | {rate:,.0f} | {rows[1][2] / rate:.2f}x |')


if __name__ == '__main__':
  app.run(main)
