"""The train state and the pure, jittable train step (method-agnostic engine).

One step, in the reference's order:
  method.grads (CAPI: teacher forward with the EMA backbone -> clustering loss and gradient ->
  targets -> student forward -> CAPI loss and gradient) -> student AdamW -> EMA update with the
  *updated* student -> teacher-head (clustering) AdamW.
The method (`capi_jax/methods/`) supplies the heads and losses; everything else lives here.
"""

from collections.abc import Callable
import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax

from capi_jax.core import optim
from capi_jax.core import schedules
from capi_jax.core import sharding

PyTree = Any
Batch = dict[str, jax.Array]
# Batch entries the step reads; others (e.g. 'label') stay on the host.
STEP_KEYS = ('images', 'visible_indices', 'predict_indices')


@flax.struct.dataclass
class TrainState:
  """Everything a step reads and writes; one pytree, checkpointed as a whole.

  Attributes:
    step: int32 scalar, iterations done (= the schedules' index for the next step).
    rng: uint32 (2,) base key; step keys are `fold_in(rng, step)`.
    params: student {'backbone', 'head'}.
    ema_params: EMA of the student, same structure; its backbone is the teacher's.
    teacher_head_params: CAPI's online clustering head (trained by its own optimiser).
    opt_state: the student's AdamW state.
    teacher_head_opt_state: the teacher head's AdamW state.
  """
  step: jax.Array
  rng: jax.Array
  params: PyTree
  ema_params: PyTree
  teacher_head_params: PyTree
  opt_state: optax.OptState
  teacher_head_opt_state: optax.OptState


@flax.struct.dataclass
class Optimizers:
  """The step's static pieces (no arrays), derived from the config and parameter paths."""
  student: optax.GradientTransformation = flax.struct.field(pytree_node=False)
  teacher_head: optax.GradientTransformation = flax.struct.field(pytree_node=False)
  lr_fn: schedules.ScheduleFn = flax.struct.field(pytree_node=False)
  momentum_fn: schedules.ScheduleFn = flax.struct.field(pytree_node=False)


def make_optimizers(config: ml_collections.ConfigDict, method, abstract_params: PyTree
                    ) -> Optimizers:
  """Student AdamW (groups from the parameter paths), the method's teacher-head optimiser and
  the lr / EMA momentum schedules; `abstract_params` may be ShapeDtypeStructs."""
  total = config.optim.total_iters
  return Optimizers(
      student=optim.student_optimizer(config, abstract_params),
      teacher_head=method.teacher_head_optimizer(),
      lr_fn=schedules.from_config(config.optim.lr_schedule, total),
      momentum_fn=schedules.from_config(config.optim.momentum_schedule, total),
  )


def image_shape(config: ml_collections.ConfigDict) -> tuple[int, int]:
  size = config.data.image_size
  return (size, size) if isinstance(size, int) else tuple(size)


def init_fn(config: ml_collections.ConfigDict, method
            ) -> tuple[Callable[[jax.Array], TrainState], Optimizers]:
  """(rng -> fresh TrainState, optimisers): jit the former with out_shardings to be born sharded."""
  # Gradients are reduced across devices in the parameters' dtype (GSPMD inserts the
  # reductions), so the official `reduce_dtype` knob has only one consistent value here.
  if config.efficiency.reduce_dtype != config.efficiency.param_dtype:
    raise ValueError(
        f'efficiency.reduce_dtype={config.efficiency.reduce_dtype!r} must equal '
        f'efficiency.param_dtype={config.efficiency.param_dtype!r}: capi_jax reduces gradients '
        'in the master weights\' dtype.')
  shape = image_shape(config)
  abstract_student, _ = jax.eval_shape(lambda k: method.init(k, shape), jax.random.PRNGKey(0))
  optimizers = make_optimizers(config, method, abstract_student)

  def init(rng: jax.Array) -> TrainState:
    init_rng, step_rng = jax.random.split(rng)
    student, teacher_head = method.init(init_rng, shape)
    return TrainState(
        step=jnp.zeros([], jnp.int32),
        rng=step_rng,
        params=student,
        # The reference copies the student into the EMA at init.
        ema_params=jax.tree.map(jnp.copy, student),
        teacher_head_params=teacher_head,
        opt_state=optimizers.student.init(student),
        teacher_head_opt_state=optimizers.teacher_head.init(teacher_head),
    )

  return init, optimizers


def ema_update(ema: PyTree, params: PyTree, momentum: jax.Array) -> PyTree:
  """ema <- momentum * ema + (1 - momentum) * params (the reference's foreach mul_/add_)."""
  return jax.tree.map(
      lambda e, p: (e * momentum + p * (1 - momentum)).astype(e.dtype), ema, params)


def train_step(state: TrainState, batch: Batch, *, method, optimizers: Optimizers,
               compute_sharding: jax.sharding.Sharding | None = None,
               ) -> tuple[TrainState, dict[str, jax.Array]]:
  """One CAPI iteration on a global batch; metrics are float32 scalars.

  `compute_sharding` (replicated, under a mesh) gathers the FSDP-sharded weights whole for the
  forward/backward, ZeRO-3 style: activations then stay split along the batch only, instead of
  GSPMD guessing layouts from the weights' shards. Gradients are re-sharded for the update.
  """
  rng = jax.random.fold_in(state.rng, state.step)
  batch = {k: batch[k] for k in STEP_KEYS}
  gather = lambda tree: (tree if compute_sharding is None
                         else jax.lax.with_sharding_constraint(tree, compute_sharding))
  student_grads, head_grads, metrics = method.grads(
      gather(state.params), gather(state.ema_params), gather(state.teacher_head_params), batch,
      rng)

  updates, opt_state = optimizers.student.update(student_grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  momentum = optimizers.momentum_fn(state.step)
  ema_params = ema_update(state.ema_params, params, momentum)
  head_updates, head_opt_state = optimizers.teacher_head.update(
      head_grads, state.teacher_head_opt_state, state.teacher_head_params)
  teacher_head_params = optax.apply_updates(state.teacher_head_params, head_updates)

  metrics = {k: v.astype(jnp.float32) for k, v in metrics.items()}
  metrics['lr'] = optimizers.lr_fn(state.step)
  metrics['momentum'] = momentum
  new_state = state.replace(
      step=state.step + 1, params=params, ema_params=ema_params,
      teacher_head_params=teacher_head_params, opt_state=opt_state,
      teacher_head_opt_state=head_opt_state)
  return new_state, metrics


def make_train_step(method, optimizers: Optimizers,
                    compute_sharding: jax.sharding.Sharding | None = None):
  """train_step with its static arguments bound: (state, batch) -> (state, metrics)."""
  return functools.partial(train_step, method=method, optimizers=optimizers,
                           compute_sharding=compute_sharding)


def state_layout(config: ml_collections.ConfigDict, method, mesh: jax.sharding.Mesh,
                 rng: jax.Array):
  """Everything needed to create or restore a TrainState without materialising it.

  Returns:
    (init: rng -> TrainState, the abstract TrainState, its shardings (a TrainState of
    NamedShardings), optimisers).
  """
  init, optimizers = init_fn(config, method)
  abstract = jax.eval_shape(init, rng)
  shardings = sharding.tree_shardings(mesh, abstract, config.sharding.param_rules)
  return init, abstract, shardings, optimizers


def create_state(config: ml_collections.ConfigDict, method, mesh: jax.sharding.Mesh,
                 rng: jax.Array) -> tuple[TrainState, PyTree, Optimizers]:
  """A fresh TrainState born sharded (never materialised whole on one device).

  Returns:
    (state, its shardings (a TrainState of NamedShardings), optimisers).
  """
  init, _, shardings, optimizers = state_layout(config, method, mesh, rng)
  state = jax.jit(init, out_shardings=shardings)(rng)
  return state, shardings, optimizers


def jit_train_step(method, optimizers: Optimizers, state_shardings: PyTree,
                   mesh: jax.sharding.Mesh):
  """The jitted step: state donated, batch split over all devices, metrics replicated."""

  batch_sharding = sharding.batch_sharding(mesh)
  return jax.jit(
      make_train_step(method, optimizers, sharding.replicated(mesh)),
      in_shardings=(state_shardings, batch_sharding),
      out_shardings=(state_shardings, sharding.replicated(mesh)),
      donate_argnums=0)
