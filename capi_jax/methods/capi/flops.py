r"""Analytic FLOP count of one CAPI train step, from the config alone.

Used by `capi_jax.bench` for TFLOP/s and model FLOPs utilisation (MFU). The count follows the
algorithm as the official release runs it (docs: capi_algorithm.md), for one step on the
*global* batch:

  teacher encoder forward on all patches + registers (no drop path)
  clustering head forward, and its weight gradient (its input is the detached teacher output)
  Sinkhorn-Knopp on the teacher logits, clustering loss forward + backward
  student encoder forward + backward on the visible patches + registers (the patch embedding
    runs on all patches before the visible ones are kept, as in the release)
  predictor forward + backward: queries at the predicted positions, cross-attention to the
    final encoder output (visible patches + registers), keys and values projected per block
  student head (L2NormLinear) forward + backward, CAPI loss forward + backward

Counting rules:
- A multiply-add is 2 FLOPs: an (m, k) @ (k, n) matmul is 2*m*k*n.
- Backward of a matmul is 2x its forward (input gradient + weight gradient), except where no
  input gradient is needed: the patch embedding (its input is the image) and the clustering
  head (its input is the detached teacher output) count 1x (weight gradient only).
- Attention counts its two batched matmuls, q @ k^T and probs @ v: 2 * 2 * n_q * n_k * dim.
- Stochastic depth is the 'efficient' variant: in training every residual branch of every
  block runs on `max(int(local * (1 - drop_path_rate)), 1)` samples of each of the
  `capi.model.drop_path_groups` groups of `local = batch / groups` samples
  (encoder_decoder.Residual), so student encoder and predictor blocks count that many samples,
  not the whole batch.
- Sinkhorn and the two softmax cross-entropy losses are elementwise over (tokens, clusters)
  and are counted at 1 FLOP per element per elementwise op or reduction (see the constants).
- Not counted: norms (RMSNorm, L2 normalisation, weight norm), RoPE, GELU, the attention
  softmax, residual adds, drop-path gathers and scatters, index gathers, the optimiser
  updates (AdamW) and the EMA update. They are elementwise; for the bench shapes they are a
  few % of the total (see tests/test_flops.py, which compares with XLA's own count).
"""

import dataclasses

import ml_collections

from capi_jax.models.flops import cross_attention_block_flops
from capi_jax.models.flops import matmul_flops
from capi_jax.models.flops import patch_embed_flops
from capi_jax.models.flops import self_attention_block_flops

# Sinkhorn-Knopp: the stable exp is divide by temperature, max over the batch axis, shift, exp
# (4 ops per element); every iteration is two (sum, divide) pairs (4 ops per element).
_SINKHORN_SETUP_FLOPS_PER_ELEMENT = 4
_SINKHORN_ITER_FLOPS_PER_ELEMENT = 4
# Softmax cross-entropy against soft targets, per logit: divide by temperature, subtract max,
# exp, sum, multiply-accumulate with the target (5 ops forward); backward 2x forward.
_XENT_FORWARD_FLOPS_PER_LOGIT = 5


@dataclasses.dataclass(frozen=True)
class StepShapes:
  """The sizes one train step works on, derived from the config like the input pipeline does.

  Attributes:
    batch: global batch size.
    n_tokens: patches per image, (image_size / patch_size) ** 2.
    n_visible: visible patches per image, n_tokens - int(n_tokens * mask_ratio).
    n_predict: predicted patches per image, int(n_masked * prediction_subsampling).
    n_registers: register tokens.
    dim: encoder and predictor width.
    mlp_dim: hidden width of the MLPs.
    patch_dim: values in one patch, patch_size ** 2 * 3.
    encoder_depth: encoder blocks.
    decoder_depth: predictor blocks.
    num_clusters: K, the width of both heads.
    n_sk_iter: Sinkhorn-Knopp iterations.
    n_keep: samples every student residual branch runs on (efficient drop path), over all
      drop-path groups.
  """
  batch: int
  n_tokens: int
  n_visible: int
  n_predict: int
  n_registers: int
  dim: int
  mlp_dim: int
  patch_dim: int
  encoder_depth: int
  decoder_depth: int
  num_clusters: int
  n_sk_iter: int
  n_keep: int


def step_shapes(config: ml_collections.ConfigDict) -> StepShapes:
  """Reads the sizes of one train step from a capi_jax config (see configs/vitl.py)."""
  m, d, image_size = config.capi.model, config.capi.data, config.data.image_size
  if image_size % m.patch_size:
    raise ValueError(f'data.image_size={image_size} is not a multiple of '
                     f'capi.model.patch_size={m.patch_size}; pick sizes that divide.')
  n_tokens = (image_size // m.patch_size) ** 2
  n_masked = int(n_tokens * d.mask_ratio)
  batch = config.train.global_batch_size
  groups = m.get('drop_path_groups', 1)
  if batch % groups:
    raise ValueError(f'train.global_batch_size={batch} does not split into '
                     f'capi.model.drop_path_groups={groups} equal groups.')
  local = batch // groups
  n_keep = batch if m.drop_path_rate == 0 else groups * max(int(local * (1 - m.drop_path_rate)), 1)
  return StepShapes(
      batch=batch,
      n_tokens=n_tokens,
      n_visible=n_tokens - n_masked,
      n_predict=int(n_masked * d.prediction_subsampling),
      n_registers=m.n_registers,
      dim=m.embed_dim,
      mlp_dim=int(m.embed_dim * m.mlp_ratio),
      patch_dim=m.patch_size ** 2 * 3,
      encoder_depth=m.encoder_depth,
      decoder_depth=m.decoder_depth,
      num_clusters=config.capi.num_clusters,
      n_sk_iter=config.capi.clustering_kwargs.n_sk_iter,
      n_keep=n_keep,
  )


def encoder_forward_flops(n_patches: int, s: StepShapes) -> int:
  """Forward FLOPs of the encoder on one image with `n_patches` patches (+ registers)."""
  blocks = s.encoder_depth * self_attention_block_flops(
      n_patches + s.n_registers, s.dim, s.mlp_dim)
  return patch_embed_flops(n_patches, s.patch_dim, s.dim) + blocks


def xent_flops(n_rows: int, num_clusters: int, with_backward: bool) -> int:
  """Softmax cross-entropy against soft targets on (n_rows, num_clusters) logits."""
  forward = _XENT_FORWARD_FLOPS_PER_LOGIT * n_rows * num_clusters
  return 3 * forward if with_backward else forward


def sinkhorn_flops(n_elements: int, n_sk_iter: int) -> int:
  """Sinkhorn-Knopp on `n_elements` logits (positions x batch x clusters)."""
  per_element = _SINKHORN_SETUP_FLOPS_PER_ELEMENT + n_sk_iter * _SINKHORN_ITER_FLOPS_PER_ELEMENT
  return per_element * n_elements


def train_step_flops(config: ml_collections.ConfigDict) -> dict[str, int]:
  """FLOPs of one train step on the global batch, by part, and their sum under 'total'.

  Args:
    config: a capi_jax config (configs/vitl.py schema).

  Returns:
    {'teacher_encoder', 'clustering_head', 'sinkhorn', 'clustering_loss', 'student_encoder',
    'predictor', 'student_head', 'capi_loss', 'total'} -> FLOPs. Forward + backward where
    the part is trained (see the module docstring for the rules).
  """
  s = step_shapes(config)
  teacher_tokens = s.batch * s.n_tokens
  predicted = s.batch * s.n_predict
  student_context = s.n_visible + s.n_registers

  student_blocks_forward = s.n_keep * s.encoder_depth * self_attention_block_flops(
      student_context, s.dim, s.mlp_dim)
  # The release (and models.py) embed every patch, then keep the visible ones.
  student_embed_forward = s.batch * patch_embed_flops(s.n_tokens, s.patch_dim, s.dim)
  predictor_forward = s.n_keep * s.decoder_depth * cross_attention_block_flops(
      s.n_predict, student_context, s.dim, s.mlp_dim)
  parts = {
      'teacher_encoder': s.batch * encoder_forward_flops(s.n_tokens, s),
      # Forward + weight gradient: the head's input is detached.
      'clustering_head': 2 * matmul_flops(teacher_tokens, s.dim, s.num_clusters),
      'sinkhorn': sinkhorn_flops(teacher_tokens * s.num_clusters, s.n_sk_iter),
      'clustering_loss': xent_flops(teacher_tokens, s.num_clusters, with_backward=True),
      # Blocks 3x (forward + input and weight gradients); patch embedding 2x (no image grad).
      'student_encoder': 3 * student_blocks_forward + 2 * student_embed_forward,
      'predictor': 3 * predictor_forward,
      'student_head': 3 * matmul_flops(predicted, s.dim, s.num_clusters),
      'capi_loss': xent_flops(predicted, s.num_clusters, with_backward=True),
  }
  parts['total'] = sum(parts.values())
  return parts
