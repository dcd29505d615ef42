r"""CAE v2 ViT-S/16: the release's small recipe (`caev2_small_300e.sh`).

Run:
  python -m capi_jax.main --config=configs/caev2/small.py --workdir=/tmp/caev2_small \
      --config.caev2.teacher.checkpoint=/path/to/ViT-B-16.pt

The base recipe (configs/caev2/base.py, same teacher) with a 384-wide encoder of 12 blocks and
12 heads (head dim 32, as the release builds it), a 384-wide regressor of depth 1 and 49 of
196 patches masked (25%).
"""

import ml_collections

from configs.caev2 import base


def get_config() -> ml_collections.ConfigDict:
  c = base.get_config()
  c.name = 'caev2_small'
  c.caev2.model.embed_dim = 384
  c.caev2.model.num_heads = 12
  c.caev2.regressor.embed_dim = 384
  c.caev2.regressor.depth = 1
  c.caev2.num_mask_patches = 49
  return c
