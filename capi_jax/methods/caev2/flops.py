r"""Analytic FLOP count of one CAE v2 train step, from the config alone.

For `capi_jax.bench` (TFLOP/s, MFU). One step on the global batch, as the method runs it:
  teacher forward at the teacher's resolution (no gradient): its evaluation forward, i.e.
    CLIP's patch embedding, blocks on [class, patches] and projection; or CAPI's encoder on
    registers + patches and its predictor's first block (the global representation);
  student encoder forward + backward on [class, visible] (the patch embedding runs on every
    patch before the visible ones are kept, as in the release);
  the encoder-to-regressor projection (when the widths differ) on [class, visible];
  regressor blocks forward + backward: masked queries cross-attending to [visible, queries];
  decoder head forward + backward on all 1 + N tokens.
Counting rules as CAPI's (`methods/capi/flops.py`): a multiply-add is 2 FLOPs; backward is 2x
forward, except the patch embedding (weight gradient only: 1x); norms, activations, softmax,
L2 normalisation, the cosine loss and the optimiser are not counted. Stochastic depth here is
timm's (the branch is computed for every sample, then masked), so it saves nothing.
"""

import ml_collections

from capi_jax.methods.caev2 import teacher as teacher_lib
from capi_jax.models.flops import cross_attention_block_flops
from capi_jax.models.flops import matmul_flops
from capi_jax.models.flops import patch_embed_flops
from capi_jax.models.flops import self_attention_block_flops


def vit_forward_flops(model: ml_collections.ConfigDict, image_size: int,
                      n_kept: int | None = None) -> int:
  """Forward FLOPs of a `vit.ViT` on one image: patch embedding of every patch, blocks on the
  class token and `n_kept` patches (all when None), then the projection if `out_dim`."""
  n_patches = (image_size // model.patch_size) ** 2
  n_tokens = 1 + (n_patches if n_kept is None else n_kept)
  dim = model.embed_dim
  flops = patch_embed_flops(n_patches, 3 * model.patch_size ** 2, dim)
  flops += model.depth * self_attention_block_flops(n_tokens, dim, int(dim * model.mlp_ratio))
  if model.get('out_dim', 0):
    flops += matmul_flops(n_tokens, dim, model.out_dim)
  return flops


def capi_eval_forward_flops(model: ml_collections.ConfigDict, image_size: int) -> int:
  """Forward FLOPs of CAPI's EncoderDecoder evaluation forward on one image."""
  n_patches = (image_size // model.patch_size) ** 2
  context = n_patches + model.n_registers
  dim, mlp_dim = model.embed_dim, int(model.embed_dim * model.mlp_ratio)
  return (patch_embed_flops(n_patches, 3 * model.patch_size ** 2, dim)
          + model.encoder_depth * self_attention_block_flops(context, dim, mlp_dim)
          + cross_attention_block_flops(n_patches, context, dim, mlp_dim))


def train_step_flops(config: ml_collections.ConfigDict) -> dict[str, int]:
  """FLOPs of one train step on the global batch, by part, and their sum under 'total'.

  Returns:
    {'teacher', 'student_encoder', 'regressor', 'decoder', 'total'} -> FLOPs.
  """
  c = config.caev2
  m, t = c.model, c.teacher
  batch = config.train.global_batch_size
  n_patches = (config.data.image_size // m.patch_size) ** 2
  n_masked = c.num_mask_patches
  n_visible = n_patches - n_masked
  dim, width = m.embed_dim, c.regressor.embed_dim
  mlp_width = int(width * m.mlp_ratio)

  teacher_forward = (capi_eval_forward_flops(t.model, t.image_size) if t.backbone ==
                     teacher_lib.CAPI else vit_forward_flops(t.model, t.image_size))
  embed = patch_embed_flops(n_patches, 3 * m.patch_size ** 2, dim)
  encoder = vit_forward_flops(m, config.data.image_size, n_visible) - embed
  projection = matmul_flops(1 + n_visible, dim, width) if width != dim else 0
  blocks = c.regressor.depth * cross_attention_block_flops(
      n_masked, n_visible + n_masked, width, mlp_width)
  head = matmul_flops(1 + n_patches, width, teacher_lib.out_dim(t))
  parts = {
      'teacher': batch * teacher_forward,
      # Blocks 3x (forward + input and weight gradients); patch embedding 2x (no image grad).
      'student_encoder': batch * (3 * encoder + 2 * embed),
      'regressor': batch * 3 * (projection + blocks),
      'decoder': batch * 3 * head,
  }
  parts['total'] = sum(parts.values())
  return parts
