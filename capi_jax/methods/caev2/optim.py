"""CAE v2's optimiser: torch's global-norm clip, then AdamW with the release's two groups.

As `tools/run_pretraining.py`, `furnace/optim_factory.py` and `furnace/engine_for_pretraining.py`
(Atten4Vis/CAE, a7fd162) run it; see `docs/reference/caev2_algorithm.md`, Optimisation:
  - groups (`get_parameter_groups`): weight decay for every tensor with >= 2 dims that is not a
    bias, 0 for the rest. The model defines no `no_weight_decay`, so `mask_token` and the
    encoder's `cls_token` (both (1, 1, D)) are decayed. The frozen position tables are not
    optimised: the regressor's is a constant, the encoder's a `constants` leaf that gets no
    update and no optimiser state;
  - gradients clipped to a global L2 norm of `clip_grad` over all parameters, as
    `torch.nn.utils.clip_grad_norm_` (scale min(1, clip / (norm + 1e-6)));
  - torch AdamW (`capi_jax.base.optim.adamw`), lr per iteration from
    `schedules.warmup_cosine_fn(lr, min_lr, total_iters, warmup_iters)`: the warm-up starts at
    0, not at `--warmup_lr`. The release's weight-decay schedule is a cosine from
    `--weight_decay` to `--weight_decay_end` (None = the same), constant in every recipe; a
    constant is what is applied here.
"""

from typing import Any

import jax
import jax.numpy as jnp
import optax

from capi_jax.base import optim
from capi_jax.base import schedules
from capi_jax.models import stack

PyTree = Any

# torch.nn.utils.clip_grad_norm_ adds this to the norm before dividing.
_CLIP_EPS = 1e-6


def weight_decay_mults(params: PyTree) -> PyTree:
  """1.0 for the leaves the release decays (>= 2 dims per block and not named 'bias'), 0.0
  otherwise."""
  def mult(path, leaf) -> float:
    path = optim.path_name(path)
    ndim = stack.block_ndim(path, len(leaf.shape))
    return 1.0 if ndim >= 2 and path.split('/')[-1] != 'bias' else 0.0
  return jax.tree_util.tree_map_with_path(mult, params)


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
  """Scales the updates by min(1, max_norm / (global L2 norm + 1e-6)), as torch's clip.

  (optax.clip_by_global_norm scales by max_norm / norm, without the 1e-6.)
  """

  def update_fn(updates, state, params=None):
    del params
    norm = optax.tree.norm(updates)
    scale = jnp.minimum(1.0, max_norm / (norm + _CLIP_EPS))
    return jax.tree.map(lambda g: (g * scale).astype(g.dtype), updates), state

  return optax.GradientTransformation(optax.init_empty_state, update_fn)


def optimizer(params: PyTree, lr_fn: schedules.ScheduleFn, *, weight_decay: float,
              clip_grad: float | None, betas: tuple[float, float] = (0.9, 0.999),
              eps: float = 1e-8, constants: PyTree | None = None
              ) -> optax.GradientTransformation:
  """The release's update: optional clip to `clip_grad`, then AdamW with the two groups.

  Args:
    params: the trained parameters (arrays or ShapeDtypeStructs), for the group of each leaf.
    lr_fn: step -> learning rate.
    weight_decay: the decay of the decayed group (`--weight_decay`).
    clip_grad: `--clip_grad`; None = no clipping (the release then only measures the norm).
    betas, eps: AdamW's (`--opt_betas` None = torch's (0.9, 0.999); `--opt_eps` 1e-8).
    constants: bools shaped like `params`, True for leaves kept as they are (the encoder's
      fixed position table: torch's `requires_grad=False`); None = every leaf is trained.
  """
  wd_mults = weight_decay_mults(params)
  if constants is not None:
    # optax.multi_transform hands the trained group's AdamW MaskedNodes in place of the
    # constant leaves; the multiplier tree must have the same structure.
    wd_mults = jax.tree.map(lambda m, constant: optax.MaskedNode() if constant else m,
                            wd_mults, constants)
  update = optim.adamw(lr_fn, betas=betas, eps=eps, weight_decay=weight_decay,
                       wd_mults=wd_mults)
  if constants is not None:
    labels = jax.tree.map(lambda constant: 'constant' if constant else 'trained', constants)
    update = optax.multi_transform({'trained': update, 'constant': optax.set_to_zero()}, labels)
  if clip_grad is None:
    return update
  # The constant leaves' gradients are zero, so they leave the clipped norm unchanged.
  return optax.chain(clip_by_global_norm(clip_grad), update)
