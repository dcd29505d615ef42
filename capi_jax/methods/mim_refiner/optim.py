"""MIM-Refiner's optimisation: lr scaling, parameter groups, block freezer, AdamW.

As the official release sets it up (`optimizers/optimizer_wrapper.py`, `param_group_modifiers/`,
`freezers/vit_block_freezer.py`, `zztemplates/schedules/wupcos_epoch.yaml`):
  - lr = base_lr x batch_size / 256 (`linear_lr_scaler`), the peak of the schedule
    (`base.schedules.wupcos_fn`, per update);
  - a parameter's lr is lr_scale x schedule(t); AdamW (torch semantics, `base.optim.adamw`)
    with per-parameter weight decay;
  - weight decay 0 for names ending '.bias', for tensors of ndim <= 1 and, in the ViT, for
    `cls_tokens.tokens` and a learnable `pos_embed.embed`;
  - layer-wise lr decay d (encoder of stage 3): patch embed, CLS tokens, position embedding
    d^(depth + 1); block i d^(depth - i) (the last block is already decayed); final norm 1;
  - the block freezer (`end_percent` e): blocks 0 .. int(depth e) - 1, the patch embedding,
    CLS tokens and position embedding get no gradient and no update (requires_grad=False).
The encoder and every head have their own optimiser in the release, all stepped after one
backward of the summed loss. AdamW is element-wise and the releases give every submodel the same
lr and schedule, differing only in weight decay, which is per parameter here; so one `adamw`
over all submodels' `Group`s takes the same steps.

A `Group` here carries the release's lr scale as `lr_mult` and the parameter's whole weight
decay as `wd_mult` (`optimizer` runs AdamW with weight_decay 1: the release sets a decay per
submodel, not one to scale). Groups are decided from the parameter's official name
(`ContrastiveModel` submodel names without the submodel prefix, e.g.
'blocks.3.attn.qkv.weight', 'projector.0.1.bias') and ndim.
"""

from typing import Any

import optax

from capi_jax.base import optim
from capi_jax.base import schedules

PyTree = Any

LR_DIVISOR = 256
# Names the ViT excludes from weight decay besides biases and ndim <= 1
# (`Vit.get_model_specific_param_group_modifiers`).
_VIT_NO_WEIGHT_DECAY = ('cls_tokens.tokens', 'pos_embed.embed')
_STEM_PREFIXES = ('patch_embed', 'cls_token', 'pos_embed', 'embed_norm')


def scaled_lr(base_lr: float, batch_size: int) -> float:
  """The release's linear lr scaling: base_lr x batch_size / 256."""
  return base_lr * batch_size / LR_DIVISOR


def weight_decay_of(name: str, ndim: int, weight_decay: float) -> float:
  """The release's weight decay of a parameter (0 for biases, ndim <= 1, CLS / pos tokens)."""
  if name.endswith('.bias') or ndim <= 1 or name in _VIT_NO_WEIGHT_DECAY:
    return 0.0
  return weight_decay


def layer_decay_scale(name: str, depth: int, decay: float) -> float:
  """`LayerwiseLrDecayModifier`'s lr scale of a ViT parameter.

  Raises:
    ValueError: a name the release's modifier does not know (it raises too).
  """
  if name.startswith(_STEM_PREFIXES) or name == 'mask_token':
    return decay ** (depth + 1)
  if name.startswith('block'):
    return decay ** (depth - int(name.split('.')[1]))
  if name.startswith(('norm.', 'head_norm.', 'head.')):
    return 1.0
  raise ValueError(f'Layer-wise lr decay has no rule for {name!r} (known: patch_embed, '
                   'cls_token(s), pos_embed, embed_norm, mask_token, blocks.<i>, norm, head).')


def frozen_by_block_freezer(name: str, depth: int, end_percent: float) -> bool:
  """Whether `VitBlockFreezer(end_percent=...)` (default flags) freezes the parameter."""
  if not 0.0 <= end_percent <= 1.0:
    raise ValueError(f'end_percent={end_percent} must lie in [0, 1].')
  if name.startswith(('patch_embed.', 'cls_tokens.', 'pos_embed.')):
    return True
  return name.startswith('blocks.') and int(name.split('.')[1]) < int(depth * end_percent)


def encoder_group(name: str, ndim: int, *, depth: int, weight_decay: float,
                  layer_decay: float | None = None,
                  freeze_end_percent: float | None = None) -> optim.Group:
  """The encoder parameter's group (layer decay / freezer only when given)."""
  return optim.Group(
      lr_mult=1.0 if layer_decay is None else layer_decay_scale(name, depth, layer_decay),
      wd_mult=weight_decay_of(name, ndim, weight_decay),
      frozen=(freeze_end_percent is not None
              and frozen_by_block_freezer(name, depth, freeze_end_percent)))


def head_group(name: str, ndim: int, *, weight_decay: float) -> optim.Group:
  """An ID head parameter's group: lr scale 1, weight decay by the generic rule."""
  return optim.Group(wd_mult=weight_decay_of(name, ndim, weight_decay))


def optimizer(groups: PyTree, lr_fn: schedules.ScheduleFn, *, betas: tuple[float, float],
              eps: float) -> optax.GradientTransformation:
  """torch AdamW with each parameter's `Group` (its `wd_mult` the whole decay); frozen leaves
  get a zero update and no optimiser state.

  Args:
    groups: a `Group` per parameter, the params' structure.
    lr_fn: the schedule (its peak is the scaled lr).
    betas: Adam's (beta1, beta2).
    eps: Adam's eps.
  """
  return optim.adamw(lr_fn, betas=betas, eps=eps, weight_decay=1.0, groups=groups,
                     state_labels=optim.STATE_LABELS)
