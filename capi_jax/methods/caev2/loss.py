"""CAE v2's targets and loss (`furnace/engine_for_pretraining.py` of Atten4Vis/CAE, a7fd162).

The frozen teacher's features of every token, reordered to the student's output order
[class, visible (ascending), masked (ascending)] and L2-normalised per row, are the labels; the
loss is the plain mean of 1 - cos(output, label) over all batch x (1 + N) rows, i.e.
`F.cosine_embedding_loss(..., target=+1, reduction='mean')`, so class, visible and masked
tokens weigh by their counts. See `docs/reference/caev2_algorithm.md`, Teacher and Loss.
"""

import jax
import jax.numpy as jnp

from capi_jax.methods.caev2 import regressor

Array = jax.Array

# torch's cosine_embedding_loss adds this to both squared norms under the square root.
_COSINE_EPS = 1e-12


def labels(teacher_features: Array, visible_indices: Array, masked_indices: Array) -> Array:
  """The regression targets, without gradient.

  Args:
    teacher_features: (batch, 1 + N, C) the teacher's output in natural order [class, patches].
    visible_indices: (batch, n_visible) ascending; masked_indices: (batch, n_masked) ascending.

  Returns:
    (batch, 1 + N, C) float32 unit rows, order [class, visible, masked].
  """
  patches = teacher_features[:, 1:]
  take = lambda idx: jnp.take_along_axis(patches, idx[:, :, None], axis=1)
  ordered = jnp.concatenate(
      [teacher_features[:, :1], take(visible_indices), take(masked_indices)], axis=1)
  return jax.lax.stop_gradient(regressor.normalize_rows(ordered))


def token_losses(outputs: Array, targets: Array) -> Array:
  """1 - cos per token, as torch's cosine_embedding_loss with target +1 computes it.

  Args:
    outputs: (batch, n, C) the student's outputs; targets: (batch, n, C) the labels.

  Returns:
    (batch, n) float32.
  """
  outputs, targets = outputs.astype(jnp.float32), targets.astype(jnp.float32)
  dot = jnp.sum(outputs * targets, axis=-1)
  sq_out = jnp.sum(jnp.square(outputs), axis=-1) + _COSINE_EPS
  sq_tgt = jnp.sum(jnp.square(targets), axis=-1) + _COSINE_EPS
  return 1.0 - dot / jnp.sqrt(sq_out * sq_tgt)


def alignment_loss(outputs: Array, targets: Array, weight: float = 1.0) -> Array:
  """`weight` (`--latent_alignment_loss_weight`) x the mean of `token_losses`; float32 ()."""
  return weight * jnp.mean(token_losses(outputs, targets))
