r"""CAE v2 ViT-B/16 end-to-end fine-tuning on ImageNet-1k: the release's base recipe.

Run (RUN: a CAE v2 pretraining run of configs/caev2/base.py, a `capi_jax.convert` output, or the
official pretraining checkpoint, whose encoder is read from `encoder.*`):
  python -m capi_jax.main --config=configs/caev2/finetune_base.py --workdir=/tmp/caev2_ft_base \
      --config.init.checkpoint=RUN

`run_class_finetuning.py` with `caev2_base_300e.sh`'s flags (docs/reference/caev2_eval_protocols.md):
100 epochs of 1251 iterations at batch 1024 (128 x 8 GPUs), lr 2e-4 (absolute) warmed up from 0
over 5 epochs then cosine to 1e-6, AdamW (0.9, 0.999), eps 1e-8, weight decay 0.05 (none for
1-D parameters, biases, the position table and the class token), layer decay 0.75, drop path 0.1,
Mixup 0.8 / CutMix 1.0 (switch 0.5), label smoothing 0.1, RandAugment rand-m9-mstd0.5-inc1 (the
release's `main()` forces it), RandomErasing 0.25, relative position bias (zero init), mean
pooling + fc_norm, head x 0.001; no clipping, no EMA. Evaluated with 'finetune_top1' on the
validation set after every epoch (the release's "Max accuracy" is the best of them).
"""

import ml_collections

from capi_jax.models import vit
from configs import common

IMAGENET_TRAIN_IMAGES = 1_281_167


def finetune_section(model: ml_collections.ConfigDict, *, num_classes: int, lr: float,
                     warmup_iters: int, layer_decay: float, mixup: float, cutmix: float,
                     smoothing: float) -> ml_collections.ConfigDict:
  """`config.finetune`: the backbone (`model`, a vit.ViT section), the recipe's numbers."""
  f = ml_collections.ConfigDict()
  f.model = model
  f.family = 'caev2'  # weights/vit.py naming of an official file given as init.checkpoint.
  f.num_classes = num_classes
  f.init_scale = 0.001
  f.optim = ml_collections.ConfigDict(dict(
      lr=lr, min_lr=1e-6, warmup_iters=warmup_iters, weight_decay=0.05,
      layer_decay=layer_decay, betas=(0.9, 0.999), eps=1e-8))
  f.mixup = ml_collections.ConfigDict(dict(
      mixup_alpha=mixup, cutmix_alpha=cutmix, prob=1.0, switch_prob=0.5, smoothing=smoothing))
  f.data = ml_collections.ConfigDict(dict(
      crop_scale=(0.08, 1.0), randaug_ops=2, randaug_magnitude=9.0, randaug_std=0.5,
      erase_prob=0.25))
  return f


def finetune_model(**sizes) -> ml_collections.ConfigDict:
  """A 'caev2' family ViT without final norm (fc_norm after pooling), relative position bias."""
  return ml_collections.ConfigDict(dict(vit.FAMILIES['caev2'], final_norm=False,
                                        rel_pos_bias=True, **sizes))


def add_top1(c: ml_collections.ConfigDict, test: ml_collections.ConfigDict, period: int,
             resolution: int) -> None:
  c.evals.protocols = ('finetune_top1',)
  c.evals.final = True
  c.evals.finetune_top1 = ml_collections.ConfigDict(dict(period=period, test=test,
                                                         resolution=resolution))


def get_config() -> ml_collections.ConfigDict:
  c = common.get_config()
  c.name = 'caev2_finetune_base'
  c.method = 'finetune'
  iters_per_epoch = IMAGENET_TRAIN_IMAGES // 1024
  c.train.total_iters = 100 * iters_per_epoch
  c.train.global_batch_size = 1024
  c.train.checkpointing.period = iters_per_epoch
  c.efficiency.remat_policy = 'none'
  c.finetune = finetune_section(
      finetune_model(patch_size=16, image_size=224, embed_dim=768, depth=12, num_heads=12,
                     mlp_ratio=4.0, drop_path_rate=0.1),
      num_classes=1000, lr=2e-4, warmup_iters=5 * iters_per_epoch, layer_decay=0.75,
      mixup=0.8, cutmix=1.0, smoothing=0.1)
  add_top1(c, ml_collections.ConfigDict(dict(dataset='tfds:imagenet2012', split='validation',
                                             labels='', class_map='')),
           period=iters_per_epoch, resolution=224)
  return c
