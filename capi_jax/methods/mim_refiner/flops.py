r"""Analytic FLOP count of one MIM-Refiner train step on the global batch, from the config.

Counted (2 FLOPs per multiply-add, `capi_jax.models.flops`):
  - the encoder on every view: G global views at data.image_size and L local views at
    the local size, each (prefix + patches) tokens through the patch embedding and the
    blocks; stage 3 adds the backward (2x forward; the patch embedding 1x, its input being
    the image) through the blocks the heads read (all of them with a 'main' head);
  - each head's projector and predictor matmuls on all (G + L) x B rows, forward and backward;
  - each head's queue lookup (anchors x queue similarities) and NNA loss logits
    (G x max(G, L) blocks of B x B dot products), forward (and the logits' backward).
Not counted: norms, GELU, softmax, top-k, the optimiser and EMA updates (elementwise).
"""

from collections.abc import Sequence

import flax.linen as nn
import ml_collections

from capi_jax.methods.mim_refiner import augment
from capi_jax.methods.mim_refiner import encoder as encoder_lib
from capi_jax.models.flops import matmul_flops
from capi_jax.models.flops import patch_embed_flops
from capi_jax.models.flops import self_attention_block_flops


def _encoder_flops(model: nn.Module, image_size: int, n_blocks: int) -> tuple[int, int]:
  """(patch embedding, n_blocks blocks) forward FLOPs for one image."""
  dim, patch = model.embed_dim, model.patch_size
  n_patches = (image_size // patch) ** 2
  tokens = encoder_lib.n_prefix(model) + n_patches
  block = self_attention_block_flops(tokens, dim, int(dim * model.mlp_ratio))
  return patch_embed_flops(n_patches, 3 * patch * patch, dim), n_blocks * block


def train_step_flops(config: ml_collections.ConfigDict, model: nn.Module,
                     views: augment.MultiCrop, blocks: Sequence[int]) -> dict[str, int]:
  """FLOPs of one step by part ('encoder', 'heads', 'queue', 'loss') and their 'total'.

  Args:
    config: the run config (`mim_refiner`, `train.global_batch_size`).
    model: the encoder.
    views: the training views.
    blocks: the blocks the heads read.
  """
  cfg = config.mim_refiner
  b = config.train.global_batch_size
  n_global, n_local = views.n_global, views.n_local
  depth = encoder_lib.depth(model)
  trained_blocks = depth if encoder_lib.MAIN_HEAD in cfg.heads else max(blocks, default=-1) + 1
  encoder = 0
  for size, n_views in ((views.global_size, n_global), (views.local_size, n_local)):
    embed, body = _encoder_flops(model, size, depth)
    encoder += n_views * b * (embed + body)
    if cfg.stage == 3:
      _, trained = _encoder_flops(model, size, trained_blocks)
      encoder += n_views * b * (embed + 2 * trained)
  rows, n_heads = (n_global + n_local) * b, len(cfg.heads)
  widths = ([(model.embed_dim, cfg.proj_hidden_dim)]
            + [(cfg.proj_hidden_dim, cfg.proj_hidden_dim)] * cfg.proj_hidden_layers
            + [(cfg.proj_hidden_dim, cfg.output_dim), (cfg.output_dim, cfg.pred_hidden_dim)]
            + [(cfg.pred_hidden_dim, cfg.pred_hidden_dim)] * cfg.pred_hidden_layers
            + [(cfg.pred_hidden_dim, cfg.output_dim)])
  heads = n_heads * 3 * sum(matmul_flops(rows, k, n) for k, n in widths)
  queue = n_heads * matmul_flops(n_global * b, cfg.output_dim, cfg.queue_size)
  loss = n_heads * 3 * n_global * max(n_global, n_local) * matmul_flops(b, cfg.output_dim, b)
  parts = {'encoder': encoder, 'heads': heads, 'queue': queue, 'loss': loss}
  return {**parts, 'total': sum(parts.values())}
