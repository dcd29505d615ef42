r"""MIM-Refiner on MAE-L/16 (MAE, dBOT): the released stage-2 / stage-3 recipe.

Run (stage 2 from the converted official weights, then stage 3 from stage 2):
  python -m capi_jax.main --config=configs/mim_refiner/mae_l16.py:2 --workdir=/tmp/mae_l16_s2 \
      --config.init.checkpoint=CONVERTED_WEIGHTS_DIR --config.data.dataset=tfds:imagenet2012
  python -m capi_jax.main --config=configs/mim_refiner/mae_l16.py:3 --workdir=/tmp/mae_l16_s3 \
      --config.init.checkpoint=/tmp/mae_l16_s2/checkpoints/LAST_STEP \
      --config.data.dataset=tfds:imagenet2012

Heads on the final output and blocks 22..16 (CLS pooling), temperature 0.2,
batch 1024, local views at 96; see configs/mim_refiner/base.py for the shared values.
"""

import ml_collections

from configs.mim_refiner import base


def get_config(arg: str = '') -> ml_collections.ConfigDict:
  stage = base.parse_stage(arg)
  model = base.vit_model('mae', patch_size=16, embed_dim=1024, depth=24,
                         num_heads=16)
  c = base.refiner(name=f'mimref_mae_l16_s{stage}', encoder='mae', model=model,
                 stage=stage, heads=base.block_heads(16, 22), temperature=0.2, batch=1024,
                 epochs=20 if stage == 2 else 30, local_size=96)
  c.evals.headline = ml_collections.ConfigDict({
      'mimref_probe/max':
          '82.8% IN-1k linear probe, MAE-L/16 refined '
          '(paperswithcode entry of arXiv 2402.10093)',
  })
  return c
