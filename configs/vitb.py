r"""CAPI ViT-B/14: the ViT-L/14 recipe (configs/vitl.py) with a ViT-B backbone.

Run:
  python -m capi_jax.main --config=configs/vitb.py --workdir=/tmp/capi_vitb
"""

import ml_collections

from configs import vitl


def get_config() -> ml_collections.ConfigDict:
  c = vitl.get_config()
  c.name = 'vitb'
  c.capi.model.embed_dim = 768
  c.capi.model.num_heads = 12
  c.capi.model.encoder_depth = 12
  c.capi.model.decoder_depth = 6
  return c
