"""Parameter groups, a PyTorch-exact AdamW, several optimisers over one model, and the EMA.

PyTorch AdamW with per-group `lr = schedule * lr_mult` and `weight_decay = wd * wd_mult` does
  p <- p * (1 - lr * lr_mult * wd * wd_mult) - lr * lr_mult * m_hat / (sqrt(v_hat) + eps)
with bias-corrected moments. Here: `optax.scale_by_adam` gives `m_hat / (sqrt(v_hat) + eps)` and
`scale_by_groups` applies the decoupled decay and the scheduled, per-parameter learning rate.

PyTorch's parameter groups become one `Group` per parameter (`group_tree`, from a rule on the
parameter's path and ndim): its lr and weight-decay multipliers, and whether it is frozen
(torch's `requires_grad=False`): a frozen parameter gets a zero update and no optimiser state,
and `ema_update` copies it. Several optimisers stepped after one backward pass become
`partition` over the top-level parts of the parameters.
"""

from collections.abc import Callable
import dataclasses
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from capi_jax.base import schedules

PyTree = Any

# Names of the trained and the frozen part of the optimiser state when frozen parameters are
# split off (`adamw(state_labels=...)`). They are keys of the saved state: a method keeps the
# names its checkpoints were written with.
STATE_LABELS = ('trainable', 'frozen')


@dataclasses.dataclass(frozen=True)
class Group:
  """One parameter's optimiser settings (torch's parameter group, per leaf).

  lr = lr_fn(step) x lr_mult; decoupled weight decay = `adamw`'s weight_decay x wd_mult;
  frozen: never trained (no update, no optimiser state, copied by `ema_update`). lr_mult may be
  an array broadcasting against the parameter: one multiplier per layer of a scanned stack
  (fine-tuning's layer decay).
  """
  lr_mult: float = 1.0
  wd_mult: float = 1.0
  frozen: bool = False


def path_name(path: tuple[Any, ...]) -> str:
  """'/'-joined names of a `jax.tree_util` key path: ('backbone', 'patch_embed', 'kernel')."""
  parts = []
  for key in path:
    for attr in ('key', 'name', 'idx'):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
    else:
      parts.append(str(key))
  return '/'.join(parts)


def group_tree(params: PyTree, rule: Callable[[str, int], Group]) -> PyTree:
  """`rule('/'-joined path, ndim)` for every leaf: a `Group` tree shaped like `params` (whose
  leaves may be arrays or ShapeDtypeStructs)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, leaf: rule(path_name(path), len(leaf.shape)), params)


class ScaleByGroupsState(NamedTuple):
  count: chex.Array  # int32 scalar: the number of steps taken, i.e. the schedule index.


def scale_by_groups(
    lr_fn: schedules.ScheduleFn,
    weight_decay: float,
    groups: PyTree | None = None,
) -> optax.GradientTransformation:
  """u <- -lr(count) * lr_mult * (u + weight_decay * wd_mult * p): decoupled wd, scheduled lr.

  `groups`: a `Group` per leaf, the updates' structure (None: `Group()` everywhere); their
  `frozen` is not read here (see `adamw`).
  """

  def init_fn(params):
    del params
    return ScaleByGroupsState(count=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params):
    if params is None:
      raise ValueError('scale_by_groups needs the parameters (decoupled weight decay).')
    lr = lr_fn(state.count)
    tree = jax.tree.map(lambda _: Group(), updates) if groups is None else groups

    def one(u, p, group):
      decay = weight_decay * group.wd_mult
      u = u + decay * p.astype(u.dtype) if decay else u
      return (-lr * group.lr_mult * u).astype(p.dtype)

    new = jax.tree.map(one, updates, params, tree)
    return new, ScaleByGroupsState(count=optax.safe_increment(state.count))

  return optax.GradientTransformation(init_fn, update_fn)


def adamw(
    lr_fn: schedules.ScheduleFn,
    *,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    groups: PyTree | None = None,
    state_labels: tuple[str, str] | None = None,
) -> optax.GradientTransformation:
  """PyTorch-equivalent AdamW with a scheduled lr and per-parameter `Group`s.

  Args:
    lr_fn: step -> learning rate (the schedule's index is this optimiser's step count).
    betas: Adam's (beta1, beta2).
    eps: Adam's eps (added to sqrt(v_hat), as torch).
    weight_decay: the decoupled decay that each group's `wd_mult` scales.
    groups: a `Group` per parameter (`group_tree`); None: `Group()` for every parameter.
    state_labels: None, or (trained, frozen): the parameters are split by `Group.frozen` with
      `optax.multi_transform`, whose state holds the two parts under these names (the frozen
      one empty). Required when a group is frozen. The state's structure, and so a
      checkpoint's, depends on it: a method passes it whether or not it has frozen parameters
      today, and keeps its names (`STATE_LABELS` for new methods).
  """
  b1, b2 = betas

  def trained(tree: PyTree | None) -> optax.GradientTransformation:
    return optax.chain(optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
                       scale_by_groups(lr_fn, weight_decay, tree))

  if state_labels is None:
    if groups is not None and any(g.frozen for g in jax.tree.leaves(groups)):
      raise ValueError('Frozen parameter groups need adamw(state_labels=...): the names of '
                       'the trained and the frozen part of the optimiser state.')
    return trained(groups)
  if groups is None:
    raise ValueError('adamw(state_labels=...) splits parameters by their groups: pass groups.')
  trained_label, frozen_label = state_labels
  labels = jax.tree.map(lambda g: frozen_label if g.frozen else trained_label, groups)
  # optax.multi_transform hands the trained part MaskedNodes in place of the frozen leaves;
  # the group tree it reads must have the same structure.
  trained_groups = jax.tree.map(lambda g: optax.MaskedNode() if g.frozen else g, groups)
  return optax.multi_transform(
      {trained_label: trained(trained_groups), frozen_label: optax.set_to_zero()}, labels)


def ema_update(average: PyTree, new: PyTree, momentum: float | jax.Array,
               groups: PyTree | None = None) -> PyTree:
  """average <- momentum * average + (1 - momentum) * new, in `average`'s dtypes.

  The releases' in-place `mul_(m)` then `add_(p, alpha=1 - m)`, in that order (CAPI's teacher,
  MIM-Refiner's stage-3 encoder). `groups` (a `Group` per leaf, or None): frozen leaves are
  copied from `new`, not averaged.
  """
  def one(a, n):
    return (a * momentum + n * (1 - momentum)).astype(a.dtype)

  if groups is None:
    return jax.tree.map(one, average, new)
  return jax.tree.map(lambda g, a, n: n if g.frozen else one(a, n), groups, average, new)


class PartitionState(NamedTuple):
  inner: dict[str, optax.OptState]  # Each optimiser's state, over its own parts only.


def partition(optimizers: dict[str, tuple[tuple[str, ...], optax.GradientTransformation]]
              ) -> optax.GradientTransformation:
  """Several optimisers over the top-level parts of a dict of parameters.

  `optimizers` maps a name to (the parts it owns, its transformation); every part of the
  parameters must belong to exactly one. Each transformation sees only its parts, so its
  `Group` tree is written for those parts alone, and its state (its step count, its moments) is
  its own, as with separate PyTorch optimisers stepped after one backward pass.
  """

  def split(tree, parts):
    return None if tree is None else {p: tree[p] for p in parts}

  def check(params):
    owned = [p for parts, _ in optimizers.values() for p in parts]
    if sorted(owned) != sorted(params):
      raise ValueError(f'Optimisers own parts {sorted(owned)}, but the parameters have '
                       f'{sorted(params)}: every part needs exactly one optimiser.')

  def init_fn(params):
    check(params)
    return PartitionState({name: tx.init(split(params, parts))
                           for name, (parts, tx) in optimizers.items()})

  def update_fn(updates, state, params=None):
    new_updates, new_inner = {}, {}
    for name, (parts, tx) in optimizers.items():
      u, new_inner[name] = tx.update(split(updates, parts), state.inner[name],
                                     split(params, parts))
      new_updates.update(u)
    return new_updates, PartitionState(new_inner)

  return optax.GradientTransformation(init_fn, update_fn)
