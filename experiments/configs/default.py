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
      rope_scaling=ml_collections.ConfigDict(dict(
          kind='none', factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
          original_max_len=8192)),
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
      # DPO's loss (lm/training/losses.py): 'sigmoid' (DPO) | 'robust' (rDPO) | 'ipo' |
      # 'hinge' (SLiC) | 'simpo' | 'orpo'; SimPO and ORPO need no reference model.
      dpo_loss='sigmoid',
      # DPO's beta: how far from the reference the policy may move; IPO's tau; SimPO's
      # reward scale (its paper uses 2 to 2.5); ORPO does not read it.
      dpo_beta=0.1,
      dpo_nll_weight=0.0,  # > 0: plus this x the chosen responses' per-token NLL (RPO).
      # 'sigmoid' (cDPO) and 'robust': the probability that a pair's label is flipped.
      dpo_label_smoothing=0.0,
      dpo_simpo_gamma=0.5,  # 'simpo': the target reward margin gamma.
      dpo_orpo_lambda=0.1,  # 'orpo': the weight of the odds-ratio term beside the NLL.
      grpo=ml_collections.ConfigDict(dict(
          reward='python_function',  # By name, from lm/objectives/rewards.py.
          group_size=8,  # Completions per prompt; data.batch_size counts prompts.
          max_new_tokens=256,  # Per completion; the prompt gets the rest of data.seq_len.
          temperature=0.7,  # Of the sampling policy, the one that is trained.
          kl_weight=0.04,  # Of the per-token KL penalty to the reference.
          updates_per_rollout=1,  # Optimizer steps on each rollout (GRPO's mu).
          clip_epsilon=0.2,  # PPO's clip on pi / pi_sampler, once updates_per_rollout > 1.
      )),
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
  ))

  # Low-rank adapters (lm/lora.py; configs/sft_lora.py): with rank > 0 a run trains only
  # adapters on the frozen model of train.init_from, and its checkpoints hold only them.
  config.lora = ml_collections.ConfigDict(dict(
      rank=0,  # 0: train every weight.
      alpha=16.0,  # The adapters' product is scaled by alpha / rank.
      dropout=0.0,  # On the adapters' input, in training.
      # Groups 'attention', 'mlp', 'mamba' or layer names (lm/lora.py LAYERS).
      targets='attention,mlp,mamba',
      # QLoRA: 'int8' | 'int4' | 'nf4' stores the base's block matrices quantized.
      base_dtype='',
      tile_size=64,  # 4-bit: one scale per this many inputs.
  ))

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
