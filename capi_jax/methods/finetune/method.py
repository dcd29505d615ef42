r"""End-to-end fine-tuning as a method (`config.method = 'finetune'`): the engine trains it.

Fine-tuning trains the whole backbone, so it runs on the engine like pretraining (sharded,
checkpointed, resumable, evaluated): the recipe is BEiT's as CAE v2's release runs it
(`docs/reference/caev2_eval_protocols.md`; `model.py`, `steps.py`, `mixing.py`, `transform.py`).

Variables:
  params  = {'backbone': vit.ViT of `finetune.model` (no final norm; relative position bias
             per block when `rel_pos_bias`), 'fc_norm': LayerNorm, 'head': Dense(num_classes)};
  frozen  = {}, buffers = {} (no EMA).
Start (`config.init.checkpoint`, required): a capi_jax run of a ViT-backbone method (its
evaluation backbone: CAE v2's encoder, MIM-Refiner's), a `capi_jax.convert` output, or an
official pretraining file of a `weights/vit.py` family (`finetune.family`; a CAE v2
checkpoint's `encoder.*`). Its final `norm` becomes `fc_norm`; the relative position tables
start at zero; the head is new.
Per step: Mixup / CutMix drawn on device from the step's key (`mixing.draw_device`), soft-target
cross-entropy, AdamW over layer-decay groups on the per-iteration cosine lr (absolute lr, warm-up
from 0, `min_lr`), constant weight decay, no clipping.
Evaluation: `eval_model` returns the logits as its global representation; the 'finetune_top1'
protocol (`evaluators/top1.py`) scores every validation image once.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from capi_jax.base import interface
from capi_jax.base import optim
from capi_jax.base import schedules
from capi_jax.methods.finetune import mixing
from capi_jax.methods.finetune import model as model_lib
from capi_jax.methods.finetune import steps
from capi_jax.methods.finetune import transform
from capi_jax.models import flops as flops_lib
from capi_jax.models import stack
from capi_jax.models import vit
from capi_jax.weights import rules
from capi_jax.weights import vit as vit_weights

PyTree = Any


class LogitsModel(nn.Module):
  """The fine-tuned classifier behind the evaluation interface: (logits (B, C), no registers
  (B, 0, C), the logits as a 1x1 map (B, 1, 1, C)); `embed_dim` is C. Only the logits mean
  anything: it is evaluated by 'finetune_top1'."""
  classifier: model_lib.Classifier

  @property
  def patch_size(self) -> int:
    return self.classifier.backbone.patch_size

  @property
  def embed_dim(self) -> int:
    return self.classifier.num_classes

  def __call__(self, images: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    logits = self.classifier(images)
    return logits, logits[:, None][:, :0], logits[:, None, None, :]


def problems(config: ml_collections.ConfigDict) -> list[str]:
  """Every invalid value of the keys fine-tuning reads, as sentences; [] when usable."""
  f, found = config.get('finetune'), []
  if f is None:
    return ['config.finetune is missing: start from configs/caev2/finetune_base.py.']

  def check(ok: bool, message: str) -> None:
    if not ok:
      found.append(message)

  m = f.model
  check(config.data.image_size == m.get('image_size'),
        f'data.image_size={config.data.image_size} must equal finetune.model.image_size='
        f'{m.get("image_size")}: the relative position tables cover the training grid.')
  check(not m.get('final_norm', False), 'finetune.model.final_norm must be False: the '
        'pretrained final norm becomes fc_norm after mean pooling.')
  check(f.family in vit_weights.FAMILIES, f'finetune.family={f.family!r} must be one of '
        f'{vit_weights.FAMILIES}.')
  check(isinstance(f.num_classes, int) and f.num_classes >= 2,
        f'finetune.num_classes={f.num_classes!r} must be an integer >= 2.')
  check(config.train.global_batch_size % 2 == 0, f'train.global_batch_size='
        f'{config.train.global_batch_size} must be even (Mixup pairs the batch with its reverse).')
  o, x = f.optim, f.mixup
  check(0 < o.layer_decay <= 1, f'finetune.optim.layer_decay={o.layer_decay} must be in (0, 1].')
  check(0 <= o.warmup_iters <= config.train.total_iters, f'finetune.optim.warmup_iters='
        f'{o.warmup_iters} must be in [0, train.total_iters={config.train.total_iters}].')
  check(x.mixup_alpha > 0 or x.cutmix_alpha > 0, 'finetune.mixup needs mixup_alpha > 0 or '
        'cutmix_alpha > 0 (the recipe always mixes).')
  check(0 <= x.smoothing < 1, f'finetune.mixup.smoothing={x.smoothing} must be in [0, 1).')
  check(bool(config.init.checkpoint), 'config.init.checkpoint is empty: fine-tuning starts from '
        'a pretrained backbone (a capi_jax run, a convert output or an official file).')
  return found


def transplant(fresh: PyTree, pretrained: PyTree) -> PyTree:
  """Classifier params with the backbone (and fc_norm from its `norm`) of a pretraining-shaped
  ViT tree; relative position tables the pretrained tree lacks keep their fresh (zero) values.

  Raises:
    ValueError naming the first missing or mis-shaped parameter.
  """
  source = stack.to_loop_layout(jax.tree.map(jnp.asarray, dict(pretrained)))
  target = stack.to_loop_layout(fresh['backbone'])
  norm = source.pop('norm', None)
  if norm is None:
    raise ValueError('The pretrained backbone has no final `norm` to start fc_norm from.')
  flat_new = {optim.path_name(p): v for p, v in jax.tree_util.tree_leaves_with_path(source)}
  merged = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(target):
    name = optim.path_name(path)
    value = flat_new.get(name)
    if value is None and name.endswith('relative_position_bias_table'):
      value = leaf
    if value is None or value.shape != leaf.shape:
      found = None if value is None else value.shape
      raise rules.CheckpointMismatchError(
          f'The pretrained backbone has {name} with shape {found}, the fine-tuned ViT expects '
          f'{leaf.shape}: check finetune.model against the pretraining run.',
          [f'{name}: expected {leaf.shape}, found {found}'])
    merged[name] = value.astype(leaf.dtype)
  backbone = jax.tree_util.tree_map_with_path(lambda p, _: merged[optim.path_name(p)], target)
  return {**fresh, 'backbone': stack.to_layout_of(backbone, fresh['backbone']),
          'fc_norm': jax.tree.map(lambda v, ref: v.astype(ref.dtype), norm, fresh['fc_norm'])}


class Finetune(interface.Method):
  """End-to-end fine-tuning of a pretrained ViT (see the module docstring)."""
  name = 'finetune'
  loss_keys = ('loss',)

  def __init__(self, config):
    super().__init__(config)
    f = config.finetune
    self.backbone = vit.from_config(f.model, config.efficiency)
    self.classifier = model_lib.Classifier(self.backbone, num_classes=f.num_classes,
                                           init_scale=f.init_scale)

  @classmethod
  def config_problems(cls, config):
    return problems(config)

  @property
  def recipe(self) -> steps.Recipe:
    f = self.config.finetune
    o = f.optim
    return steps.Recipe(lr=o.lr, min_lr=o.min_lr, total_iters=self.config.train.total_iters,
                        warmup_iters=o.warmup_iters, weight_decay=o.weight_decay,
                        layer_decay=o.layer_decay, num_classes=f.num_classes,
                        smoothing=f.mixup.smoothing, betas=tuple(o.betas), eps=o.eps)

  # ------------------------------------------------------------------ state
  def init(self, rng: jax.Array) -> interface.Variables:
    size = self.config.data.image_size
    params = self.classifier.init(rng, jnp.zeros((1, size, size, 3)))['params']
    return interface.Variables(params=params, frozen={}, buffers={})

  def _pretraining_vit(self) -> vit.ViT:
    """The backbone as pretraining had it: final norm, no relative position bias."""
    return self.backbone.clone(final_norm=True, rel_pos_bias=False, scan_layers=False)

  def architecture_keys(self, role: str) -> str:
    del role  # Only 'init'.
    return 'finetune.model and finetune.family'

  def from_pretrained(self, variables, pretrained):
    if set(pretrained) != {'init'}:
      raise ValueError(f'Fine-tuning loads one backbone (config.init.checkpoint), got '
                       f'{sorted(pretrained)}.')
    pre = pretrained['init']
    if pre.backbone is not None:
      tree = pre.backbone
    else:
      family = self.config.finetune.family
      prefix = vit_weights.OFFICIAL_PREFIXES[family]
      if not any(k.startswith(prefix) for k in pre.state_dict):
        prefix = ''
      vit_weights.check_activation(pre.state_dict, self.backbone, self.backbone.activation,
                                   'finetune.model.activation', f'the {family} checkpoint', prefix)
      state_dict = {k: v for k, v in pre.state_dict.items()
                    if not k.endswith('relative_position_index')}
      tree = vit_weights.official_to_params(state_dict, self._pretraining_vit(), family, prefix)
    return variables._replace(params=transplant(variables.params, tree))

  def optimizer(self, params: PyTree) -> optax.GradientTransformation:
    r = self.recipe
    groups = optim.group_tree(params, model_lib.group_rule(
        self.backbone.depth, r.layer_decay, self.backbone.frozen_params))
    return optim.adamw(steps.lr_schedule(r), betas=r.betas, eps=r.eps,
                       weight_decay=r.weight_decay, groups=groups,
                       state_labels=optim.STATE_LABELS)

  def schedules(self) -> dict[str, schedules.ScheduleFn]:
    return {'lr': steps.lr_schedule(self.recipe)}

  # ------------------------------------------------------------------ step
  def loss_and_grads(self, variables, batch, rng):
    """batch: images (B, S, S, 3) float32 normalised (erased), labels (B,) int32."""
    x = self.config.finetune.mixup
    k_mix, k_drop = jax.random.split(rng)
    size = self.config.data.image_size
    mix = mixing.draw_device(k_mix, size, size, mixup_alpha=x.mixup_alpha,
                             cutmix_alpha=x.cutmix_alpha, prob=x.prob, switch_prob=x.switch_prob)
    r = self.recipe
    images, targets = mixing.mix(batch['images'], batch['labels'], mix, r.num_classes,
                                 r.smoothing)

    def loss_fn(params):
      logits = self.classifier.apply({'params': params}, images, train=True,
                                     rngs={'drop_path': k_drop})
      return model_lib.soft_target_cross_entropy(logits, targets)

    loss, grads = jax.value_and_grad(loss_fn)(variables.params)
    return grads, None, {'loss': loss, 'grad_norm': optax.tree.norm(grads),
                         'mix_lam': mix.lam}

  # ------------------------------------------------------------------ data
  def train_transform(self):
    d = self.config.finetune.data
    return transform.FinetuneTransform(
        image_size=self.config.data.image_size, crop_scale=tuple(d.crop_scale),
        randaug_magnitude=d.randaug_magnitude, randaug_std=d.randaug_std,
        randaug_ops=d.randaug_ops, erase_prob=d.erase_prob)

  # ------------------------------------------------------------------ bookkeeping
  def architecture(self):
    f = self.config.finetune
    model = f.model.to_dict()
    model.pop('drop_path_rate', None)
    return {'model': model, 'finetune.num_classes': f.num_classes}

  def flops_per_step(self):
    m = self.config.finetune.model
    n = (self.config.data.image_size // m.patch_size) ** 2
    dim = m.embed_dim
    forward = (flops_lib.patch_embed_flops(n, 3 * m.patch_size ** 2, dim)
               + m.depth * flops_lib.self_attention_block_flops(1 + n, dim,
                                                                int(dim * m.mlp_ratio))
               + flops_lib.matmul_flops(1, dim, self.config.finetune.num_classes))
    total = 3 * forward * self.config.train.global_batch_size  # Forward + backward.
    return {'classifier': total, 'total': total}

  # ------------------------------------------------------------------ evaluation
  def eval_model(self) -> nn.Module:
    return LogitsModel(self.classifier)

  def eval_params(self, variables, which):
    if which not in ('student', 'ema'):
      raise ValueError(f"which must be 'student' or 'ema', got {which!r}.")
    return {'classifier': variables.params}  # No EMA: 'ema' is the trained model.
