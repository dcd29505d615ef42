r"""CAPI with a 7B-class backbone: the ViT-L/14 recipe (configs/vitl.py) with DINOv3's ViT-7B
shape (4096 wide, 40 blocks, 32 heads; configs/family.py cites the shapes and the MLP ratio).

10.2B trained parameters (the 6.71B encoder, DINOv3's 6716M; a 3.4B predictor; the heads):
float32 weights, AdamW moments and the EMA teacher make ~16 bytes each, ~160 GB of state,
stored over 'fsdp' x 'tensor' (Megatron-style heads and MLP splits, base/sharding.py).
Plan it before running:
  python -m capi_jax.aot --config=configs/vit7b.py --topology=v5p:4x4x8 \
      --config.train.global_batch_size=1024
"""

import ml_collections

from configs import family


def get_config() -> ml_collections.ConfigDict:
  c = family.capi('vit7b')
  # Heads (32) and MLP units (12288) split 4 ways inside each block; parameters, EMA and
  # moments over fsdp x tensor.
  c.sharding.mesh = (('data', 1), ('fsdp', -1), ('tensor', 4))
  return c
