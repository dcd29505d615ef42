"""The pure, jittable train step, the same for every method.

One step:
  grads, aux, metrics = method.loss_and_grads(variables, batch, rng)
  params <- the method's optimiser update
  buffers <- method.update_buffers(variables with the updated params, aux, step)
plus the method's logged schedules. The method (`capi_jax/methods/`) owns the losses, the
optimiser and the post-update (CAPI: student and clustering-head AdamW, EMA of the updated
student); everything else lives here.
"""

from collections.abc import Callable
import contextlib
import functools
import logging
from typing import Any

import jax
import jax.numpy as jnp
import optax

from capi_jax.base import interface
from capi_jax.base import sharding
from capi_jax.engine import state as state_lib
from capi_jax.models import layers

logger = logging.getLogger(__name__)

# Options of the TPU compiler for the train step (`compile_step`). By default libtpu 0.0.42
# gathers a block's FSDP shards over v5e groups of 64 chips or more as an all-reduce of each
# float32 shard written into a zero array of the whole weight (its `TpuAllGatherDecomposer`),
# cast to bfloat16 after the sum: ViT-L on v5e:16x16 at fsdp 256 had 4.5 GiB of such all-reduce
# operands per chip per step, where all-gathers of the bfloat16 shards carry 0.03 GiB, and 0.59
# GiB more temporaries (docs/pod_plans.md, "Where the bytes go"). This option keeps them
# all-gathers on v5e; it changes nothing on v5e groups of 16 or 32 chips (already all-gathers)
# nor on v4, v5p and v6e slices of 64 or 256 chips (all-reduces there with or without it).
TPU_COMPILER_OPTIONS = {'xla_tpu_prefer_async_allgather_to_allreduce': 'true'}

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]
StepFn = Callable[[state_lib.TrainState, Batch], tuple[state_lib.TrainState, Metrics]]


def train_step(state: state_lib.TrainState, batch: Batch, *, method: interface.Method,
               optimizer: optax.GradientTransformation,
               mesh: jax.sharding.Mesh | None = None,
               logical_rules: sharding.LogicalRules = sharding.DEFAULT_LOGICAL_RULES,
               ) -> tuple[state_lib.TrainState, Metrics]:
  """One iteration on a global batch; metrics are float32 scalars.

  With a `mesh`, the step is traced with it in context: the models' blocks then gather their
  own FSDP-sharded weights at the point of use and keep activations split along the batch
  (`models.layers.gathered`), so the variables, their gradients and the optimiser state stay
  sharded everywhere else (one block's weights are whole at a time, not the whole model); the
  blocks' weight gradients are summed over the batch shards in `efficiency.reduce_dtype`
  (`layers.reduce_gradients_in`). `logical_rules` say which weights stay split (over 'tensor')
  and which mesh axes split the batch (`sharding.use_rules`).
  """
  reduce_dtype = method.config.efficiency.get('reduce_dtype')
  with (contextlib.nullcontext() if mesh is None
        else jax.sharding.use_abstract_mesh(mesh.abstract_mesh)), \
      sharding.use_rules(logical_rules), \
      layers.reduce_gradients_in(reduce_dtype and jnp.dtype(reduce_dtype)):
    rng = jax.random.fold_in(state.rng, state.step)
    grads, aux, metrics = method.loss_and_grads(state.variables, batch, rng)

    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    buffers = method.update_buffers(
        interface.Variables(params, state.frozen, state.buffers), aux, state.step)

  metrics = {k: v.astype(jnp.float32) for k, v in metrics.items()}
  metrics.update({k: fn(state.step) for k, fn in method.schedules().items()})
  return state.replace(step=state.step + 1, params=params, buffers=buffers,
                       opt_state=opt_state), metrics


def make_train_step(method: interface.Method, optimizer: optax.GradientTransformation,
                    mesh: jax.sharding.Mesh | None = None,
                    logical_rules: sharding.LogicalRules = sharding.DEFAULT_LOGICAL_RULES
                    ) -> StepFn:
  """train_step with its static arguments bound: (state, batch) -> (state, metrics)."""
  return functools.partial(train_step, method=method, optimizer=optimizer, mesh=mesh,
                           logical_rules=logical_rules)


def compile_step(lowered: Any, platform: str) -> Any:
  """`lowered` (a jitted step's `.lower(...)`) compiled for devices of `platform` ('tpu',
  'gpu', 'cpu'), with `TPU_COMPILER_OPTIONS` for TPUs.

  A libtpu that no longer knows an option (they are libtpu's, not a stable interface; a pod's
  libtpu comes with its jax) compiles without them, with a warning, rather than failing.
  """
  if platform != 'tpu':
    return lowered.compile()
  try:
    return lowered.compile(compiler_options=TPU_COMPILER_OPTIONS)
  except jax.errors.JaxRuntimeError as e:
    if 'No such compile option' not in str(e):
      raise
    logger.warning('The TPU compiler refuses %s (%s): compiling without them (on v5e slices of '
                   '64+ chips FSDP weight gathers then become all-reduces).',
                   sorted(TPU_COMPILER_OPTIONS), str(e).splitlines()[0])
    return lowered.compile()


def jit_train_step(method: interface.Method, layout: state_lib.StateLayout,
                   mesh: jax.sharding.Mesh) -> Any:
  """The jitted step: state donated, batch split over the batch axes (all devices but the
  'tensor' axis), metrics replicated."""
  return jax.jit(
      make_train_step(method, layout.optimizer, mesh, layout.logical_rules),
      in_shardings=(layout.shardings, sharding.batch_sharding(mesh, layout.logical_rules)),
      out_shardings=(layout.shardings, sharding.replicated(mesh)),
      donate_argnums=0)
