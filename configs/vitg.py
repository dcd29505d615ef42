r"""CAPI ViT-g/14: the ViT-L/14 recipe (configs/vitl.py) with DINOv2's ViT-g backbone
(1536 wide, 40 blocks, 24 heads; configs/family.py cites the shapes).

Run:
  python -m capi_jax.main --config=configs/vitg.py --workdir=/tmp/capi_vitg
"""

import ml_collections

from configs import family


def get_config() -> ml_collections.ConfigDict:
  return family.capi('vitg')
