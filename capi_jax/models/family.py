"""The ViT model family of scaling studies: S, B, L, H, g and a 7B-class ViT, as published.

`MODELS` holds the backbone shapes; `set_encoder_decoder` writes one into an EncoderDecoder
config section (CAPI's `config.capi.model`). configs/family.py and the sweep
(`python -m capi_jax.scaling --models=vitl,vitg,vit7b`) use them.

Sources of the shapes (width, depth, heads):
  vits   384 / 12 / 6    DeiT-S (Touvron et al. 2021, arXiv 2012.12877, Table 1).
  vitb   768 / 12 / 12   ViT-B (Dosovitskiy et al. 2021, arXiv 2010.11929, Table 1).
  vitl  1024 / 24 / 16   ViT-L, same table; CAPI's own ViT-L/14 (configs/vitl.py).
  vith  1280 / 32 / 16   ViT-H, same table.
  vitg  1536 / 40 / 24   DINOv2's ViT-g/14 (Oquab et al. 2023, arXiv 2304.07193, and
                         the release's `vit_giant2`). DINOv2's FFN is SwiGLU with
                         4096 hidden units: 3 x 1536 x 4096 weights, exactly those of a GELU MLP
                         of ratio 4 (2 x 1536 x 6144), which CAPI's blocks have.
  vit7b 4096 / 40 / 32   DINOv3's ViT-7B (Simeoni et al. 2025, arXiv 2508.10104, and
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


class Shape(NamedTuple):
  """A backbone's shape: width, encoder blocks, heads, MLP ratio, predictor blocks."""
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


def set_encoder_decoder(model: ml_collections.ConfigDict, name: str) -> None:
  """Writes `MODELS[name]` into `model`, an EncoderDecoder config section."""
  if name not in MODELS:
    raise ValueError(f'Unknown model {name!r}: one of {sorted(MODELS)}.')
  for field, value in MODELS[name]._asdict().items():
    setattr(model, field, value)
