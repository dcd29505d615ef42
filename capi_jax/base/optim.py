"""Optimiser building blocks that match PyTorch's `torch.optim.AdamW` step, for any method.

PyTorch AdamW with per-group `lr = schedule * lr_mult` and `weight_decay = wd * wd_mult` does
  p <- p * (1 - lr * lr_mult * wd * wd_mult) - lr * lr_mult * m_hat / (sqrt(v_hat) + eps)
with bias-corrected moments. Here: `optax.scale_by_adam` gives `m_hat / (sqrt(v_hat) + eps)` and
`scale_by_groups` applies the decoupled decay and the scheduled, per-parameter learning rate.
PyTorch's parameter groups become per-leaf multiplier trees (`multiplier_trees`, from a rule on
the parameter's path), and several optimisers stepped after one backward pass become
`partition` over the top-level parts of the parameters.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from capi_jax.base import schedules

PyTree = Any


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


def multiplier_trees(params: PyTree, rule: Callable[[str], tuple[float, float]]
                     ) -> tuple[PyTree, PyTree]:
  """Per-leaf (lr multiplier, wd multiplier) trees from `rule('/'-joined path) -> (lr, wd)`."""
  mults = jax.tree_util.tree_map_with_path(lambda path, _: rule(path_name(path)), params)
  is_pair = lambda x: isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], float)
  lr_mults = jax.tree.map(lambda m: m[0], mults, is_leaf=is_pair)
  wd_mults = jax.tree.map(lambda m: m[1], mults, is_leaf=is_pair)
  return lr_mults, wd_mults


class ScaleByGroupsState(NamedTuple):
  count: chex.Array  # int32 scalar: the number of steps taken, i.e. the schedule index.


def scale_by_groups(
    lr_fn: schedules.ScheduleFn,
    weight_decay: float,
    lr_mults: PyTree | None = None,
    wd_mults: PyTree | None = None,
) -> optax.GradientTransformation:
  """u <- -lr(count) * lr_mult * (u + weight_decay * wd_mult * p): decoupled wd, scheduled lr.

  `lr_mults` / `wd_mults` are trees of Python floats with the parameters' structure (None = 1).
  """

  def init_fn(params):
    del params
    return ScaleByGroupsState(count=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params):
    if params is None:
      raise ValueError('scale_by_groups needs the parameters (decoupled weight decay).')
    lr = lr_fn(state.count)
    ones = jax.tree.map(lambda _: 1.0, updates)
    lm = ones if lr_mults is None else lr_mults
    wm = ones if wd_mults is None else wd_mults

    def one(u, p, lr_mult, wd_mult):
      u = u + (weight_decay * wd_mult) * p.astype(u.dtype) if weight_decay * wd_mult else u
      return (-lr * lr_mult * u).astype(p.dtype)

    new = jax.tree.map(one, updates, params, lm, wm)
    return new, ScaleByGroupsState(count=optax.safe_increment(state.count))

  return optax.GradientTransformation(init_fn, update_fn)


def adamw(
    lr_fn: schedules.ScheduleFn,
    *,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    lr_mults: PyTree | None = None,
    wd_mults: PyTree | None = None,
) -> optax.GradientTransformation:
  """PyTorch-equivalent AdamW with a scheduled lr and per-parameter lr / wd multipliers."""
  b1, b2 = betas
  return optax.chain(
      optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
      scale_by_groups(lr_fn, weight_decay, lr_mults, wd_mults),
  )


class PartitionState(NamedTuple):
  inner: dict[str, optax.OptState]  # Each group's state, over its own parts only.


def partition(groups: dict[str, tuple[tuple[str, ...], optax.GradientTransformation]]
              ) -> optax.GradientTransformation:
  """Several optimisers over the top-level parts of a dict of parameters.

  `groups` maps a group name to (the parts it owns, its transformation); every part of the
  parameters must belong to exactly one group. Each transformation sees only its parts, so
  per-leaf trees (lr / wd multipliers) are written for those parts alone, and a group's state
  (its step count, its moments) is its own, as with separate PyTorch optimisers stepped after
  one backward pass.
  """

  def split(tree, parts):
    return None if tree is None else {p: tree[p] for p in parts}

  def check(params):
    owned = [p for parts, _ in groups.values() for p in parts]
    if sorted(owned) != sorted(params):
      raise ValueError(f'Optimiser groups own parts {sorted(owned)}, but the parameters have '
                       f'{sorted(params)}: every part needs exactly one group.')

  def init_fn(params):
    check(params)
    return PartitionState({name: tx.init(split(params, parts))
                           for name, (parts, tx) in groups.items()})

  def update_fn(updates, state, params=None):
    new_updates, new_inner = {}, {}
    for name, (parts, tx) in groups.items():
      u, new_inner[name] = tx.update(split(updates, parts), state.inner[name],
                                     split(params, parts))
      new_updates.update(u)
    return new_updates, PartitionState(new_inner)

  return optax.GradientTransformation(init_fn, update_fn)
