"""CAPI's optimisers: the student's AdamW with the release's parameter groups, and the online
clustering head's own AdamW (`config.capi.optim`, `config.capi.clustering_optimizer`).

Parameter groups (the release's `get_params_groups`, by parameter path):
  - biases and names containing 'gamma': no weight decay;
  - norm scales (a `scale`/`weight` leaf under a module whose name contains 'norm'):
    weight decay x `layernorm_wd_mult`;
  - anything under `patch_embed`: lr x `patch_embed_lr_mult`;
  - RoPE frequencies (`freqs`, or anything under a 'rope' module): lr x `rope_lr_mult`.
"""

from typing import Any

import ml_collections
import optax

from capi_jax.base import optim
from capi_jax.base import schedules

PyTree = Any


def param_group(
    name: str,
    *,
    patch_embed_lr_mult: float,
    rope_lr_mult: float,
    layernorm_wd_mult: float,
) -> optim.Group:
  """The group of the parameter at '/'-joined path `name`.

  RoPE frequencies at `rope_lr_mult` 0 stay a trained group (lr 0, with Adam state), as in the
  release, so that the optimiser state has the same structure whatever the multiplier.
  """
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
  return optim.Group(lr_mult=lr_mult, wd_mult=wd_mult)


def param_groups(params: PyTree, optim_cfg: ml_collections.ConfigDict) -> PyTree:
  """A `Group` per student parameter (`config.capi.optim`'s multipliers)."""
  return optim.group_tree(params, lambda name, ndim: param_group(
      name, patch_embed_lr_mult=optim_cfg.patch_embed_lr_mult,
      rope_lr_mult=optim_cfg.rope_lr_mult, layernorm_wd_mult=optim_cfg.layernorm_wd_mult))


def student_optimizer(config: ml_collections.ConfigDict, student_params: PyTree
                      ) -> optax.GradientTransformation:
  """The student's AdamW (`config.capi.optim`), groups derived from the parameter paths."""
  o = config.capi.optim
  return optim.adamw(
      schedules.from_config(o.lr_schedule, config.train.total_iters),
      betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay,
      groups=param_groups(student_params, o))


def clustering_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """The online clustering head's AdamW (`config.capi.clustering_optimizer`): one group."""
  cfg = config.capi.clustering_optimizer
  return optim.adamw(
      schedules.from_config(cfg.lr_schedule, config.train.total_iters),
      betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)
