"""Low-rank adapters (LoRA, Hu et al. 2021) and a quantized frozen base (QLoRA, Dettmers
et al. 2023), through qwix.

qwix intercepts the matrix products of the chosen Dense layers: each weight W [in..., out...]
gains `kernel_lora_a` [prod(in), r] and `kernel_lora_b` [r, prod(out)] beside it, and the
layer computes x W + (alpha / r) dropout(x) A B. B starts at zero, so an adapted model
starts as its base. The adapters take their logical axis names from W's (the first input
and output axes), so the one rules table shards them. With `base_dtype` set, the base's
block matrices are stored quantized (qwix's PTQ: int8 per output channel, 4-bit in tiles
of `tile_size` inputs) and dequantized in the product.

A run trains the adapters alone (the train state's params); the base is a separate,
frozen tree that `combine` joins with them for the model.
"""

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import qwix

from lm import models, quantization
from lm.errors import check, check_number

# The Dense layers of lm's blocks, by module name, and the groups `targets` may name.
LAYERS = ('query', 'key', 'value', 'out', 'wi_gate', 'wi_up', 'wo', 'in_proj', 'x_proj',
          'dt_proj', 'out_proj')
GROUPS = {'attention': ('query', 'key', 'value', 'out'), 'mlp': ('wi_gate', 'wi_up', 'wo'),
          'mamba': ('in_proj', 'out_proj')}
# The layers each kind of block (a layer_pattern name) holds.
BLOCK_LAYERS = {'attention': GROUPS['attention'] + GROUPS['mlp'],
                'mamba': ('in_proj', 'x_proj', 'dt_proj', 'out_proj')}
BASE_DTYPES = ('', 'int8', 'int4', 'nf4')  # '' keeps the base as the checkpoint holds it.
# What QLoRA stores quantized, adapted or not: what a quantized run stores (all but
# dt_proj, whose input, dt_rank, is too narrow to tile).
QUANTIZED = quantization.LAYERS
ADAPTER_SUFFIXES = ('_lora_a', '_lora_b')


def default_config() -> ml_collections.ConfigDict:
  """config.lora (experiments/configs/sft_lora.py): with rank > 0 a run trains only
  adapters on the frozen model of train.init_from, and its checkpoints hold only them."""
  return ml_collections.ConfigDict(dict(
      rank=0,  # 0: train every weight.
      alpha=16.0,  # The adapters' product is scaled by alpha / rank.
      dropout=0.0,  # On the adapters' input, in training.
      # Groups 'attention', 'mlp', 'mamba' or layer names (LAYERS).
      targets='attention,mlp,mamba',
      # QLoRA: 'int8' | 'int4' | 'nf4' stores the base's block matrices quantized.
      base_dtype='',
      tile_size=64,  # 4-bit: one scale per this many inputs.
  ))


def enabled(lora_config) -> bool:
  return lora_config.rank > 0


def target_layers(targets: str) -> tuple[str, ...]:
  """'attention, wo' -> ('query', 'key', 'value', 'out', 'wo')."""
  names = []
  for name in (part.strip() for part in targets.split(',') if part.strip()):
    for layer in GROUPS.get(name, (name,)):
      if layer not in names:
        names.append(layer)
  return tuple(names)


def validate(config) -> None:
  """config.lora's fields, named in one line when wrong."""
  lora = config.lora
  check_number('config.lora.rank', lora.rank, at_least=0, why='0: no adapters')
  if not enabled(lora):
    return
  check_number('config.lora.alpha', lora.alpha, above=0)
  check_number('config.lora.dropout', lora.dropout, at_least=0, below=1)
  check_number('config.lora.tile_size', lora.tile_size, at_least=1)
  layers = target_layers(lora.targets)
  check(layers, 'config.lora.targets is empty: name layers or groups, such as'
        f' "attention,mlp" (groups {sorted(GROUPS)}; layers {", ".join(LAYERS)})')
  for layer in layers:
    check(layer in LAYERS, f'config.lora.targets: {layer!r} is not one of the groups'
          f' {sorted(GROUPS)} or the layers {", ".join(LAYERS)}')
  check(lora.base_dtype in BASE_DTYPES,
        f'config.lora.base_dtype={lora.base_dtype!r} is not one of {BASE_DTYPES}')
  kinds = set(part.strip() for part in config.model.layer_pattern.split(',') if part.strip())
  present = [layer for layer in layers if any(layer in BLOCK_LAYERS.get(kind, ())
                                               for kind in kinds)]
  check(present, f'config.lora.targets={lora.targets!r} names no layer of this model'
        f' (layer_pattern {config.model.layer_pattern!r}): no adapter would train')
  # An adapter's rank past its weight's smaller side adds nothing but memory.
  smallest = min(min(_sides(config.model, layer)) for layer in present)
  check(lora.rank <= smallest,
        f'config.lora.rank={lora.rank} exceeds {smallest}, the smaller side of the smallest'
        f' weight it adapts ({", ".join(present)})')
  check(config.train.init_from, 'config.lora.rank > 0 adapts a trained model: give its run'
        ' as config.train.init_from')
  # Each quantized matrix's innermost input axis splits into tiles.
  quantization.check_tiles(config.model, set(layers) | set(QUANTIZED), lora.base_dtype,
                           lora.tile_size, 'config.lora.tile_size')


def _sides(model, layer: str) -> tuple[int, int]:
  """(inputs, outputs) of `layer`'s weight."""
  inner = model.mamba_expand * model.embed_dim
  heads, kv_heads = model.num_heads * model.head_dim, model.num_kv_heads * model.head_dim
  return {'query': (model.embed_dim, heads), 'key': (model.embed_dim, kv_heads),
          'value': (model.embed_dim, kv_heads), 'out': (heads, model.embed_dim),
          'wi_gate': (model.embed_dim, model.mlp_dim), 'wi_up': (model.embed_dim, model.mlp_dim),
          'wo': (model.mlp_dim, model.embed_dim), 'in_proj': (model.embed_dim, 2 * inner),
          'x_proj': (inner, model.mamba_dt_rank + 2 * model.mamba_state_dim),
          'dt_proj': (model.mamba_dt_rank, inner), 'out_proj': (inner, model.embed_dim)}[layer]


def wrap(model: nn.Module, lora_config, *, train: bool, quantize: bool = True) -> nn.Module:
  """A copy of `model` whose target layers carry adapters (dropout only when `train`:
  qwix applies it on every call) and, with base_dtype and `quantize`, whose block
  matrices are quantized. Initialise adapters with quantize=False: qwix 0.1.8 creates
  none for a quantized DenseGeneral (attention) at init, though it applies them."""
  quantized = (lora_config.base_dtype or None) if quantize else None
  rules = [qwix.LoraRule(
      module_path=quantization.path_regex(target_layers(lora_config.targets)),
      rank=lora_config.rank, alpha=float(lora_config.alpha),
      dropout=lora_config.dropout if train else 0.0, weight_qtype=quantized,
      tile_size=_tile(lora_config))]
  if quantized:  # QLoRA stores every block matrix quantized, adapted or not.
    rules.append(quantization.rule(quantized, lora_config.tile_size, QUANTIZED))
  return qwix.apply_lora_to_model(model.clone(), qwix.LoraProvider(rules))


def _tile(lora_config):
  # int8 keeps one scale per output channel; 4 bits need smaller blocks (QLoRA's: 64).
  return lora_config.tile_size if lora_config.base_dtype in quantization.TILED else None


def abstract_split(model: nn.Module, lora_config) -> tuple[dict, dict]:
  """(base as the adapted model stores it, adapters), boxed ShapeDtypeStructs."""
  def params(wrapped):
    return jax.eval_shape(lambda rng: models.init_variables(wrapped, rng)['params'],
                          jax.random.key(0))
  base = split(params(wrap(model, lora_config, train=False)))[0]
  adapters = split(params(wrap(model, lora_config, train=False, quantize=False)))[1]
  return base, adapters


def is_adapter(path) -> bool:
  name = getattr(path[-1], 'key', '')
  return isinstance(name, str) and name.endswith(ADAPTER_SUFFIXES)


def split(params) -> tuple[dict, dict]:
  """(base, adapters) of an adapted model's params (nested dicts, boxed or not)."""
  flat = flax.traverse_util.flatten_dict(params, is_leaf=_is_param_leaf)
  adapter = lambda key: key[-1].endswith(ADAPTER_SUFFIXES)
  unflatten = flax.traverse_util.unflatten_dict
  return (unflatten({key: value for key, value in flat.items() if not adapter(key)}),
          unflatten({key: value for key, value in flat.items() if adapter(key)}))


def _is_param_leaf(_, value) -> bool:
  # A quantized weight (qwix's WithAux) or a boxed one is one parameter, not a subtree.
  return not isinstance(value, dict)


def combine(base: dict, adapters: dict) -> dict:
  """The adapted model's params: `base` with `adapters` beside their weights."""
  flat = flax.traverse_util.flatten_dict(base, is_leaf=_is_param_leaf)
  flat.update(flax.traverse_util.flatten_dict(adapters, is_leaf=_is_param_leaf))
  return flax.traverse_util.unflatten_dict(flat)


def quantize_base(params: dict, stored_boxed: dict) -> dict:
  """A plain model's params as the adapted model stores its base: the quantized layers'
  weights quantized (qwix), the rest as they are. `stored_boxed`: the base half of the
  adapted model's init (abstract)."""
  return quantization.quantize_params(params, stored_boxed)


dequantize = quantization.dequantize  # The base with every quantized weight in float.


def merge(base: dict, adapters: dict, lora_config) -> dict:
  """Plain params of the base model (float, as `base` holds them, dequantized if stored
  quantized) with each adapter folded in: W + (alpha / r) A B, reshaped to W's shape (a
  Dense kernel lists its input axes, then its output axes)."""
  scale = lora_config.alpha / lora_config.rank
  merged = flax.traverse_util.flatten_dict(dequantize(base), is_leaf=_is_param_leaf)
  flat_adapters = flax.traverse_util.flatten_dict(adapters)
  for key, a in flat_adapters.items():
    if not key[-1].endswith('_lora_a'):
      continue
    weight_key = (*key[:-1], key[-1][:-len('_lora_a')])
    b = flat_adapters[(*key[:-1], weight_key[-1] + '_lora_b')]
    weight = merged[weight_key]
    delta = jnp.matmul(a.astype(jnp.float32), b.astype(jnp.float32)) * scale
    merged[weight_key] = (weight.astype(jnp.float32) + delta.reshape(weight.shape)).astype(
        weight.dtype)
  return flax.traverse_util.unflatten_dict(merged)


class WithDropoutRng:
  """An adapted model whose `apply` draws the adapters' dropout masks from `rng` (the
  objectives call model.apply without rngs)."""

  def __init__(self, model: nn.Module, rng: jax.Array):
    self.model, self.rng, self.config = model, rng, model.config

  def apply(self, variables, *args, **kwargs):
    return self.model.apply(variables, *args, rngs={'dropout': self.rng}, **kwargs)
