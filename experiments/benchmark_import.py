"""Importing a Hugging Face checkpoint: lm's loader against transformers' from_pretrained.

  python -m experiments.benchmark_import --shape=llama3_2_1b --directory=/tmp/llama_1b

Makes the checkpoint once if `directory` has none (random weights of a released shape
from experiments/configs/open_models.py, saved by transformers as bf16 safetensors), then
loads it in a fresh process each way and prints a table: seconds to load, peak resident
memory of the process once loaded (VmHWM: the libraries included), and the logits of both
on one prompt, computed in float32 from the same bf16 weights. Needs torch and
transformers (the `test` extra).
"""

import json
import os
import subprocess
import sys
import time

from absl import app, flags
import numpy as np

_SHAPE = flags.DEFINE_string('shape', 'llama3_2_1b', 'A variant of configs/open_models.py.')
_DIRECTORY = flags.DEFINE_string('directory', '/tmp/lm_import_benchmark', 'Checkpoint dir.')
_LOADER = flags.DEFINE_string('loader', None, 'Internal: run one loader in this process.')

PROMPT_IDS = [1, 450, 4996, 17354, 1701, 432, 1258, 975, 278, 17366, 11203, 29889]


def make_checkpoint(shape: str, directory: str) -> None:
  import torch
  import transformers
  from experiments.configs import open_models
  published = dict(open_models.PUBLISHED[shape])
  config = transformers.AutoConfig.for_model(**published)
  torch.manual_seed(0)
  model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
  model.save_pretrained(directory)


def load_lm(directory: str) -> np.ndarray:
  import jax
  from experiments.configs import default
  from lm import models, sharding
  from lm.interop import hf
  from lm.training import checkpointing
  jax.devices()
  libraries, start = _peak_gib(), time.perf_counter()
  base = default.get_config().model
  base.dtype = 'float32'
  config = hf.model_config(hf.read_json(os.path.join(directory, 'config.json'), directory), base)
  model = models.build(config)
  mesh = sharding.inference_mesh(config.embed_dim)
  params = hf.load_params(directory, config, checkpointing.abstract_params(model, mesh))
  jax.block_until_ready(params)
  seconds, peak = time.perf_counter() - start, (libraries, _peak_gib())
  tokens = np.array([PROMPT_IDS], np.int32)
  positions = np.arange(len(PROMPT_IDS))[None]
  with sharding.activate(mesh):
    logits = np.asarray(model.apply({'params': params}, tokens, np.ones_like(tokens),
                                    positions)[0])
  return seconds, (*peak, _peak_gib()), logits


def load_transformers(directory: str) -> np.ndarray:
  import torch
  import transformers
  libraries, start = _peak_gib(), time.perf_counter()
  model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16)
  seconds, peak = time.perf_counter() - start, (libraries, _peak_gib())
  model = model.eval()
  with torch.no_grad():
    logits = model.float()(torch.tensor([PROMPT_IDS])).logits[0].numpy()
  return seconds, (*peak, _peak_gib()), logits


def _peak_gib() -> float:
  """This process's peak resident memory (Linux's VmHWM: unlike ru_maxrss, it starts
  afresh at exec, not at the parent's peak)."""
  with open('/proc/self/status') as f:
    kib = next(int(line.split()[1]) for line in f if line.startswith('VmHWM:'))
  return kib / 2**20


def main(argv):
  del argv
  directory = _DIRECTORY.value
  if _LOADER.value:
    load = {'lm': load_lm, 'transformers': load_transformers}[_LOADER.value]
    seconds, peak, logits = load(directory)
    np.save(os.path.join(directory, f'logits_{_LOADER.value}.npy'), logits)
    print(json.dumps({'seconds': seconds, 'peak_gib': peak}))
    return
  if not os.path.isfile(os.path.join(directory, 'config.json')):
    make_checkpoint(_SHAPE.value, directory)
  size = sum(os.path.getsize(os.path.join(directory, name)) for name in os.listdir(directory)
             if name.endswith('.safetensors'))
  rows = []
  for loader in ('lm', 'transformers'):
    result = subprocess.run([sys.executable, '-m', 'experiments.benchmark_import',
                             f'--directory={directory}', f'--loader={loader}'],
                            capture_output=True, text=True, check=True,
                            env={**os.environ, 'JAX_PLATFORMS': os.environ.get('JAX_PLATFORMS',
                                                                                'cpu')})
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    rows.append((loader, measured['seconds'], *measured['peak_gib']))
  ours, theirs = (np.load(os.path.join(directory, f'logits_{name}.npy'))
                  for name in ('lm', 'transformers'))
  error = float(np.abs(ours - theirs).max() / np.abs(theirs).max())
  print(f'{_SHAPE.value}: {size / 2**30:.2f} GiB of bf16 safetensors in {directory}')
  print('| loader | load s | peak RSS GiB: imports | loaded | after one forward |')
  print('|---|---|---|---|---|')
  for loader, seconds, libraries, peak, used in rows:
    print(f'| {loader} | {seconds:.1f} | {libraries:.2f} | {peak:.2f} | {used:.2f} |')
  print(f'logits on {len(PROMPT_IDS)} tokens: max |lm - transformers| / max |transformers|'
        f' = {error:.2e}; same argmax at {int((ours.argmax(-1) == theirs.argmax(-1)).sum())}'
        f' of {len(PROMPT_IDS)} positions')


if __name__ == '__main__':
  app.run(main)
