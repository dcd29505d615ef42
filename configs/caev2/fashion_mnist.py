r"""CAE v2 on Fashion-MNIST in minutes on 2 CPU cores, with the quickstart's CAPI as teacher.

Run (the teacher first: the quickstart, configs/tiny.py, writes /tmp/capi_tiny):
  python -m capi_jax.main --config=configs/tiny.py --workdir=/tmp/capi_tiny
  python -m capi_jax.main --config=configs/caev2/fashion_mnist.py --workdir=/tmp/caev2_fmnist

No CLIP weights exist offline, so the frozen teacher is a capi_jax backbone: the quickstart
CAPI run's EMA EncoderDecoder (`caev2.teacher.backbone='capi'`), ImageNet-normalised like its
own training images. Its targets are its evaluation features: the pooled predictor output for
the class token (CAPI has none) and its encoder's patch tokens, C = 96. The student is a CAE v2
ViT (the 'caev2' family) of the quickstart's size: 28x28 images in 4x4 patches (49 tokens),
96 wide, 3 heads, depth 4; regressor 96 wide (no projection), depth 1; 24 of 49 patches masked
(50%, blocks of at least 4). The release's recipe otherwise: crop scale 0.4-1, colour jitter
0.4, lr 1.5e-3 warmed up from 0, cosine to 1e-5, weight decay 0.05, clip 3.0.
The run ends with the quickstart's evaluation of the student encoder beside its random init, and
CAE v2's linear probe (BatchNorm + Linear on the class token, LARS; 5 epochs of Fashion-MNIST at
batch 256 with 1 warm-up epoch here, 90 / 10 in the release). LARS moves the weight by lr x 0.001
of its norm per step whatever the batch, so the release's absolute lr is kept (3.2 = 0.1 x 8192 /
256: blr 3.2 at batch 256); blr 0.1 at batch 256 would move it 32 times slower.
"""

import ml_collections

from capi_jax.models import vit
from configs import tiny
from configs.caev2 import base


def get_config() -> ml_collections.ConfigDict:
  c = base.get_config()
  c.name = 'caev2_fashion_mnist'
  quickstart = tiny.get_config()
  c.train = quickstart.train
  c.evals = quickstart.evals
  fashion_mnist = lambda split: ml_collections.ConfigDict(dict(dataset='fashion_mnist',
                                                               split=split))
  base.add_evals(c.evals, fashion_mnist('train'), fashion_mnist('test'), num_classes=10,
                 batch_size=256, epochs=5, warmup_epochs=1, resolution=28)
  c.evals.caev2_linear.blr = 3.2

  c.caev2.num_mask_patches = 24
  c.caev2.min_mask_patches_per_block = 4
  c.caev2.regressor.embed_dim = 96
  c.caev2.regressor.depth = 1
  c.caev2.regressor.num_heads = 3
  c.caev2.teacher.backbone = 'capi'
  c.caev2.teacher.checkpoint = '/tmp/capi_tiny'
  c.caev2.teacher.image_size = 28
  c.caev2.teacher.normalization = 'imagenet'
  c.caev2.teacher.model = quickstart.capi.model

  c.train.total_iters = 2000
  c.train.global_batch_size = 128
  c.caev2.optim.lr_schedule.warmup_iters = 100

  c.data = quickstart.data
  c.caev2.model = ml_collections.ConfigDict(dict(
      vit.FAMILIES['caev2'], patch_size=4, image_size=28, embed_dim=96, depth=4, num_heads=3,
      mlp_ratio=4.0, drop_path_rate=0.0))
  c.efficiency = quickstart.efficiency
  return c
