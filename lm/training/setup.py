"""What a training run compiles, shared by the loop and the benchmarks: mesh, model,
optimizer, the state's shapes and shardings, and the jitted init, train and eval steps.

Shapes first (`jax.eval_shape` of the init), then shardings from the logical axis
names, then `jax.jit` with those shardings; nothing here reads data or checkpoints.
With config.lora the state's params are the adapters (lm/lora.py), and `base` says how
the frozen model they adapt is loaded, stored and passed to the steps (in steps.Frozen,
beside an objective's reference).
"""

import dataclasses
import functools
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from lm import lora, models, objectives, sharding
from lm.training import optimizer as optimizer_lib, steps


@dataclasses.dataclass(frozen=True)
class FrozenBase:
  """With LoRA: the frozen params the adapters train on."""
  checkpoint_abstract: dict  # As config.train.init_from holds them, with their shardings.
  shardings: dict  # As the steps take them (quantized with config.lora.base_dtype).
  # Loaded params (all, or some top-level entries) -> the base as the steps take it;
  # donates them.
  prepare: Callable
  abstract: dict  # What the steps take, as ShapeDtypeStructs with those shardings.


@dataclasses.dataclass(frozen=True)
class TrainingSetup:
  mesh: jax.sharding.Mesh
  model: object  # For evaluation and sampling, on steps.model_params(params, base).
  objective: objectives.Objective
  optimizer: object
  abstract_state: steps.TrainState  # ShapeDtypeStructs carrying their shardings.
  state_shardings: steps.TrainState
  batch_sharding: jax.sharding.NamedSharding
  init: Callable  # rng -> TrainState, fresh, on its shardings.
  with_optimizer: Callable  # params -> TrainState at step 0 with a fresh optimizer state.
  # (state, batch, steps.Frozen) -> (state, metrics); donates state.
  train_step: Callable
  # (params, batch, steps.Frozen) -> metric sums and their count.
  eval_step: Callable
  base: FrozenBase | None  # With LoRA; else None, and the steps' Frozen.base is None.
  params_shardings: dict  # Of steps.model_params(state.params, base): what the model takes.


def make_setup(config, devices) -> TrainingSetup:
  """For a validated config whose model.dtype is resolved (lm.config)."""
  mesh = sharding.make_mesh(config.mesh, devices)
  model = train_model = init_model = plain = models.build(config.model)
  objective = objectives.get(config.train.objective)
  optimizer = optimizer_lib.make_optimizer(config.train)
  adapted = lora.enabled(config.lora)
  if adapted:
    model = lora.wrap(plain, config.lora, train=False)
    train_model = lora.wrap(plain, config.lora, train=True)
    init_model = lora.wrap(plain, config.lora, train=False, quantize=False)
  init_boxed = steps.train_state_initializer(init_model, optimizer, adapters_only=adapted)
  with sharding.activate(mesh):
    abstract_boxed = jax.eval_shape(init_boxed, jax.random.key(config.seed))
    state_shardings = sharding.logical_to_shardings(abstract_boxed, mesh)
    base, base_shardings = _frozen_base(plain, config, mesh) if adapted else (None, None)
  abstract_state = sharding.abstract_arrays(abstract_boxed, state_shardings)
  batch_sharding = sharding.batch_sharding(mesh)
  frozen_shardings = steps.Frozen(
      base=base_shardings,
      reference=state_shardings.params if objective.needs_reference(config.train) else None)
  step_options = dict(objective=objective, settings=objective.settings(config.train))
  dropout_rng = (jax.random.key(config.seed) if adapted and config.lora.dropout > 0
                 else None)
  return TrainingSetup(
      mesh=mesh, model=model, objective=objective, optimizer=optimizer,
      abstract_state=abstract_state, state_shardings=state_shardings,
      batch_sharding=batch_sharding,
      init=jax.jit(lambda rng: nn.meta.unbox(init_boxed(rng)), out_shardings=state_shardings),
      with_optimizer=jax.jit(
          lambda params: steps.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                                          opt_state=optimizer.init(params)),
          out_shardings=state_shardings, donate_argnums=0),
      train_step=jax.jit(
          functools.partial(steps.train_step, optimizer=optimizer, model=train_model,
                            dropout_rng=dropout_rng,
                            num_microbatches=config.train.grad_accumulation_steps,
                            **step_options),
          in_shardings=(state_shardings, batch_sharding, frozen_shardings),
          out_shardings=(state_shardings, sharding.replicated(mesh)), donate_argnums=0),
      eval_step=jax.jit(
          functools.partial(steps.eval_step, model=model, **step_options),
          in_shardings=(state_shardings.params, batch_sharding, frozen_shardings),
          out_shardings=sharding.replicated(mesh)),
      base=base,
      params_shardings=steps.model_params(state_shardings.params, base_shardings),
  )


def _frozen_base(plain_model, config, mesh) -> tuple[FrozenBase, dict]:
  """How the base of an adapted model is loaded (as the plain model's params) and stored
  (quantized or not), with the shardings of what is stored."""
  plain_boxed = jax.eval_shape(
      lambda rng: models.init_variables(plain_model, rng)['params'], jax.random.key(0))
  checkpoint_abstract = sharding.abstract_arrays(
      plain_boxed, sharding.logical_to_shardings(plain_boxed, mesh))
  stored_boxed, _ = lora.abstract_split(plain_model, config.lora)
  shardings = sharding.logical_to_shardings(stored_boxed, mesh)
  if config.lora.base_dtype:
    def prepare(params):  # Any of the top-level entries: they are loaded one at a time.
      part = lambda tree: {name: tree[name] for name in params}
      return jax.jit(lambda params: lora.quantize_base(params, part(stored_boxed)),
                     out_shardings=part(shardings), donate_argnums=0)(params)
  else:
    prepare = lambda params: params  # pylint: disable=unnecessary-lambda-assignment
  abstract = sharding.abstract_arrays(stored_boxed, shardings)
  return FrozenBase(checkpoint_abstract, shardings, prepare, abstract), shardings
