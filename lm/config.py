"""Start-up checks on an experiment config: every message names the field at fault.

An objective checks its own section (lm/objectives/); lm/training/start.resolve runs
both.
"""

import jax

from lm import lora, models, sharding
from lm.data import sources
from lm.errors import check as _check
from lm.errors import check_number
from lm.models import attention, decoder, layers, mamba
from pallas_kernels import dispatch

DTYPES = ('float32', 'bfloat16')
ROPE_SCALINGS = ('none', 'llama3')
KV_CACHE_DTYPES = ('', 'int8')

# Model fields added after the first checkpoints were written, with the value that
# reproduces those checkpoints' models.
ADDED_MODEL_FIELDS = dict(
    rope_scaling=layers.NO_ROPE_SCALING,
    scale_embeddings=True, qkv_bias=False, attention_out_bias=False, qk_norm=False,
    param_dtype='float32', sliding_window=0, kv_cache_dtype='')


def fill_added_model_fields(model_config) -> None:
  """A saved config from before a field existed gets the value its model was built with."""
  for field, value in ADDED_MODEL_FIELDS.items():
    if field not in model_config:
      model_config[field] = value


def fill_added_sections(config) -> None:
  """Sections added after the first checkpoints were written, as those runs had them."""
  if 'lora' not in config:
    config.lora = lora.default_config()  # rank 0: no adapters.


def resolve_dtype(dtype: str) -> str:
  """'auto' -> bfloat16 on accelerators, float32 on CPU (where bf16 matmuls are slow)."""
  if dtype != 'auto':
    return dtype
  return 'float32' if dispatch.platform() == 'cpu' else 'bfloat16'


def _number(config, field: str, **bounds) -> None:
  """check_number on the config's dotted `field`, named as config.FIELD."""
  value = config
  for part in field.split('.'):
    value = value[part]
  check_number(f'config.{field}', value, **bounds)


def validate(config, num_devices: int, tokenizer_vocab_size: int) -> None:
  """Raises ConfigError naming the config field; runs before anything is compiled or written."""
  model, data, train = config.model, config.data, config.train
  _check(model.name in models.MODELS, f'config.model.name={model.name!r} is not one of {sorted(models.MODELS)}')
  for field in ('vocab_size', 'num_layers', 'embed_dim', 'num_heads', 'num_kv_heads',
                'head_dim', 'mlp_dim', 'max_seq_len'):
    _number(config, f'model.{field}', at_least=1)
  _number(config, 'model.norm_eps', above=0)
  _number(config, 'model.sliding_window', at_least=0, why='0: no window')
  _number(config, 'model.rope_theta', above=0)
  _check(model.head_dim % 2 == 0, f'config.model.head_dim={model.head_dim} must be even (RoPE)')
  _check(model.num_heads % model.num_kv_heads == 0,
         f'config.model.num_heads={model.num_heads} is not divisible by'
         f' config.model.num_kv_heads={model.num_kv_heads}')
  _check(model.vocab_size >= tokenizer_vocab_size,
         f'config.model.vocab_size={model.vocab_size} is smaller than the tokenizer\'s'
         f' vocabulary ({tokenizer_vocab_size} ids, config.tokenizer)')
  _check(model.dtype in DTYPES + ('auto',),
         f'config.model.dtype={model.dtype!r} is not one of {DTYPES + ("auto",)}')
  _check(model.param_dtype in DTYPES,
         f'config.model.param_dtype={model.param_dtype!r} is not one of {DTYPES}')
  _check(model.rope_scaling.kind in ROPE_SCALINGS,
         f'config.model.rope_scaling.kind={model.rope_scaling.kind!r} is not one of'
         f' {ROPE_SCALINGS}')
  if model.rope_scaling.kind == 'llama3':
    for field in ('factor', 'low_freq_factor', 'original_max_len'):
      _number(config, f'model.rope_scaling.{field}', above=0)
    _number(config, 'model.rope_scaling.high_freq_factor',
            above=model.rope_scaling.low_freq_factor)
  _check(model.attention in attention.ATTENTION_IMPLEMENTATIONS,
         f'config.model.attention={model.attention!r} is not one of'
         f' {sorted(attention.ATTENTION_IMPLEMENTATIONS)}')
  if model.attention == 'cudnn':
    _check(dispatch.platform() == 'gpu' and resolve_dtype(model.dtype) == 'bfloat16',
           'config.model.attention="cudnn" needs a GPU and config.model.dtype bfloat16'
           f' (here: {dispatch.platform()}, {resolve_dtype(model.dtype)}); use "xla"')
  _check(model.kv_cache_dtype in KV_CACHE_DTYPES,
         f'config.model.kv_cache_dtype={model.kv_cache_dtype!r} is not one of'
         f' {KV_CACHE_DTYPES} (\'\': the compute dtype)')
  kinds = decoder.parse_layer_pattern(model.layer_pattern)
  _check(all(kind in decoder.BLOCKS for kind in kinds),
         f'config.model.layer_pattern={model.layer_pattern!r}: each entry must be one of'
         f' {sorted(decoder.BLOCKS)}')
  if 'mamba' in kinds:
    for field in ('mamba_expand', 'mamba_state_dim', 'mamba_dt_rank', 'mamba_conv_width'):
      _number(config, f'model.{field}', at_least=1)
    _check(model.mamba_scan in mamba.SCANS,
           f'config.model.mamba_scan={model.mamba_scan!r} is not one of {sorted(mamba.SCANS)}')
  remats = ('none',) + tuple(decoder.REMAT_POLICIES)
  _check(model.remat in remats, f'config.model.remat={model.remat!r} is not one of {remats}')

  # A row of one token has no next token to predict.
  _check(2 <= data.seq_len <= model.max_seq_len,
         f'config.data.seq_len={data.seq_len} must be in [2, config.model.max_seq_len='
         f'{model.max_seq_len}]')
  _check(data.bad_records in sources.BAD_RECORDS,
         f'config.data.bad_records={data.bad_records!r} is not one of {sources.BAD_RECORDS}')
  _number(config, 'data.batch_size', at_least=1)
  _number(config, 'data.streams', at_least=0, why='0: one per process')
  streams = data.streams or jax.process_count()
  _check(streams % jax.process_count() == 0 and data.batch_size % streams == 0,
         f'config.data.streams={streams} must be a multiple of the {jax.process_count()}'
         f' processes and divide config.data.batch_size={data.batch_size}')
  _number(config, 'data.shuffle_window', at_least=0, why='0 or 1: no shuffle')
  _number(config, 'data.validation_fraction', above=0, below=1)
  # grain and jax.random take seeds as unsigned 32-bit integers.
  _number(config, 'seed', at_least=0, below=2**32)

  lora.validate(config)
  for field in ('num_steps', 'log_every', 'eval_every', 'eval_steps',
                'grad_accumulation_steps'):
    _number(config, f'train.{field}', at_least=1)
  # The cosine decay needs a step after the warm-up.
  _number(config, 'train.warmup_steps', at_least=0, below=train.num_steps)
  _number(config, 'train.learning_rate', above=0)
  _number(config, 'train.final_learning_rate_ratio', at_least=0, at_most=1)
  _number(config, 'train.beta1', at_least=0, below=1)
  _number(config, 'train.beta2', at_least=0, below=1)
  _number(config, 'train.epsilon', above=0)
  _number(config, 'train.weight_decay', at_least=0)
  _number(config, 'train.grad_clip_norm', above=0)
  _number(config, 'train.z_loss_weight', at_least=0)
  _number(config, 'train.sample_tokens', at_least=0, below=data.seq_len,
          why='the sample is generated within one sequence')
  _number(config, 'train.sample_temperature', at_least=0, why='0: greedy')
  _number(config, 'train.init_from_step', at_least=-1, why='-1: the latest')
  _number(config, 'checkpoint.every_steps', at_least=1)
  # 0 would delete every checkpoint of the workdir, earlier runs' included.
  _number(config, 'checkpoint.max_to_keep', at_least=1)

  mesh_shape = sharding.resolve_mesh_shape(config.mesh, num_devices)
  data_parallel = mesh_shape['data'] * mesh_shape['fsdp'] * train.grad_accumulation_steps
  _check(data.batch_size % data_parallel == 0,
         f'config.data.batch_size={data.batch_size} must be divisible by'
         f' mesh.data * mesh.fsdp * train.grad_accumulation_steps = {data_parallel}')
  for field in ('num_heads', 'num_kv_heads', 'mlp_dim', 'vocab_size'):
    _check(model[field] % mesh_shape['tensor'] == 0,
           f'config.model.{field}={model[field]} must be divisible by the tensor-parallel'
           f' mesh size {mesh_shape["tensor"]} (config.mesh.tensor)')
  inner = model.mamba_expand * model.embed_dim  # Mamba's channels, split like mlp_dim.
  _check(inner % mesh_shape['tensor'] == 0,
         f'config.model.mamba_expand * embed_dim = {inner} must be divisible by the'
         f' tensor-parallel mesh size {mesh_shape["tensor"]} (config.mesh.tensor)')
  _check(model.embed_dim % mesh_shape['fsdp'] == 0,
         f'config.model.embed_dim={model.embed_dim} must be divisible by config.mesh.fsdp'
         f'={mesh_shape["fsdp"]}')
