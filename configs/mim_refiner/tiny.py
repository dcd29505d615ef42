r"""MIM-Refiner on the quickstart's CAPI checkpoint (configs/tiny.py), Fashion-MNIST, 2 CPU cores.

Run (after the quickstart, `python -m capi_jax.main --config=configs/tiny.py
--workdir=/tmp/capi_tiny`):
  python -m capi_jax.main --config=configs/mim_refiner/tiny.py --workdir=/tmp/mimref_tiny \
      --config.init.checkpoint=/tmp/capi_tiny/checkpoints/2000

Stage 3 straight from the CAPI encoder (fresh heads and queue), heads on the final output and
the raw outputs of blocks 2 and 1, mean-patch pooling; 2 global views at 28 and 4 local views at
12 per image. The run ends with the quickstart's evaluations of the refined encoder's EMA and
MIM-Refiner's own protocols on Fashion-MNIST (the CAPI encoder's first register stands for the
class token): the 52-head linear probe (2 epochs at batch 256), k-NN (k 10, tau 0.07), low-shot
logistic regression on 1 / 2 / 5 images per class (3 seeded draws each: MSN's lists are for
ImageNet) and k-means clustering.
"""

import ml_collections

from configs import tiny
from configs.mim_refiner import base


def get_config(arg: str = '') -> ml_collections.ConfigDict:
  quickstart = tiny.get_config()
  c = base.refiner(name='mimref_tiny', encoder='capi', model=quickstart.capi.model,
                   stage=base.parse_stage(arg), heads=('main', 'cls2', 'cls1'), temperature=0.2,
                   batch=128, epochs=1, local_size=12, pooling='avg', train_images=60_000)
  c.train, c.evals, c.efficiency = quickstart.train, quickstart.evals, quickstart.efficiency
  fashion_mnist = lambda split: ml_collections.ConfigDict(dict(dataset='fashion_mnist',
                                                               split=split))
  base.add_evals(c.evals, fashion_mnist('train'), fashion_mnist('test'), num_classes=10,
                 resolution=28, probe_epochs=2, probe_batch=256, log_every=100)
  c.data.dataset, c.data.image_size = quickstart.data.dataset, quickstart.data.image_size
  c.data.num_workers = quickstart.data.num_workers

  c.train.total_iters = 500

  r = c.mim_refiner
  r.optim.warmup_iters = 50
  r.optim.base_lr = 1e-3
  r.queue_size = 4096
  r.topk = 5
  r.ema = 0.99
  r.proj_hidden_dim, r.pred_hidden_dim, r.output_dim = 256, 512, 64
  r.views.n_local = 4
  r.views.global_scale = (0.4, 1.0)
  r.views.local_scale = (0.1, 0.4)
  return c
