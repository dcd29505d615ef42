r"""CAE v2 ViT-T/16: the release's tiny recipe (`caev2_tiny_300e.sh`).

Run:
  python -m capi_jax.main --config=configs/caev2/tiny.py --workdir=/tmp/caev2_tiny \
      --config.caev2.teacher.checkpoint=/path/to/ViT-B-16.pt

The base recipe (configs/caev2/base.py, same teacher) with a 192-wide encoder of 12 blocks and
12 heads (head dim 16: the release's `models/modeling_cae.py`, not DeiT's 3), a 96-wide
regressor of depth 1 (so a projection 192 -> 96 exists) and 30 of 196 patches masked (15%).
"""

import ml_collections

from configs.caev2 import base


def get_config() -> ml_collections.ConfigDict:
  c = base.get_config()
  c.name = 'caev2_tiny'
  c.caev2.model.embed_dim = 192
  c.caev2.model.num_heads = 12
  c.caev2.regressor.embed_dim = 96
  c.caev2.regressor.depth = 1
  c.caev2.num_mask_patches = 30
  c.evals.caev2_linear.batch_size = 16384  # caev2_tiny_300e.sh: 2048 x 8 GPUs.
  return c
