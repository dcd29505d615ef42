r"""Fine-tunes the quickstart CAE v2 run (configs/caev2/fashion_mnist.py) on Fashion-MNIST.

Run (after the CAE v2 quickstart wrote /tmp/caev2_fmnist):
  python -m capi_jax.main --config=configs/caev2/finetune_fashion_mnist.py \
      --workdir=/tmp/caev2_ft_fmnist --config.init.checkpoint=/tmp/caev2_fmnist

The tiny recipe's numbers (`caev2_tiny_300e.sh`: lr 4e-3, layer decay 0.85, Mixup 0.2, no
CutMix, no smoothing, drop path 0) on the quickstart's 28x28 ViT (4x4 patches, 96 wide, depth 4),
a few hundred steps at batch 128; 'finetune_top1' on the 10,000 test images at the end.
"""

import ml_collections

from configs import tiny
from configs.caev2 import finetune_base


def get_config() -> ml_collections.ConfigDict:
  c = finetune_base.get_config()
  c.name = 'caev2_finetune_fashion_mnist'
  quickstart = tiny.get_config()
  c.data = quickstart.data
  c.efficiency = quickstart.efficiency
  c.efficiency.scan_layers = False
  c.sharding = quickstart.sharding
  c.train.total_iters = 400
  c.train.global_batch_size = 128
  c.train.checkpointing.period = 200
  c.evals.batch_size = 500
  c.finetune = finetune_base.finetune_section(
      finetune_base.finetune_model(patch_size=4, image_size=28, embed_dim=96, depth=4,
                                   num_heads=3, mlp_ratio=4.0, drop_path_rate=0.0),
      num_classes=10, lr=4e-3, warmup_iters=40, layer_decay=0.85, mixup=0.2, cutmix=0.0,
      smoothing=0.0)
  finetune_base.add_top1(c, ml_collections.ConfigDict(dict(dataset='fashion_mnist',
                                                           split='test')),
                         period=0, resolution=28)
  return c
