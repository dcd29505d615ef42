"""CAE v2: regress a frozen teacher's features of every token from the visible patches.

Variables:
  params  = {'encoder': vit.ViT of config.caev2.model (the 'caev2' family: BEiT blocks, fixed
             sin-cos table, class token), 'regressor': RegressorDecoder (projection, cross-attention
             regressor, shared decoder norm and head)};
  frozen  = {'teacher': the teacher backbone's params (`teacher.py`: CLIP's visual ViT in the
             release, or any capi_jax backbone)};
  buffers = {} (no EMA).
Optimiser (`optim.py`): clip at `caev2.optim.clip_grad`, then torch AdamW with the release's two
weight-decay groups; the encoder's fixed position table is a frozen group (not optimised).

Per step (`docs/reference/caev2_algorithm.md`; the release's `train_one_epoch`):
  1. teacher forward on the teacher view, no gradient: [class, patches] features (B, 1+N, C);
  2. labels: reordered to [class, visible, masked] (each ascending), rows L2-normalised;
  3. student: encoder on [class, visible] (stochastic depth), regressor on the masked
     positions, decoder norm and head on [class, visible, regressed], rows L2-normalised;
  4. loss = `caev2.loss_weight` x the mean of 1 - cos over all B x (1 + N) rows; its gradient
     reaches the encoder through the visible outputs and the regressor's keys and values.
The engine then clips and steps (`engine/step.py`).
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
from capi_jax.methods.caev2 import config_checks
from capi_jax.methods.caev2 import flops
from capi_jax.methods.caev2 import loss as caev2_loss
from capi_jax.methods.caev2 import optim as caev2_optim
from capi_jax.methods.caev2 import regressor
from capi_jax.methods.caev2 import teacher as teacher_lib
from capi_jax.methods.caev2 import transform
from capi_jax.models import vit
from capi_jax.weights import vit as vit_weights

PyTree = Any


class CaeV2(interface.Method):
  """CAE v2: student encoder + regressor/decoder, frozen teacher (see the module docstring)."""
  name = 'caev2'
  loss_keys = ('loss',)

  def __init__(self, config):
    super().__init__(config)
    c, e = config.caev2, config.efficiency
    self.encoder = vit.from_config(c.model, e)
    self.teacher = teacher_lib.from_config(config)
    self.grid = (config.data.image_size // c.model.patch_size,) * 2
    self.regressor = regressor.RegressorDecoder(
        grid=self.grid, embed_dim=c.regressor.embed_dim, depth=c.regressor.depth,
        num_heads=c.regressor.num_heads, out_dim=teacher_lib.out_dim(c.teacher),
        mlp_ratio=c.model.mlp_ratio, layer_scale_init=c.regressor.layer_scale_init,
        drop_path_rate=c.model.get('drop_path_rate', 0.0),
        norm_eps=c.model.norm_eps, dtype=jnp.dtype(e.compute_dtype),
        param_dtype=jnp.dtype(e.param_dtype), remat_policy=e.remat_policy,
        scan_layers=e.get('scan_layers', False), attention=e.get('attention', 'xla'))

  @classmethod
  def config_problems(cls, config):
    return config_checks.problems(config)

  # ------------------------------------------------------------------ state
  def init(self, rng: jax.Array) -> interface.Variables:
    k_encoder, k_regressor, k_teacher = jax.random.split(rng, 3)
    size, teacher_size = self.config.data.image_size, self.config.caev2.teacher.image_size
    n_patches = self.grid[0] * self.grid[1]
    n_masked = self.config.caev2.num_mask_patches
    order = jnp.arange(n_patches, dtype=jnp.int32)[None]
    latents = jnp.zeros((1, 1 + n_patches - n_masked, self.encoder.embed_dim), jnp.float32)
    params = {
        'encoder': self.encoder.init(k_encoder, jnp.zeros((1, size, size, 3)))['params'],
        'regressor': self.regressor.init(k_regressor, latents, order[:, n_masked:],
                                         order[:, :n_masked])['params'],
    }
    # Replaced by the checkpoint (`from_pretrained`) when a run starts.
    teacher = self.teacher.init(k_teacher, jnp.zeros((1, teacher_size, teacher_size, 3)))
    return interface.Variables(params=params, frozen={'teacher': teacher['params']}, buffers={})

  def pretrained_paths(self) -> dict[str, str]:
    checkpoint = self.config.caev2.teacher.checkpoint
    return {**super().pretrained_paths(), **({'teacher': checkpoint} if checkpoint else {})}

  def architecture_keys(self, role: str) -> str:
    if role == 'teacher':
      return 'caev2.teacher.backbone and caev2.teacher.model'
    return super().architecture_keys(role)

  def from_pretrained(self, variables: interface.Variables,
                      pretrained: dict[str, interface.Pretrained]) -> interface.Variables:
    """The teacher from its checkpoint; the student starts from scratch, as in the release."""
    if set(pretrained) != {'teacher'}:
      raise ValueError(f'CAE v2 loads only its teacher (caev2.teacher.checkpoint), got '
                       f'{sorted(pretrained)}: leave config.init.checkpoint empty.')
    teacher = teacher_lib.load(pretrained['teacher'], variables.frozen['teacher'], self.config,
                               self.teacher)
    return variables._replace(frozen={**variables.frozen, 'teacher': teacher})

  def param_groups(self, params: PyTree) -> PyTree:
    """A `Group` per parameter: the release's two weight-decay groups; the encoder's frozen
    tables (`ViT.frozen_params`: the fixed sin-cos table, torch's `requires_grad=False`)
    frozen."""
    def rule(path: str, ndim: int) -> optim.Group:
      part, name = path.split('/')[:2]
      if part == 'encoder' and name in self.encoder.frozen_params:
        return optim.Group(frozen=True)
      return caev2_optim.decay_group(path, ndim)
    return optim.group_tree(params, rule)

  def optimizer(self, params: PyTree) -> optax.GradientTransformation:
    o = self.config.caev2.optim
    return caev2_optim.optimizer(
        self.param_groups(params), self.schedules()['lr'], weight_decay=o.weight_decay,
        clip_grad=o.clip_grad, betas=tuple(o.betas), eps=o.eps)

  def schedules(self) -> dict[str, schedules.ScheduleFn]:
    o = self.config.caev2.optim
    return {'lr': schedules.from_config(o.lr_schedule, self.config.train.total_iters)}

  # ------------------------------------------------------------------ step
  def teacher_features(self, teacher_params: PyTree, teacher_images: jax.Array) -> jax.Array:
    """(batch, 1 + N, C) float32 teacher features, natural order, no gradient."""
    return teacher_lib.features(self.teacher, teacher_params, teacher_images)

  def student_outputs(self, params: PyTree, images: jax.Array, visible_indices: jax.Array,
                      masked_indices: jax.Array, rng: jax.Array | None = None) -> jax.Array:
    """The student's unit-norm outputs (batch, 1 + N, C), order [class, visible, masked].

    Args:
      params: {'encoder', 'regressor'}.
      images: (batch, S, S, 3) the student view.
      visible_indices, masked_indices: (batch, n_visible) and (batch, n_masked), ascending.
      rng: stochastic depth key (training); None = deterministic.
    """
    train = rng is not None
    keys = jax.random.split(rng) if train else None
    latents = self.encoder.apply(
        {'params': params['encoder']}, images, visible_indices=visible_indices, train=train,
        rngs={'drop_path': keys[0]} if train else {}, method='encode').tokens
    outputs, _ = self.regressor.apply(
        {'params': params['regressor']}, latents, visible_indices, masked_indices,
        deterministic=not train, rngs={'drop_path': keys[1]} if train else {})
    return outputs

  def normalize(self, images: jax.Array, teacher_images: jax.Array
                ) -> tuple[jax.Array, jax.Array]:
    """uint8 pixels -> float32 inputs: the student's ImageNet-normalised (B, S, S, 3), the
    teacher's normalised with `caev2.teacher.normalization` (B, S_t, S_t, 3)."""
    teacher_stats = transforms.NORMALIZATIONS[self.config.caev2.teacher.normalization]
    return (transforms.normalize_on_device(images),
            transforms.normalize_on_device(teacher_images, *teacher_stats))

  def loss_and_grads(self, variables, batch, rng):
    """Gradients of the alignment loss for the encoder and the regressor/decoder.

    Args:
      variables: see the module docstring.
      batch: images (B, S, S, 3), teacher_images (B, S_t, S_t, 3) (uint8 pixels),
        visible_indices (B, N - n_masked), masked_indices (B, n_masked).
      rng: this step's key (stochastic depth).

    Returns:
      (grads like params, None, {loss, loss_class, loss_visible, loss_masked, grad_norm}):
      the per-part terms are the mean 1 - cos of each kind of token (the loss weighs them by
      their counts); grad_norm is before clipping.
    """
    visible, masked = batch['visible_indices'], batch['masked_indices']
    images, teacher_images = self.normalize(batch['images'], batch['teacher_images'])
    targets = caev2_loss.labels(
        self.teacher_features(variables.frozen['teacher'], teacher_images), visible, masked)

    def loss_fn(params):
      outputs = self.student_outputs(params, images, visible, masked, rng)
      return caev2_loss.alignment_loss(outputs, targets, self.config.caev2.loss_weight), outputs

    (loss, outputs), grads = jax.value_and_grad(loss_fn, has_aux=True)(variables.params)
    token_losses = caev2_loss.token_losses(outputs, targets)
    n_visible = visible.shape[1]
    metrics = {
        'loss': loss,
        'loss_class': token_losses[:, 0].mean(),
        'loss_visible': token_losses[:, 1:1 + n_visible].mean(),
        'loss_masked': token_losses[:, 1 + n_visible:].mean(),
        'grad_norm': optax.tree.norm(grads),
    }
    return grads, None, metrics

  # ------------------------------------------------------------------ data
  def train_transform(self):
    return transform.from_config(self.config)

  # ------------------------------------------------------------------ bookkeeping
  def architecture(self):
    c = self.config.caev2
    model = c.model.to_dict()
    # Stochastic depth changes no parameter; a run may resume with a different one.
    model.pop('drop_path_rate', None)
    teacher = c.teacher.model.to_dict()
    if c.teacher.backbone != teacher_lib.CAPI:  # The built one ('' is the checkpoint's).
      teacher['activation'] = self.teacher.activation
    return {'model': model, 'caev2.regressor': c.regressor.to_dict(),
            'caev2.teacher.backbone': c.teacher.backbone, 'caev2.teacher.model': teacher}

  def flops_per_step(self):
    return flops.train_step_flops(self.config)

  # ------------------------------------------------------------------ evaluation
  def eval_model(self) -> nn.Module:
    """The student encoder: class token, no registers, patch tokens after its final norm."""
    return self.encoder

  def eval_params(self, variables, which):
    if which not in ('student', 'ema'):
      raise ValueError(f"which must be 'student' or 'ema', got {which!r}.")
    return variables.params['encoder']  # No EMA: 'ema' is the trained encoder.

  def official_backbone(self, state_dict, which):
    """A file of the teacher's family (`caev2.teacher.backbone`, e.g. OpenAI CLIP's `.pt`: its
    names under `visual.`) evaluates the teacher; any other file is read as the student encoder
    under CAE v2's names (`encoder.` or none)."""
    del which  # No EMA.
    teacher = self.config.caev2.teacher
    t_prefix = vit_weights.OFFICIAL_PREFIXES.get(teacher.backbone)
    if t_prefix and any(k.startswith(t_prefix) for k in state_dict):
      module, family, prefix = self.teacher, teacher.backbone, t_prefix
      vit_weights.check_activation(
          state_dict, module, teacher.model.get('activation', vit_weights.FROM_FILE),
          teacher_lib.ACTIVATION_KEY, f'the {family} checkpoint', prefix)
    else:
      module, family = self.encoder, 'caev2'
      prefix = 'encoder.' if any(k.startswith('encoder.') for k in state_dict) else ''
    params = vit_weights.official_to_params(state_dict, module, family, prefix)
    return module, jax.tree.map(lambda x: np.asarray(x, np.float32), params)
