"""End-to-end fine-tuning's classifier, its layer-decay parameter groups and its loss.

The recipe is BEiT's as CAE v2's release runs it (`tools/run_class_finetuning.py`,
`models/modeling_finetune.py`, `furnace/optim_factory.py`; docs/reference/caev2_eval_protocols.md):
  features = fc_norm(mean of the final patch tokens)   (the backbone has no final norm: the
             pretrained `norm` is loaded into `fc_norm`)
  logits   = head(features), head trunc-normal(0.02) x init_scale, bias 0
  loss     = soft-target cross-entropy on Mixup / CutMix targets with label smoothing inside
             (`mixing.py`)
  AdamW over per-parameter groups: lr x ld^(L + 1 - layer_id) with layer id 0 for the
  embeddings (`cls_token`, `pos_embed`, `patch_embed`), i + 1 for block i, L + 1 for everything
  else (`fc_norm`, `head`); no weight decay for 1-D parameters, biases, `pos_embed` and
  `cls_token` (the relative position tables are 2-D: decayed).

Parameter tree: {'backbone': `vit.ViT` params, 'fc_norm': {scale, bias} (D,),
'head': {kernel (D, C), bias (C,)}}.
"""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from capi_jax.base import optim
from capi_jax.models import layers
from capi_jax.models import vit

Array = jax.Array

# Parameters the release keeps out of weight decay besides 1-D ones and biases
# (`no_weight_decay()`): the last component of their path.
NO_DECAY_NAMES = ('pos_embed', 'cls_token')
EMBEDDING_NAMES = ('cls_token', 'pos_embed', 'patch_embed', 'mask_token')


class Classifier(nn.Module):
  """A ViT backbone, mean pooling of its patch tokens, `fc_norm` and a linear head.

  Attributes:
    backbone: the ViT (without final norm: `fc_norm` plays its part).
    num_classes: C.
    init_scale: the head's initial weights are trunc-normal(0.02) times this (the release's
      `init_scale`, 0.001).
  """
  backbone: vit.ViT
  num_classes: int
  init_scale: float = 0.001

  @nn.compact
  def __call__(self, images: Array, train: bool = False) -> Array:
    """images (batch, H, W, 3) -> logits (batch, C) float32; `train` turns on drop path."""
    tokens = self.backbone.encode(images, train=train).tokens
    pooled = jnp.mean(tokens[:, 1:].astype(jnp.float32), axis=1)
    pooled = layers.layer_norm(self.backbone.norm_eps, name='fc_norm')(pooled)
    std = 0.02 * self.init_scale
    head = nn.Dense(self.num_classes, kernel_init=nn.initializers.truncated_normal(std),
                    bias_init=nn.initializers.zeros, name='head')
    return head(pooled)


def layer_id(path: str, depth: int) -> int:
  """The release's `get_num_layer_for_vit` on a '/'-joined path below the classifier.

  'backbone/patch_embed/kernel' -> 0, 'backbone/blocks_3/...' -> 4, 'head/kernel' -> depth + 1.
  """
  parts = path.split('/')
  inner = parts[1:] if parts[0] == 'backbone' else parts
  if parts[0] == 'backbone' and inner[0] in EMBEDDING_NAMES:
    return 0
  match = re.fullmatch(r'blocks_(\d+)', inner[0]) if parts[0] == 'backbone' else None
  if match:
    return int(match.group(1)) + 1
  return depth + 1


def group_rule(depth: int, layer_decay: float, frozen: tuple[str, ...] = ('pos_embed',)):
  """(path, ndim) -> `optim.Group` of the recipe: layer-decayed lr, decay only for >= 2-D weights.

  `frozen`: the backbone's never-trained top-level parameters (`ViT.frozen_params`). Scanned
  blocks ('backbone/blocks/...', leaves (depth, ...)) get a (depth, 1, ...) lr multiplier, one
  per block.
  """

  def rule(path: str, ndim: int) -> optim.Group:
    parts = path.split('/')
    scanned = parts[:2] == ['backbone', 'blocks']
    no_decay = (ndim - scanned <= 1 or parts[-1] == 'bias' or parts[-1] in NO_DECAY_NAMES)
    is_frozen = parts[0] == 'backbone' and parts[1] in frozen
    if scanned:
      ids = np.arange(1, depth + 1)
      lr_mult = (layer_decay ** (depth + 1 - ids)).reshape((depth,) + (1,) * (ndim - 1))
    else:
      lr_mult = layer_decay ** (depth + 1 - layer_id(path, depth))
    return optim.Group(lr_mult=lr_mult, wd_mult=0.0 if no_decay else 1.0, frozen=is_frozen)

  return rule


def soft_target_cross_entropy(logits: Array, targets: Array) -> Array:
  """timm's SoftTargetCrossEntropy: mean over the batch of -sum(t * log_softmax(logits))."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return jnp.mean(jnp.sum(-targets * logp, axis=-1))
