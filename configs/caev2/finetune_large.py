r"""ViT-L/16 end-to-end fine-tuning on ImageNet-1k with CAE v1's large recipe.

The CAE v2 release has no ViT-L fine-tuning script; docs/reference/caev2_eval_protocols.md
takes CAE v1's `cae_large_finetune.sh`: batch 4096 (64 x 32 GPUs x update_freq 2; here one
global batch of 4096), lr 2e-3, 50 epochs, 5 warm-up, layer decay 0.75, drop path 0.2, Mixup 0.8,
CutMix 1.0, smoothing 0.1, weight decay 0.05, the forced RandAugment. Otherwise as
configs/caev2/finetune_base.py.
  python -m capi_jax.main --config=configs/caev2/finetune_large.py --workdir=/tmp/ft_large \
      --config.init.checkpoint=RUN
"""

import ml_collections

from configs.caev2 import finetune_base


def get_config() -> ml_collections.ConfigDict:
  c = finetune_base.get_config()
  c.name = 'caev2_finetune_large'
  iters_per_epoch = finetune_base.IMAGENET_TRAIN_IMAGES // 4096
  c.train.total_iters = 50 * iters_per_epoch
  c.train.global_batch_size = 4096
  c.train.checkpointing.period = iters_per_epoch
  c.evals.finetune_top1.period = iters_per_epoch
  c.efficiency.remat_policy = 'dots_and_attention'
  c.finetune = finetune_base.finetune_section(
      finetune_base.finetune_model(patch_size=16, image_size=224, embed_dim=1024, depth=24,
                                   num_heads=16, mlp_ratio=4.0, drop_path_rate=0.2),
      num_classes=1000, lr=2e-3, warmup_iters=5 * iters_per_epoch, layer_decay=0.75,
      mixup=0.8, cutmix=1.0, smoothing=0.1)
  return c
