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
import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax

from capi_jax.core import sharding
from capi_jax.core import state as state_lib
from capi_jax.methods import base

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]
StepFn = Callable[[state_lib.TrainState, Batch], tuple[state_lib.TrainState, Metrics]]


def train_step(state: state_lib.TrainState, batch: Batch, *, method: base.Method,
               optimizer: optax.GradientTransformation,
               compute_sharding: jax.sharding.Sharding | None = None,
               ) -> tuple[state_lib.TrainState, Metrics]:
  """One iteration on a global batch; metrics are float32 scalars.

  `compute_sharding` (replicated, under a mesh) gathers the FSDP-sharded variables whole for
  the forward/backward, ZeRO-3 style: activations then stay split along the batch only, instead
  of GSPMD guessing layouts from the weights' shards. Gradients are re-sharded for the update.
  """
  rng = jax.random.fold_in(state.rng, state.step)
  gather = lambda tree: (tree if compute_sharding is None
                         else jax.lax.with_sharding_constraint(tree, compute_sharding))
  grads, aux, metrics = method.loss_and_grads(gather(state.variables), batch, rng)

  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  buffers = method.update_buffers(
      base.Variables(params, state.frozen, state.buffers), aux, state.step)

  metrics = {k: v.astype(jnp.float32) for k, v in metrics.items()}
  metrics.update({k: fn(state.step) for k, fn in method.schedules().items()})
  return state.replace(step=state.step + 1, params=params, buffers=buffers,
                       opt_state=opt_state), metrics


def make_train_step(method: base.Method, optimizer: optax.GradientTransformation,
                    compute_sharding: jax.sharding.Sharding | None = None) -> StepFn:
  """train_step with its static arguments bound: (state, batch) -> (state, metrics)."""
  return functools.partial(train_step, method=method, optimizer=optimizer,
                           compute_sharding=compute_sharding)


def jit_train_step(method: base.Method, layout: state_lib.StateLayout,
                   mesh: jax.sharding.Mesh) -> Any:
  """The jitted step: state donated, batch split over all devices, metrics replicated."""
  return jax.jit(
      make_train_step(method, layout.optimizer, sharding.replicated(mesh)),
      in_shardings=(layout.shardings, sharding.batch_sharding(mesh)),
      out_shardings=(layout.shardings, sharding.replicated(mesh)),
      donate_argnums=0)
