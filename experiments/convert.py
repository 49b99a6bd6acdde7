"""Hugging Face checkpoints in and out of `lm` runs.

  python -m experiments.convert --from_hf=DIR --workdir=W
      An lm run in W (params, config, tokenizer) from a transformers checkpoint directory
      (config.json, *.safetensors, tokenizer files): Llama, Mistral, Qwen2, Qwen3, Mamba.
      Sample and evaluate it with --workdir=W; fine-tune it (SFT, DPO, GRPO or more
      pretraining) with --config.train.init_from=W --config.model.name=from_init.
  python -m experiments.convert --to_hf --workdir=W [--step=N] --output=DIR
      A directory transformers' AutoModelForCausalLM and AutoTokenizer open, from a run
      trained or imported here: the tokenizer carries the chat template lm renders the
      run's conversations with, and generation_config.json the ids generation stops at.
  python -m experiments.convert --workdir=W [--step=N] --to_gguf=FILE [--gguf_type=f16]
      One GGUF file llama.cpp runs (llama, qwen2 or qwen3 architecture) with the
      tokenizer and chat template in it; --gguf_type f32, f16, q8_0 or q4_0.
"""

import json
import os

from absl import flags
import jax

from experiments import cli
from experiments.configs import default
from lm import config as config_lib
from lm import models, sharding
from lm import tokenizer as tokenizer_lib
from lm.errors import check, check_new_directory, check_new_file, check_no_links
from lm.interop import gguf, hf
from lm.training import checkpointing

_FROM_HF = flags.DEFINE_string('from_hf', None, 'A transformers checkpoint directory to import.')
_TO_HF = flags.DEFINE_bool('to_hf', False, 'Export --workdir\'s checkpoint to --output.')
_OUTPUT = flags.DEFINE_string('output', None, 'With --to_hf: the directory to write.')
_TO_GGUF = flags.DEFINE_string('to_gguf', None, 'Export --workdir\'s checkpoint to this GGUF file.')
_GGUF_TYPE = flags.DEFINE_string('gguf_type', None, 'With --to_gguf: the weights\' type, one of'
                                 f' {", ".join(gguf.TYPES)} (default: f16).')
_WORKDIR = flags.DEFINE_string('workdir', None, 'The lm run written (import) or read (export).')
_STEP = flags.DEFINE_integer('step', None, 'With --to_hf or --to_gguf: the checkpoint step'
                             ' (default: latest).')
flags.mark_flags_as_required(['workdir'])


def import_checkpoint(directory: str, workdir: str) -> None:
  check(os.path.isdir(directory), f'--from_hf={directory}: no such directory')
  check(not os.path.exists(workdir) or os.path.isdir(workdir),
        f'--workdir={workdir} is a file, not a directory')
  checkpoints = os.path.join(os.path.abspath(workdir), 'checkpoints')
  check(not (os.path.isdir(checkpoints) and os.listdir(checkpoints)),
        f'--workdir={workdir} already holds checkpoints; give a new --workdir')
  check_no_links('--workdir', workdir)
  config = default.get_config()
  config.model = hf.model_config(
      hf.read_json(os.path.join(directory, 'config.json'), f'--from_hf={directory}'),
      config.model, os.path.join(directory, 'config.json'))
  tokenizer = tokenizer_lib.from_hf_directory(directory)
  check(config.model.vocab_size >= tokenizer.vocab_size,
        f'{directory}: config.json has vocab_size={config.model.vocab_size}, fewer than the'
        f' tokenizer\'s {tokenizer.vocab_size} ids')
  config.tokenizer.update(kind='huggingface', path=os.path.abspath(directory))
  config.imported_from = os.path.abspath(directory)
  config.model.dtype = config_lib.resolve_dtype(config.model.dtype)
  model = models.build(config.model)
  mesh = sharding.inference_mesh(config.model.embed_dim)
  params = hf.load_params(directory, config.model,
                          checkpointing.abstract_params(model, mesh))
  bad = checkpointing.non_finite(params)
  check(not bad, f'--from_hf={directory}: its weights are not finite (NaN or Inf), e.g.'
        f' {bad[0] if bad else ""}; nothing was imported')
  checkpointer = checkpointing.Checkpointer(workdir, max_to_keep=None)
  checkpointer.save_params(0, params, config, tokenizer)
  checkpointer.close()
  if jax.process_index() == 0:
    count = sum(x.size for x in jax.tree.leaves(params))
    print(f'imported {count:,} parameters ({config.model.param_dtype}) from {directory} into'
          f' {workdir}')


def export_checkpoint(workdir: str, step: int | None, output: str) -> None:
  check(output, '--to_hf needs --output=DIR')
  check_new_directory('--output', output)
  run = checkpointing.restore_for_inference(workdir, step)
  # Refuses what transformers cannot hold, and a template that cannot render, before writing.
  hf.hf_config(run.config.model)
  tokenizer = hf.export_tokenizer(run.tokenizer)
  generation = hf.generation_config(tokenizer)
  hf.save_model(output, run.config.model, run.params, hf.special_ids(tokenizer))
  if jax.process_index() == 0:
    tokenizer.save_pretrained(output, model_max_length=run.config.model.max_seq_len)
    with open(os.path.join(output, 'generation_config.json'), 'w') as f:
      json.dump(generation, f, indent=2)
    print(f'exported step {run.step} of {workdir} to {output}')


def export_gguf(workdir: str, step: int | None, path: str, gguf_type: str) -> None:
  check_new_file('--to_gguf', path)
  directory = os.path.dirname(os.path.abspath(path))
  check(os.path.isdir(directory), f'--to_gguf={path}: no such directory {directory}')
  check(gguf_type in gguf.TYPES, f'--gguf_type={gguf_type!r} is not one of {", ".join(gguf.TYPES)}')
  run = checkpointing.restore_for_inference(workdir, step)
  # Every process gathers the arrays; process 0 writes.
  counts = gguf.write(path if jax.process_index() == 0 else None, run.config.model,
                      run.params, run.tokenizer, gguf_type, sharding.to_host,
                      name=os.path.basename(os.path.abspath(workdir)))
  if jax.process_index() == 0:
    stored = ', '.join(f'{count} {kind}' for kind, count in sorted(counts.items()))
    print(f'exported step {run.step} of {workdir} to {path} ({gguf.architecture(run.config.model)},'
          f' {os.path.getsize(path):,} bytes; tensors: {stored})')


def main():
  exports = [bool(_FROM_HF.value), _TO_HF.value, _TO_GGUF.value is not None]
  check(sum(exports) == 1, 'give exactly one of --from_hf=DIR, --to_hf and --to_gguf=FILE')
  check(_GGUF_TYPE.value is None or _TO_GGUF.value is not None,
        '--gguf_type goes with --to_gguf')
  if _TO_GGUF.value is not None:
    check(_OUTPUT.value is None, '--output goes with --to_hf; --to_gguf names its file')
    export_gguf(_WORKDIR.value, _STEP.value, _TO_GGUF.value, _GGUF_TYPE.value or 'f16')
  elif _FROM_HF.value:
    check(_STEP.value is None and _OUTPUT.value is None,
          '--step and --output go with --to_hf, not --from_hf')
    import_checkpoint(_FROM_HF.value, _WORKDIR.value)
  else:
    export_checkpoint(_WORKDIR.value, _STEP.value, _OUTPUT.value)


if __name__ == '__main__':
  cli.run(main)
