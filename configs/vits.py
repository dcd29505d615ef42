r"""CAPI ViT-S/14: the ViT-L/14 recipe (configs/vitl.py) with a ViT-S backbone.

Run:
  python -m capi_jax.main --config=configs/vits.py --workdir=/tmp/capi_vits
"""

import ml_collections

from configs import vitl


def get_config() -> ml_collections.ConfigDict:
  c = vitl.get_config()
  c.name = 'vits'
  c.capi.model.embed_dim = 384
  c.capi.model.num_heads = 6
  c.capi.model.encoder_depth = 12
  c.capi.model.decoder_depth = 6
  return c
