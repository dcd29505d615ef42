r"""The ViT model family for scaling studies: S, B, L, H, g and a 7B-class ViT, CAPI recipe.

`MODELS` holds the published backbone shapes; `capi(name)` is configs/vitl.py (the CAPI ViT-L/14
recipe) with that backbone. The sweep (`python -m capi_jax.scaling --models=vitl,vitg,vit7b`)
and configs/vitg.py / configs/vit7b.py read them.

Sources of the shapes (width, depth, heads):
  vits   384 / 12 / 6    DeiT-S (Touvron et al. 2021, arXiv 2012.12877, Table 1).
  vitb   768 / 12 / 12   ViT-B (Dosovitskiy et al. 2021, arXiv 2010.11929, Table 1).
  vitl  1024 / 24 / 16   ViT-L, same table; CAPI's own ViT-L/14 (configs/vitl.py).
  vith  1280 / 32 / 16   ViT-H, same table.
  vitg  1536 / 40 / 24   DINOv2's ViT-g/14 (Oquab et al. 2023, arXiv 2304.07193, Sec. 4 and
                         Table 17; the release's `vit_giant2`). DINOv2's FFN is SwiGLU with
                         4096 hidden units: 3 x 1536 x 4096 weights, exactly those of a GELU MLP
                         of ratio 4 (2 x 1536 x 6144), which CAPI's blocks have.
  vit7b 4096 / 40 / 32   DINOv3's ViT-7B (Simeoni et al. 2025, arXiv 2508.10104, Sec. 3 and
                         its model card: 6.7B parameters, SwiGLU FFN with 8192 hidden units,
                         patch 16, 4 registers). A GELU MLP of ratio 3 (2 x 4096 x 12288) has
                         the SwiGLU's weights and FLOPs (3 x 4096 x 8192).
The predictor (CAPI's decoder) is half the encoder's depth at its width, as CAPI's ViT-L (24 /
12) and configs/vith.py (32 / 16); for g and 7B that is a choice of this file, not a published
CAPI model. All keep CAPI's patch 14 and 16 registers, so that the family differs only in
backbone shape (DINOv3's 7B is /16 with 4 registers).
"""

from typing import NamedTuple

import ml_collections

from configs import vitl


class Shape(NamedTuple):
  embed_dim: int
  encoder_depth: int
  num_heads: int
  mlp_ratio: float
  decoder_depth: int


MODELS = {
    'vits': Shape(384, 12, 6, 4, 6),
    'vitb': Shape(768, 12, 12, 4, 6),
    'vitl': Shape(1024, 24, 16, 4, 12),
    'vith': Shape(1280, 32, 16, 4, 16),
    'vitg': Shape(1536, 40, 24, 4, 20),
    'vit7b': Shape(4096, 40, 32, 3, 20),
}


def set_backbone(c: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
  """`c` (a CAPI config) with `MODELS[name]`'s backbone; returns `c`."""
  if name not in MODELS:
    raise ValueError(f'Unknown model {name!r}: one of {sorted(MODELS)}.')
  shape = MODELS[name]
  c.name = name
  c.capi.model.embed_dim = shape.embed_dim
  c.capi.model.encoder_depth = shape.encoder_depth
  c.capi.model.num_heads = shape.num_heads
  c.capi.model.mlp_ratio = shape.mlp_ratio
  c.capi.model.decoder_depth = shape.decoder_depth
  return c


def capi(name: str) -> ml_collections.ConfigDict:
  """The CAPI ViT-L/14 recipe (configs/vitl.py) with `MODELS[name]`'s backbone."""
  return set_backbone(vitl.get_config(), name)


def get_config(name: str = 'vitl') -> ml_collections.ConfigDict:
  """`--config=configs/family.py:vitg` picks a member."""
  return capi(name)
