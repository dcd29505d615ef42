"""CAPI: cluster the EMA teacher's patch features online, predict the clusters of masked patches.

Per step (the reference's `do_teacher` then `do_student`):
  1. teacher forward on all tokens with the EMA backbone (no gradient);
  2. position-wise Sinkhorn-Knopp targets and the clustering loss, whose gradient trains only
     the clustering head;
  3. targets at the predicted positions;
  4. student forward (encoder on visible tokens, predictor at the predicted positions) and head;
  5. CAPI loss = cross-entropy(targets, softmax(student logits / student_temp)) and its gradient.
"""

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from capi_jax.methods.capi import heads
from capi_jax.models import encoder_decoder
from capi_jax.core import optim

PyTree = Any


class Capi:
  """CAPI: EncoderDecoder + L2NormLinear student head + online clustering teacher head."""

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config
    self.model = encoder_decoder.from_config(config)
    self.student_head = heads.L2NormLinear(config.capi.num_clusters)
    self.clustering_head = heads.ClusteringHead(
        config.capi.num_clusters, use_bias=config.capi.clustering_kwargs.bias)

  def init(self, rng: jax.Array, image_shape: tuple[int, int]) -> tuple[PyTree, PyTree]:
    """Fresh parameters: ({'backbone', 'head'} student, clustering head)."""
    k_backbone, k_head, k_cluster = jax.random.split(rng, 3)
    images = jnp.zeros((1, *image_shape, 3), jnp.float32)
    features = jnp.zeros((1, self.model.embed_dim), jnp.float32)
    student = {
        'backbone': self.model.init(k_backbone, images)['params'],
        'head': self.student_head.init(k_head, features)['params'],
    }
    clustering = self.clustering_head.init(k_cluster, features)['params']
    return student, clustering

  def teacher_head_optimizer(self) -> optax.GradientTransformation:
    return optim.clustering_optimizer(self.config)

  def grads(
      self,
      student: PyTree,
      ema: PyTree,
      clustering: PyTree,
      batch: dict[str, jax.Array],
      rng: jax.Array,
  ) -> tuple[PyTree, PyTree, dict[str, jax.Array]]:
    """Gradients of the CAPI loss (student) and of the clustering loss (clustering head).

    Args:
      student, ema: {'backbone', 'head'} parameters; the EMA backbone is the teacher's.
      clustering: the clustering head's parameters.
      batch: images (B, H, W, 3), visible_indices (B, n_visible), predict_indices (B, n_predict).
      rng: this step's key (stochastic depth).

    Returns:
      (student grads, clustering grads, {capi_loss, clustering_loss, target_entropy}).
    """
    cfg = self.config.capi
    images = batch['images']
    predict_indices = batch['predict_indices']

    teacher_patches = self.model.apply(
        {'params': ema['backbone']}, images, method='encode_all')
    teacher_patches = jax.lax.stop_gradient(teacher_patches).astype(jnp.float32)
    # The reference clusters (position, sample, dim): Sinkhorn normalises over samples per position.
    clustering_fn = lambda p: heads.clustering_targets_and_loss(
        p, jnp.swapaxes(teacher_patches, 0, 1), cfg.clustering_kwargs.target_temp,
        cfg.clustering_kwargs.pred_temp, cfg.clustering_kwargs.n_sk_iter)
    (clustering_loss, assignments), clustering_grads = jax.value_and_grad(
        clustering_fn, has_aux=True)(clustering)
    assignments = jax.lax.stop_gradient(jnp.swapaxes(assignments, 0, 1))  # (B, n_tokens, K)
    targets = jnp.take_along_axis(assignments, predict_indices[:, :, None], axis=1)

    def capi_loss_fn(params):
      _, predictions = self.model.apply(
          {'params': params['backbone']}, images, batch['visible_indices'], predict_indices,
          train=True, rngs={'drop_path': rng}, method='pretrain')
      logits = self.student_head.apply({'params': params['head']}, predictions)
      return heads.capi_loss(logits.astype(jnp.float32), targets, cfg.student_temp)

    capi_loss, student_grads = jax.value_and_grad(capi_loss_fn)(student)
    metrics = {
        'capi_loss': capi_loss,
        'clustering_loss': clustering_loss,
        'target_entropy': heads.target_entropy(targets),
    }
    return student_grads, clustering_grads, metrics
