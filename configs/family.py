r"""CAPI over the ViT model family (capi_jax/models/family.py, which cites the shapes).

`capi(name)` is configs/vitl.py (the CAPI ViT-L/14 recipe) with the backbone `name`, one of
vits, vitb, vitl, vith (equal to configs/vit{s,b,l,h}.py), vitg, vit7b. Run a member with
  python -m capi_jax.main --config=configs/family.py:vitg --workdir=/tmp/capi_vitg
"""

import ml_collections

from capi_jax.models import family
from configs import vitl

MODELS = family.MODELS


def capi(name: str) -> ml_collections.ConfigDict:
  """The CAPI ViT-L/14 recipe (configs/vitl.py) with `MODELS[name]`'s backbone."""
  c = vitl.get_config()
  c.name = name
  family.set_encoder_decoder(c.capi.model, name)
  return c


def get_config(name: str = 'vitl') -> ml_collections.ConfigDict:
  return capi(name)
