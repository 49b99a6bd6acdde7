"""Weight-only post-training quantization (PTQ) through qwix: a model's block matrices
stored as integers with float scales and dequantized in each matrix product (qwix
intercepts the Dense layers' dot_general). A quantized run (experiments/quantize.py)
and QLoRA's frozen base (lm/lora.py) are stored this way.

A quantized run's schemes: 'int8', one scale per output channel; 'int4', one scale per
output channel and group of `group_size` consecutive inputs (a Dense kernel lists its
input axes, then its output axes; attention's `out` reads heads x head_dim, so its groups
lie within a head or span whole heads). QLoRA's base tiles the innermost input axis
alone (`rule`: a tile of `out` spans every head). qwix's symmetric scale is
absmax / (qmax + 0.5), 127.5 for int8 and 7.5 for int4 (the top bucket holds
[qmax - 0.5, qmax + 0.5)), and q = round(w / scale), so every weight lies within
scale / 2 of q * scale.

The embedding, the output head, the norms and Mamba's dt_proj (whose input, dt_rank, is
too narrow to group) stay as they are.
"""

import flax
import jax
import ml_collections
import numpy as np
import qwix
from qwix._src.providers import ptq as qwix_ptq  # WithAux: a quantized weight's type.

from lm import models, sharding
from lm.errors import check

SCHEMES = ('int8', 'int4')  # What experiments.quantize writes; QLoRA's base adds 'nf4'.
TILED = ('int4', 'nf4')  # 4 bits need smaller blocks than an output channel (QLoRA's: 64).
DEFAULT_GROUP_SIZE = 64
# The Dense layers stored quantized, by module name.
LAYERS = ('query', 'key', 'value', 'out', 'wi_gate', 'wi_up', 'wo', 'in_proj', 'x_proj',
          'out_proj')


def config(scheme: str, group_size: int, source: str) -> ml_collections.ConfigDict:
  """config.quantization of a quantized run: how its params are stored, and what they
  were quantized from."""
  return ml_collections.ConfigDict(dict(
      scheme=scheme, group_size=group_size if scheme in TILED else 0, source=source))


def scheme_of(run_config) -> str:
  """A saved run's scheme, '' for float params (runs never quantized have no section)."""
  return run_config.quantization.scheme if 'quantization' in run_config else ''


def path_regex(layers) -> str:
  # qwix matches a module path such as 'layer_3/attention/query'.
  return '(.*/)?(' + '|'.join(layers) + ')$'


def rule(qtype: str, group_size: int, layers=LAYERS) -> qwix.QuantizationRule:
  """Weights of `layers` stored as `qtype`, tiled by `group_size` where TILED."""
  return qwix.QuantizationRule(module_path=path_regex(layers), weight_qtype=qtype,
                               tile_size=group_size if qtype in TILED else None)


def quantize_model(model, scheme: str, group_size: int):
  """A copy of `model` that takes its block matrices quantized as a quantized run stores
  them (`quantize_params`)."""
  if scheme not in TILED:
    return qwix.quantize_model(model.clone(), qwix.PtqProvider([rule(scheme, group_size)]))
  # out's input axes are [heads, head_dim]: groups of consecutive inputs tile both.
  head_dim = model.config.head_dim
  tiles = ({0: 1, 1: group_size} if group_size <= head_dim
           else {0: group_size // head_dim, 1: head_dim})
  rules = [qwix.QuantizationRule(module_path=path_regex(['out']), weight_qtype=scheme,
                                 tile_size=tiles),
           rule(scheme, group_size, tuple(layer for layer in LAYERS if layer != 'out'))]
  return qwix.quantize_model(model.clone(), qwix.PtqProvider(rules))


def abstract_params(quantized_model) -> dict:
  """The quantized model's params as boxed ShapeDtypeStructs (qwix's WithAux leaves
  record how each weight is quantized)."""
  return jax.eval_shape(lambda rng: models.init_variables(quantized_model, rng)['params'],
                        jax.random.key(0))


def quantize_params(params: dict, stored_boxed: dict) -> dict:
  """Float params as the quantized model stores them (`stored_boxed`: abstract_params)."""
  return qwix.quantize_params(params, stored_boxed)


def quantize(model, params: dict, scheme: str, group_size: int, mesh) -> tuple:
  """(quantized model, its params onto `mesh`) of `model`'s float `params`: what a
  quantized run stores and runs."""
  quantized_model = quantize_model(model, scheme, group_size)
  stored_boxed = abstract_params(quantized_model)
  shardings = jax.tree.map(lambda x: x.sharding, abstract_arrays(stored_boxed, mesh))
  return quantized_model, jax.jit(lambda params: quantize_params(params, stored_boxed),
                                  out_shardings=shardings)(params)


def dequantize(params: dict) -> dict:
  """`params` with every quantized weight back in floating point."""
  def value(leaf):
    return qwix.dequantize(leaf.array) if isinstance(leaf, qwix_ptq.WithAux) else leaf
  return jax.tree.map(value, params, is_leaf=lambda x: isinstance(x, qwix_ptq.WithAux))


def is_quantized(leaf) -> bool:
  return isinstance(leaf, qwix_ptq.WithAux)


def flat_weights(params: dict) -> dict:
  """{path: leaf} with a quantized weight (WithAux) one leaf."""
  return flax.traverse_util.flatten_dict(params, is_leaf=lambda _, x: not isinstance(x, dict))


def abstract_arrays(stored_boxed: dict, mesh) -> dict:
  """ShapeDtypeStructs of `stored_boxed` with the rules table's shardings on `mesh`,
  except that an axis a mesh split does not divide is kept whole: a tiled weight's scale
  has one entry per tile along the input axis, fewer than the devices that split it."""
  shardings = sharding.logical_to_shardings(stored_boxed, mesh)

  def fit(value, where):
    spec = list(where.spec) + [None] * (len(value.shape) - len(where.spec))
    for axis, names in enumerate(spec):
      split = int(np.prod([mesh.shape[n] for n in (
          names if isinstance(names, tuple) else (names,)) if n is not None]))
      if value.shape[axis] % split:
        spec[axis] = None
    return jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec(*spec)))
  return jax.tree.map(fit, flax.linen.meta.unbox(stored_boxed), shardings)


def innermost_input(model_config, layer: str) -> int:
  """The size of `layer`'s innermost input axis, the one a tile splits."""
  inner = model_config.mamba_expand * model_config.embed_dim
  return {'out': model_config.head_dim, 'wo': model_config.mlp_dim, 'x_proj': inner,
          'out_proj': inner, 'dt_proj': model_config.mamba_dt_rank}.get(
              layer, model_config.embed_dim)


def present_layers(model_config, layers=LAYERS) -> tuple[str, ...]:
  """Those of `layers` that the blocks of model_config.layer_pattern hold."""
  kinds = {part.strip() for part in model_config.layer_pattern.split(',') if part.strip()}
  held = {'attention': ('query', 'key', 'value', 'out', 'wi_gate', 'wi_up', 'wo'),
          'mamba': ('in_proj', 'x_proj', 'dt_proj', 'out_proj')}
  return tuple(layer for layer in layers if any(layer in held.get(kind, ()) for kind in kinds))


def check_tiles(model_config, layers, qtype: str, group_size: int, field: str) -> None:
  """Refuses, naming `field`, a tile that does not divide the innermost input axis of a
  layer of `layers` (`qtype` not TILED: nothing to check)."""
  if qtype not in TILED:
    return
  for layer in sorted(layers):
    size = innermost_input(model_config, layer)
    check(size % group_size == 0,
          f'{field}={group_size} does not divide {layer}\'s input axis of {size}'
          f' ({qtype} is quantized in tiles of it)')


def check_groups(model_config, scheme: str, group_size: int, flag: str) -> None:
  """Refuses, naming `flag`, a group size that does not split the inputs of a layer the
  model holds into whole groups (`scheme` not TILED: nothing to check)."""
  if scheme not in TILED:
    return
  for layer in sorted(present_layers(model_config)):
    if layer != 'out':
      check_tiles(model_config, [layer], scheme, group_size, flag)
      continue
    heads, head_dim = model_config.num_heads, model_config.head_dim
    fits = (head_dim % group_size == 0 if group_size <= head_dim
            else group_size % head_dim == 0 and heads % (group_size // head_dim) == 0)
    check(fits, f'{flag}={group_size} does not split out\'s input of {heads} heads x'
          f' {head_dim} into groups: a group lies within a head (dividing {head_dim}) or'
          f' spans whole heads (a multiple of {head_dim} dividing {heads * head_dim})')


def param_bytes(params: dict) -> int:
  """Bytes the params hold (int4 counted as half a byte, as packed)."""
  def size(x):
    bits = 4 if x.dtype.name in ('int4', 'uint4') else 8 * x.dtype.itemsize
    return x.size * bits // 8
  return sum(size(x) for x in jax.tree.leaves(params))
