"""Default: a small Transformer on the Python standard library's own source code.

Needs no download: the corpus is the stdlib's .py files (tests excluded), with whole
top-level modules held out for validation; bytes are the tokens.

  python -m experiments.train --config=experiments/configs/default.py --workdir=/tmp/lm_default

On a 2-core CPU this takes about 10 minutes; validation loss falls from about 5.6
(uniform over 259 byte ids) to about 1.7 nats per byte, and a generated sample is
printed at the end. `--config=experiments/configs/default.py:tiny` shrinks every size
for a run of seconds; `:accelerator` is a larger model for one TPU host or GPU (bf16, FSDP,
the Pallas kernels; the Colab notebooks' TPU setting).
"""

import ml_collections

from lm import lora, objectives
from lm.models import layers


def get_config(variant: str = '') -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0

  config.model = ml_collections.ConfigDict(dict(
      # lm.models.MODELS ('decoder': the block stack of layer_pattern), or 'from_init': the
      # model and tokenizer of train.init_from (an imported one), keeping dtype, attention,
      # remat and mamba_scan from here.
      name='decoder',
      vocab_size=264,  # The byte tokenizer's 259 ids, rounded up to a multiple of 8.
      num_layers=4,
      layer_pattern='attention',  # Repeated over the layers: 'mamba', 'mamba,attention', ...
      embed_dim=128,
      num_heads=4,
      num_kv_heads=2,
      head_dim=32,
      mlp_dim=384,
      max_seq_len=1024,
      rope_theta=10_000.0,
      # Long-context RoPE rescaling: kind 'none' | 'llama3' (Llama 3.1's rule, with these).
      rope_scaling=ml_collections.ConfigDict(layers.NO_ROPE_SCALING),
      tie_embeddings=True,
      scale_embeddings=True,  # Inputs x sqrt(embed_dim); imported models do not scale.
      qkv_bias=False,  # Biases on query, key and value (Qwen2).
      attention_out_bias=False,  # A bias on the attention output (Llama's attention_bias).
      qk_norm=False,  # RMSNorm of each head's query and key before RoPE (Qwen3).
      # Each token attends to itself and the sliding_window - 1 tokens before it
      # (Mistral's); 0: to every earlier token of its document.
      sliding_window=0,
      norm_eps=1e-6,
      dtype='auto',  # bfloat16 on GPU/TPU, float32 on CPU; or 'float32', 'bfloat16'.
      param_dtype='float32',  # Of the weights (Dense and embedding); norms stay float32.
      attention='xla',  # 'xla' | 'cudnn' | 'pallas' (our flash-attention and decode kernels)
      kv_cache_dtype='',  # Of the decoding cache: '' (the compute dtype) | 'int8'.
      remat='none',  # 'none' | 'full' | 'save_dots'
      # Mamba layers (used where layer_pattern names them).
      mamba_expand=2,  # Inner width = mamba_expand * embed_dim.
      mamba_state_dim=16,
      mamba_dt_rank=8,  # About embed_dim / 16, as in the paper.
      mamba_conv_width=4,
      # 'pallas': the selective-scan kernel on GPU/TPU, 'chunked' elsewhere | 'chunked'
      # (associative scan in chunks) | 'reference' (lax.scan over time).
      mamba_scan='pallas',
  ))

  config.tokenizer = ml_collections.ConfigDict(dict(
      kind='byte',  # 'byte' | 'sentencepiece'
      path='',  # The .model file for sentencepiece (python -m experiments.train_tokenizer).
  ))

  config.data = ml_collections.ConfigDict(dict(
      # Pretraining: 'stdlib' | 'text' (files/globs, one document each) | 'jsonl'.
      # Post-training: 'stdlib_functions' (built in) | 'stdlib_chats' (built in
      # conversations, SFT) | 'jsonl' with fields prompt and response or messages (SFT),
      # prompt, chosen and rejected (DPO) or prompt and any fields its reward reads
      # (GRPO); prompt, response, chosen and rejected may be lists of messages.
      source='stdlib',
      path='',  # Comma-separated files or globs for 'text' and 'jsonl'.
      text_field='text',  # The JSON field holding the document, for pretraining on 'jsonl'.
      # A non-UTF-8 file, or a JSON line that is not an object with the fields as strings:
      # 'error' refuses the run at start naming it; 'skip' leaves it out, counted in the log.
      bad_records='error',
      validation_fraction=0.05,  # Of document groups (files; stdlib top-level modules).
      seq_len=128,
      batch_size=32,  # Global, across all devices and processes.
      # The documents are split into this many streams, each packed on its own, that
      # make up each batch; each process runs an equal share. 0: one per process. Runs
      # with the same number of streams see the same batches on any number of processes.
      streams=0,
      # Packed rows (pretraining: long files fill many rows) or examples (post-training:
      # a file holds many) shuffled together.
      shuffle_window=16384,
  ))

  config.train = ml_collections.ConfigDict(dict(
      # 'pretrain' | 'sft' | 'dpo' | 'grpo' (configs/sft.py, dpo.py, grpo.py)
      objective='pretrain',
      init_from='',  # A workdir whose params start this run (and are the reference of
      init_from_step=-1,  # DPO and GRPO), from this step of it; -1: its latest at start.
      num_steps=1500,
      learning_rate=2e-3,
      warmup_steps=100,
      final_learning_rate_ratio=0.1,
      weight_decay=0.1,
      beta1=0.9,
      beta2=0.95,
      epsilon=1e-8,
      grad_clip_norm=1.0,
      grad_accumulation_steps=1,
      z_loss_weight=1e-4,
      log_every=50,
      eval_every=250,
      eval_steps=20,
      sample_tokens=120,  # Generated within one sequence, so < data.seq_len.
      sample_temperature=0.7,
      # Each objective's own settings, with their defaults in its module:
      # config.train.dpo (lm/objectives/dpo.py), config.train.grpo (lm/objectives/grpo.py).
      **objectives.config_sections(),
  ))

  # Low-rank adapters and QLoRA, with their defaults (lm/lora.py; configs/sft_lora.py).
  config.lora = lora.default_config()

  config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))

  config.checkpoint = ml_collections.ConfigDict(dict(every_steps=250, max_to_keep=3))

  if variant == 'tiny':
    # A context of 256: evaluation scores in the model's context, so a smaller one is quicker.
    config.model.update(num_layers=2, embed_dim=64, num_heads=2, num_kv_heads=1,
                        head_dim=32, mlp_dim=128, max_seq_len=256)
    config.data.update(seq_len=64, batch_size=8, shuffle_window=64)
    config.train.update(num_steps=20, warmup_steps=5, log_every=5, eval_every=10,
                        eval_steps=2, sample_tokens=40)
    config.checkpoint.every_steps = 10
  elif variant == 'accelerator':
    # A few minutes on one TPU host (v5e-1 to v5e-8) or GPU: bf16 ('auto'), FSDP over
    # every device, the Pallas kernels (flash attention takes head_dim 128).
    config.model.update(num_layers=8, embed_dim=512, num_heads=4, num_kv_heads=4,
                        head_dim=128, mlp_dim=1536, attention='pallas', mamba_scan='pallas')
    config.data.update(seq_len=512, batch_size=64)
    config.train.update(num_steps=1000, learning_rate=1e-3, log_every=25)
    config.mesh.update(data=1, fsdp=-1, tensor=1)
  elif variant:
    raise ValueError(f'unknown config variant {variant!r}; one of "tiny", "accelerator"')
  return config
