"""What a training run compiles, shared by the loop and the benchmarks: mesh, model,
optimizer, the state's shapes and shardings, and the jitted init, train and eval steps.

Shapes first (`jax.eval_shape` of the init), then shardings from the logical axis
names, then `jax.jit` with those shardings; nothing here reads data or checkpoints.
"""

import dataclasses
import functools
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from lm import models, objectives, sharding
from lm.training import optimizer as optimizer_lib, steps


@dataclasses.dataclass(frozen=True)
class TrainingSetup:
  mesh: jax.sharding.Mesh
  model: object
  objective: objectives.Objective
  optimizer: object
  abstract_state: steps.TrainState  # ShapeDtypeStructs carrying their shardings.
  state_shardings: steps.TrainState
  batch_sharding: jax.sharding.NamedSharding
  init: Callable  # rng -> TrainState, fresh, on its shardings.
  with_optimizer: Callable  # params -> TrainState at step 0 with a fresh optimizer state.
  train_step: Callable  # (state, batch, reference_params) -> (state, metrics); donates state.
  eval_step: Callable  # (params, batch, reference_params) -> metric sums and their count.


def make_setup(config, devices) -> TrainingSetup:
  """For a validated config whose model.dtype is resolved (lm.config)."""
  mesh = sharding.make_mesh(config.mesh, devices)
  model = models.build(config.model)
  objective = objectives.OBJECTIVES[config.train.objective]
  optimizer = optimizer_lib.make_optimizer(config.train)
  init_boxed = steps.train_state_initializer(model, optimizer)
  with sharding.activate(mesh):
    abstract_boxed = jax.eval_shape(init_boxed, jax.random.key(config.seed))
    state_shardings = sharding.logical_to_shardings(abstract_boxed, mesh)
  abstract_state = jax.tree.map(
      lambda value, sharding_: jax.ShapeDtypeStruct(value.shape, value.dtype,
                                                    sharding=sharding_),
      nn.meta.unbox(abstract_boxed), state_shardings)
  batch_sharding = sharding.batch_sharding(mesh)
  reference_shardings = (state_shardings.params if objective.needs_reference(config.train)
                         else None)
  step_options = dict(model=model, objective=objective, train_config=config.train)
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
          functools.partial(steps.train_step, optimizer=optimizer, **step_options),
          in_shardings=(state_shardings, batch_sharding, reference_shardings),
          out_shardings=(state_shardings, sharding.replicated(mesh)), donate_argnums=0),
      eval_step=jax.jit(
          functools.partial(steps.eval_step, **step_options),
          in_shardings=(state_shardings.params, batch_sharding, reference_shardings),
          out_shardings=sharding.replicated(mesh)),
  )
