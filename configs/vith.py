r"""CAPI ViT-H/14: the ViT-L/14 recipe (configs/vitl.py) with a ViT-H backbone.

Run:
  python -m capi_jax.main --config=configs/vith.py --workdir=/tmp/capi_vith
"""

import ml_collections

from configs import vitl


def get_config() -> ml_collections.ConfigDict:
  c = vitl.get_config()
  c.name = 'vith'
  c.capi.model.embed_dim = 1280
  c.capi.model.num_heads = 16
  c.capi.model.encoder_depth = 32
  c.capi.model.decoder_depth = 16
  return c
