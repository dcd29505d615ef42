r"""MIM-Refiner applied to CAPI ViT-L/14 (configs/vitl.py's encoder): not a released recipe.

Run (stage 2 from a CAPI run or converted official CAPI weights, then stage 3 from stage 2):
  python -m capi_jax.main --config=configs/mim_refiner/capi_vitl.py:2 --workdir=/tmp/capi_s2 \
      --config.init.checkpoint=/tmp/capi_vitl/checkpoints/LAST_STEP \
      --config.data.dataset=tfds:imagenet2012
  python -m capi_jax.main --config=configs/mim_refiner/capi_vitl.py:3 --workdir=/tmp/capi_s3 \
      --config.init.checkpoint=/tmp/capi_s2/checkpoints/LAST_STEP \
      --config.data.dataset=tfds:imagenet2012

The L/16 recipe's heads and values (final output and blocks 22..16, temperature 0.2, batch
1024, 20 / 30 epochs) on CAPI's encoder, with local views at 98 (patch 14). Pooling 'avg' (mean
of the patch tokens): CAPI has no class token, and its registers are not trained to summarise
the image (CAPI's loss reads only patch tokens), so the patch mean is the representation CAPI's
own evaluations pool. Its predictor is kept but never trained; stochastic depth is off.
"""

import ml_collections

from configs import vitl
from configs.mim_refiner import base


def get_config(arg: str = '') -> ml_collections.ConfigDict:
  stage = base.parse_stage(arg)
  model = vitl.get_config().capi.model
  model.drop_path_rate = 0.0
  return base.refiner(name=f'mimref_capi_vitl_s{stage}', encoder='capi', model=model,
                      stage=stage, heads=base.block_heads(16, 22), temperature=0.2, batch=1024,
                      epochs=20 if stage == 2 else 30, local_size=98, pooling='avg')
