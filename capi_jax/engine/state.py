"""The train state: one pytree per run, created abstractly and born sharded.

`TrainState` holds the step counter, the base rng, and the method's variables
(`capi_jax.base.interface.Variables`: trained `params`, never-trained `frozen`, post-update
`buffers`)
with the optimiser state of `params`. `state_layout` derives, without materialising anything,
the init function, the abstract state, its shardings and the optimiser: the one place that
creation (`create_state`), the training loop's restore, evaluation and conversion all use.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax

from capi_jax.base import interface
from capi_jax.base import sharding

PyTree = Any


@flax.struct.dataclass
class TrainState:
  """Everything a step reads and writes; checkpointed as a whole.

  Attributes:
    step: int32 scalar, iterations done (= the schedules' index for the next step).
    rng: uint32 (2,) base key; step keys are `fold_in(rng, step)`.
    params: the method's trained parameters (a dict of named parts).
    frozen: the method's never-trained parameters (no gradient, no optimiser state).
    buffers: the method's post-update state (EMA copies, queues, BatchNorm statistics).
    opt_state: the optimiser state of `params`.
  """
  step: jax.Array
  rng: jax.Array
  params: PyTree
  frozen: PyTree
  buffers: PyTree
  opt_state: optax.OptState

  @property
  def variables(self) -> interface.Variables:
    return interface.Variables(self.params, self.frozen, self.buffers)


class StateLayout(NamedTuple):
  """How to create or restore a run's TrainState without materialising it.

  Attributes:
    init: rng -> a fresh TrainState (jit it with `out_shardings=shardings`).
    abstract: the TrainState as ShapeDtypeStructs.
    shardings: a TrainState of NamedShardings (`config.sharding.param_rules` and
      `min_shard_bytes`).
    optimizer: the method's optimiser of `params`.
    logical_rules: `config.sharding.logical_rules`, which the step traces the models under
      (`sharding.use_rules`) and splits its batch by.
  """
  init: Callable[[jax.Array], TrainState]
  abstract: TrainState
  shardings: TrainState
  optimizer: optax.GradientTransformation
  logical_rules: sharding.LogicalRules = sharding.DEFAULT_LOGICAL_RULES


def _check_dtypes(config: ml_collections.ConfigDict) -> None:
  # Gradients are reduced across devices (GSPMD inserts the reductions) in at most the
  # parameters' precision: the blocks' weight gradients in `reduce_dtype` (the train step's
  # `layers.reduce_gradients_in`), the rest in the dtype their matmuls produce.
  e = config.efficiency
  if jnp.dtype(e.reduce_dtype).itemsize > jnp.dtype(e.param_dtype).itemsize:
    raise ValueError(f'efficiency.reduce_dtype={e.reduce_dtype!r} is wider than '
                     f'efficiency.param_dtype={e.param_dtype!r}.')


def initial_variables(method: interface.Method, rng: jax.Array
                      ) -> tuple[interface.Variables, jax.Array]:
  """(the variables a run with seed `rng` starts from, the base key of its steps)."""
  init_rng, step_rng = jax.random.split(rng)
  return method.init(init_rng), step_rng


def init_fn(method: interface.Method, optimizer: optax.GradientTransformation
            ) -> Callable[[jax.Array], TrainState]:
  """rng -> a fresh TrainState of `method` (jit it with out_shardings to be born sharded)."""

  def init(rng: jax.Array) -> TrainState:
    variables, step_rng = initial_variables(method, rng)
    return TrainState(
        step=jnp.zeros([], jnp.int32), rng=step_rng, params=variables.params,
        frozen=variables.frozen, buffers=variables.buffers,
        opt_state=optimizer.init(variables.params))

  return init


def state_layout(config: ml_collections.ConfigDict, method: interface.Method,
                 mesh: jax.sharding.Mesh) -> StateLayout:
  """The run's init function, abstract state, shardings and optimiser (nothing materialised)."""
  _check_dtypes(config)
  abstract_params = jax.eval_shape(method.init, jax.random.PRNGKey(0)).params
  optimizer = method.optimizer(abstract_params)
  init = init_fn(method, optimizer)
  abstract = jax.eval_shape(init, jax.random.PRNGKey(0))
  rules = sharding.config_rules(config)
  shardings = sharding.tree_shardings(mesh, abstract, config.sharding.param_rules,
                                     config.sharding.min_shard_bytes, rules)
  return StateLayout(init, abstract, shardings, optimizer, rules)


def create_state(config: ml_collections.ConfigDict, method: interface.Method,
                 mesh: jax.sharding.Mesh, rng: jax.Array) -> tuple[TrainState, StateLayout]:
  """A fresh TrainState born sharded (never materialised whole on one device), and its layout."""
  layout = state_layout(config, method, mesh)
  return jax.jit(layout.init, out_shardings=layout.shardings)(rng), layout
