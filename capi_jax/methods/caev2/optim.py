"""CAE v2's optimiser: torch's global-norm clip, then AdamW with the release's two groups.

As `tools/run_pretraining.py`, `furnace/optim_factory.py` and `furnace/engine_for_pretraining.py`
(Atten4Vis/CAE, a7fd162) run it; see `docs/reference/caev2_algorithm.md`, Optimisation:
  - groups (`get_parameter_groups`): weight decay for every tensor with >= 2 dims that is not a
    bias, 0 for the rest (`decay_group`). The model defines no `no_weight_decay`, so
    `mask_token` and the encoder's `cls_token` (both (1, 1, D)) are decayed. The fixed position
    tables are not optimised: the regressor's is not a parameter, the encoder's is a frozen
    group (no update, no optimiser state; the method's `param_groups`);
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
# The optimiser state's names for the trained and the frozen parameters: those its checkpoints
# were written with (before the frozen ones were called so).
STATE_LABELS = ('trained', 'constant')


def decay_group(path: str, ndim: int) -> optim.Group:
  """The release's group of a trained parameter: decayed iff >= 2 dims per block (a scanned
  stack's leading layer axis does not count: a stacked bias stays undecayed) and not named
  'bias'."""
  per_block = stack.block_ndim(path, ndim)
  return optim.Group(wd_mult=1.0 if per_block >= 2 and path.split('/')[-1] != 'bias' else 0.0)


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


def optimizer(groups: PyTree, lr_fn: schedules.ScheduleFn, *, weight_decay: float,
              clip_grad: float | None, betas: tuple[float, float] = (0.9, 0.999),
              eps: float = 1e-8) -> optax.GradientTransformation:
  """The release's update: optional clip to `clip_grad`, then AdamW with the groups.

  Args:
    groups: a `Group` per parameter (`decay_group`, frozen for the fixed position table:
      torch's `requires_grad=False`).
    lr_fn: step -> learning rate.
    weight_decay: the decay of the decayed group (`--weight_decay`).
    clip_grad: `--clip_grad`; None = no clipping (the release then only measures the norm).
    betas, eps: AdamW's (`--opt_betas` None = torch's (0.9, 0.999); `--opt_eps` 1e-8).
  """
  update = optim.adamw(lr_fn, betas=betas, eps=eps, weight_decay=weight_decay, groups=groups,
                       state_labels=STATE_LABELS)
  if clip_grad is None:
    return update
  # The frozen leaves' gradients are zero, so they leave the clipped norm unchanged.
  return optax.chain(clip_by_global_norm(clip_grad), update)
