"""Released models' shapes, from their published config.json: start one from scratch, or
load its weights with `python -m experiments.convert --from_hf=DIR` and fine-tune that.

  python -m experiments.train --config=experiments/configs/open_models.py:llama3_2_1b \
      --config.mesh.fsdp=-1 --config.mesh.data=1 --workdir=/tmp/llama_1b

Variants: llama3_2_1b, llama3_8b, qwen2_5_0_5b, qwen3_0_6b, mistral_7b, mamba_130m. The
model fields come from the dicts below through lm/interop/hf.py, the same path an import
takes, so a run started here has exactly the parameters of the released checkpoint.
"""

from experiments.configs import default
from lm.interop import hf

PUBLISHED = {
    'llama3_2_1b': dict(
        architectures=['LlamaForCausalLM'], model_type='llama', vocab_size=128256,
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, head_dim=64,
        max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling=dict(rope_type='llama3', factor=32.0, low_freq_factor=1.0,
                          high_freq_factor=4.0, original_max_position_embeddings=8192),
        tie_word_embeddings=True, hidden_act='silu', attention_bias=False, mlp_bias=False,
        torch_dtype='bfloat16', bos_token_id=128000, eos_token_id=128001),
    'llama3_8b': dict(
        architectures=['LlamaForCausalLM'], model_type='llama', vocab_size=128256,
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
        rms_norm_eps=1e-5, rope_theta=500000.0, rope_scaling=None, tie_word_embeddings=False,
        hidden_act='silu', attention_bias=False, torch_dtype='bfloat16',
        bos_token_id=128000, eos_token_id=128001),
    'qwen2_5_0_5b': dict(
        architectures=['Qwen2ForCausalLM'], model_type='qwen2', vocab_size=151936,
        hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
        num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
        rms_norm_eps=1e-6, rope_theta=1000000.0, sliding_window=32768,
        use_sliding_window=False, max_window_layers=24, tie_word_embeddings=True,
        hidden_act='silu', torch_dtype='bfloat16', bos_token_id=151643,
        eos_token_id=151643),
    'qwen3_0_6b': dict(
        architectures=['Qwen3ForCausalLM'], model_type='qwen3', vocab_size=151936,
        hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
        num_attention_heads=16, num_key_value_heads=8, head_dim=128,
        max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1000000.0,
        attention_bias=False, use_sliding_window=False, sliding_window=None,
        tie_word_embeddings=True, hidden_act='silu', torch_dtype='bfloat16',
        bos_token_id=151643, eos_token_id=151645),
    'mistral_7b': dict(
        architectures=['MistralForCausalLM'], model_type='mistral', vocab_size=32000,
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=32768,
        sliding_window=4096, rms_norm_eps=1e-5, rope_theta=10000.0,
        tie_word_embeddings=False, hidden_act='silu', torch_dtype='bfloat16',
        bos_token_id=1, eos_token_id=2),
    'mamba_130m': dict(
        architectures=['MambaForCausalLM'], model_type='mamba', vocab_size=50280,
        hidden_size=768, intermediate_size=1536, num_hidden_layers=24, state_size=16,
        expand=2, conv_kernel=4, time_step_rank=48, layer_norm_epsilon=1e-5,
        use_bias=False, use_conv_bias=True, hidden_act='silu', tie_word_embeddings=True,
        torch_dtype='float32', bos_token_id=0, eos_token_id=0, pad_token_id=0),
}


def get_config(variant: str = 'llama3_2_1b'):
  if variant not in PUBLISHED:
    raise ValueError(f'unknown variant {variant!r}; one of {sorted(PUBLISHED)}')
  config = default.get_config()
  config.model = hf.model_config(PUBLISHED[variant], config.model, f'{variant} (published)')
  config.model.remat = 'full'  # Activations of billion-parameter models dominate memory.
  config.data.update(seq_len=2048, batch_size=8)
  config.train.update(learning_rate=3e-4, warmup_steps=100, sample_tokens=120)
  return config
