"""AdamW with the reference's parameter groups, matching PyTorch's `torch.optim.AdamW` step.

PyTorch AdamW with per-group `lr = schedule * lr_mult` and `weight_decay = wd * wd_mult` does
  p <- p * (1 - lr * lr_mult * wd * wd_mult) - lr * lr_mult * m_hat / (sqrt(v_hat) + eps)
with bias-corrected moments. Here: `optax.scale_by_adam` gives `m_hat / (sqrt(v_hat) + eps)` and
`scale_by_groups` applies the decoupled decay and the scheduled, per-parameter learning rate.

Parameter groups (the reference's `get_params_groups`, by parameter path):
  - biases and names containing 'gamma': no weight decay;
  - norm scales (a `scale`/`weight` leaf under a module whose name contains 'norm'):
    weight decay x `layernorm_wd_mult`;
  - anything under `patch_embed`: lr x `patch_embed_lr_mult`;
  - RoPE frequencies (`freqs`, or anything under a 'rope' module): lr x `rope_lr_mult`.
"""

from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import ml_collections
import optax

from capi_jax.core import schedules

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


def group_multipliers(
    name: str,
    *,
    patch_embed_lr_mult: float,
    rope_lr_mult: float,
    layernorm_wd_mult: float,
) -> tuple[float, float]:
  """(lr multiplier, wd multiplier) of the parameter at '/'-joined path `name`."""
  parts = name.split('/')
  leaf, modules = parts[-1], [p.lower() for p in parts[:-1]]
  lr_mult, wd_mult = 1.0, 1.0
  if leaf == 'bias' or 'gamma' in name:
    wd_mult = 0.0
  if leaf in ('scale', 'weight') and any('norm' in m for m in modules):
    wd_mult = layernorm_wd_mult
  if 'patch_embed' in name:
    lr_mult *= patch_embed_lr_mult
  if leaf == 'freqs' or any('rope' in m for m in modules):
    lr_mult *= rope_lr_mult
  return lr_mult, wd_mult


def param_group_trees(params: PyTree, optim_cfg: ml_collections.ConfigDict
                      ) -> tuple[PyTree, PyTree]:
  """Per-leaf (lr multiplier, wd multiplier) trees for the student's parameters."""
  mults = jax.tree_util.tree_map_with_path(
      lambda path, _: group_multipliers(
          path_name(path),
          patch_embed_lr_mult=optim_cfg.patch_embed_lr_mult,
          rope_lr_mult=optim_cfg.rope_lr_mult,
          layernorm_wd_mult=optim_cfg.layernorm_wd_mult),
      params)
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


def student_optimizer(config: ml_collections.ConfigDict, student_params: PyTree
                      ) -> optax.GradientTransformation:
  """The student's AdamW (`config.optim`), groups derived from the parameter paths."""
  lr_mults, wd_mults = param_group_trees(student_params, config.optim)
  return adamw(
      schedules.from_config(config.optim.lr_schedule, config.optim.total_iters),
      betas=tuple(config.optim.betas),
      eps=config.optim.eps,
      weight_decay=config.optim.weight_decay,
      lr_mults=lr_mults,
      wd_mults=wd_mults)


def clustering_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """The online clustering head's AdamW (`config.capi.clustering_optimizer`): one group."""
  cfg = config.capi.clustering_optimizer
  return adamw(
      schedules.from_config(cfg.lr_schedule, config.optim.total_iters),
      betas=tuple(cfg.betas),
      eps=cfg.eps,
      weight_decay=cfg.weight_decay)
