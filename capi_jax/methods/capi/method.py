"""CAPI: cluster the EMA teacher's patch features online, predict the clusters of masked patches.

Variables:
  params  = {'backbone': EncoderDecoder, 'head': L2NormLinear (student head),
             'clustering_head': ClusteringHead (the teacher's online clustering)};
  frozen  = {};
  buffers = {'ema': {'backbone', 'head'}}: the EMA of the student; its backbone is the teacher.
Optimisers: the student's AdamW over backbone + head (the release's parameter groups) and the
clustering head's own AdamW (`methods/capi/optim.py`).

Per step (the release's `do_teacher` then `do_student`, then its updates):
  1. teacher forward on all tokens with the EMA backbone (no gradient);
  2. position-wise Sinkhorn-Knopp targets and the clustering loss, whose gradient trains only
     the clustering head;
  3. targets at the predicted positions;
  4. student forward (encoder on visible tokens, predictor at the predicted positions) and head;
  5. CAPI loss = cross-entropy(targets, softmax(student logits / student_temp)) and its gradient;
  6. both AdamW steps, then the EMA of the *updated* student (`update_buffers`). The clustering
     head's update does not depend on the student, so the release's order (student step, EMA,
     clustering step) gives the same numbers.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from capi_jax.base import interface
from capi_jax.base import optim
from capi_jax.base import schedules
from capi_jax.data import transforms
from capi_jax.methods.capi import config_checks
from capi_jax.methods.capi import convert
from capi_jax.methods.capi import flops
from capi_jax.methods.capi import heads
from capi_jax.methods.capi import optim as capi_optim
from capi_jax.methods.capi import transform
from capi_jax.models import encoder_decoder
from capi_jax.models import layers

PyTree = Any
_STUDENT_PARTS = ('backbone', 'head')


class Capi(interface.Method):
  """CAPI: EncoderDecoder + L2NormLinear student head + online clustering head."""
  name = 'capi'
  loss_keys = ('capi_loss', 'clustering_loss')

  def __init__(self, config):
    super().__init__(config)
    self.model = encoder_decoder.from_config(
        config.capi.model, config.efficiency, train_rope_freqs=config.capi.optim.rope_lr_mult != 0)
    self.student_head = heads.L2NormLinear(config.capi.num_clusters)
    self.clustering_head = heads.ClusteringHead(
        config.capi.num_clusters, use_bias=config.capi.clustering_kwargs.bias)

  @classmethod
  def config_problems(cls, config):
    return config_checks.problems(config)

  # ------------------------------------------------------------------ state
  def init(self, rng: jax.Array) -> interface.Variables:
    k_backbone, k_head, k_cluster = jax.random.split(rng, 3)
    images = jnp.zeros((1, *transforms.image_shape(self.config), 3), jnp.float32)
    features = jnp.zeros((1, self.model.embed_dim), jnp.float32)
    params = {
        'backbone': self.model.init(k_backbone, images)['params'],
        'head': self.student_head.init(k_head, features)['params'],
        'clustering_head': self.clustering_head.init(k_cluster, features)['params'],
    }
    # The release copies the student into the EMA at init.
    ema = {k: jax.tree.map(jnp.copy, params[k]) for k in _STUDENT_PARTS}
    return interface.Variables(params=params, frozen={}, buffers={'ema': ema})

  def optimizer(self, params: PyTree) -> optax.GradientTransformation:
    student = {k: params[k] for k in _STUDENT_PARTS}
    return optim.partition({
        'student': (_STUDENT_PARTS, capi_optim.student_optimizer(self.config, student)),
        'clustering': (('clustering_head',), capi_optim.clustering_optimizer(self.config)),
    })

  def schedules(self) -> dict[str, schedules.ScheduleFn]:
    o, total = self.config.capi.optim, self.config.train.total_iters
    return {'lr': schedules.from_config(o.lr_schedule, total),
            'momentum': schedules.from_config(o.momentum_schedule, total)}

  # ------------------------------------------------------------------ step
  def normalize(self, images: jax.Array) -> jax.Array:
    """uint8 pixels (B, H, W, 3) -> float32 model inputs, ImageNet mean / std as the release."""
    return transforms.normalize_on_device(images)

  def loss_and_grads(self, variables, batch, rng):
    """Gradients of the CAPI loss (backbone, head) and of the clustering loss (its head).

    Args:
      variables: see the module docstring; the EMA backbone is the teacher.
      batch: images (B, H, W, 3) uint8 pixels, visible_indices (B, n_visible),
        predict_indices (B, n_predict).
      rng: this step's key (stochastic depth).

    Returns:
      (grads like params, None, {capi_loss, clustering_loss, target_entropy}).
    """
    cfg = self.config.capi
    params, ema = variables.params, variables.buffers['ema']
    images = self.normalize(batch['images'])
    predict_indices = batch['predict_indices']

    teacher_patches = self.model.apply(
        {'params': ema['backbone']}, images, method='encode_all')
    teacher_patches = jax.lax.stop_gradient(teacher_patches).astype(jnp.float32)
    # The release clusters (position, sample, dim): Sinkhorn normalises over samples per position.
    patches = jnp.swapaxes(teacher_patches, 0, 1)
    kw = cfg.clustering_kwargs
    chunks = heads.position_chunks(patches.shape[0], patches.shape[1] // layers.batch_shards(),
                                   cfg.num_clusters)
    clustering_loss, clustering_grads, targets = heads.clustering_step(
        params['clustering_head'], patches, predict_indices, kw.target_temp, kw.pred_temp,
        kw.n_sk_iter, chunks, unroll=not self.config.efficiency.get('scan_layers', False))

    def capi_loss_fn(student):
      _, predictions = self.model.apply(
          {'params': student['backbone']}, images, batch['visible_indices'], predict_indices,
          train=True, rngs={'drop_path': rng}, method='pretrain')
      logits = self.student_head.apply({'params': student['head']}, predictions)
      return heads.capi_loss(logits.astype(jnp.float32), targets, cfg.student_temp)

    capi_loss, student_grads = jax.value_and_grad(capi_loss_fn)(
        {k: params[k] for k in _STUDENT_PARTS})
    metrics = {
        'capi_loss': capi_loss,
        'clustering_loss': clustering_loss,
        'target_entropy': heads.target_entropy(targets),
    }
    return {**student_grads, 'clustering_head': clustering_grads}, None, metrics

  def update_buffers(self, variables, aux, step):
    del aux
    momentum = self.schedules()['momentum'](step)
    student = {k: variables.params[k] for k in _STUDENT_PARTS}
    return {'ema': optim.ema_update(variables.buffers['ema'], student, momentum)}

  # ------------------------------------------------------------------ data
  def train_transform(self):
    return transform.from_config(self.config)

  # ------------------------------------------------------------------ bookkeeping
  def architecture(self):
    model = self.config.capi.model.to_dict()
    # Stochastic depth changes no parameter; a run may resume with a different one.
    model.pop('drop_path_rate', None)
    model.pop('drop_path_groups', None)
    return {'model': model, 'capi.num_clusters': self.config.capi.num_clusters,
            'capi.clustering_kwargs.bias': self.config.capi.clustering_kwargs.bias}

  def flops_per_step(self):
    return flops.train_step_flops(self.config)

  # ------------------------------------------------------------------ evaluation
  def eval_model(self) -> nn.Module:
    return self.model

  def eval_params(self, variables, which):
    if which not in ('student', 'ema'):
      raise ValueError(f"which must be 'student' or 'ema', got {which!r}.")
    source = variables.params if which == 'student' else variables.buffers['ema']
    return source['backbone']

  def official_backbone(self, state_dict, which):
    """The release's backbone (`convert.parts_from_state_dict`; a full training checkpoint's
    student or, for 'ema', its `student_ema`), float32 as the official loader evaluates it."""
    source = 'student' if which == 'student' else 'student_ema'
    backbone = convert.parts_from_state_dict(state_dict, self.config, source)['backbone']
    return self.eval_model(), jax.tree.map(lambda x: np.asarray(x, np.float32), backbone)
