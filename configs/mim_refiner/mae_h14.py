r"""MIM-Refiner on MAE-H/14 (MAE, dBOT): the released stage-2 / stage-3 recipe.

Run (stage 2 from the converted official weights, then stage 3 from stage 2):
  python -m capi_jax.main --config=configs/mim_refiner/mae_h14.py:2 --workdir=/tmp/mae_h14_s2 \
      --config.init.checkpoint=CONVERTED_WEIGHTS_DIR --config.data.dataset=tfds:imagenet2012
  python -m capi_jax.main --config=configs/mim_refiner/mae_h14.py:3 --workdir=/tmp/mae_h14_s3 \
      --config.init.checkpoint=/tmp/mae_h14_s2/checkpoints/LAST_STEP \
      --config.data.dataset=tfds:imagenet2012

Heads on the final output and blocks 30..20 (CLS pooling), temperature 0.3,
batch 512, local views at 98; see configs/mim_refiner/base.py for the shared values.
"""

import ml_collections

from configs.mim_refiner import base


def get_config(arg: str = '') -> ml_collections.ConfigDict:
  stage = base.parse_stage(arg)
  model = base.vit_model('mae', patch_size=14, embed_dim=1280, depth=32,
                         num_heads=16)
  c = base.refiner(name=f'mimref_mae_h14_s{stage}', encoder='mae', model=model,
                 stage=stage, heads=base.block_heads(20, 30), temperature=0.3, batch=512,
                 epochs=20 if stage == 2 else 30, local_size=98)
  c.evals.headline = ml_collections.ConfigDict({
      'mimref_probe/max':
          '83.7% IN-1k linear probe, MAE-H/14 refined '
          '(paperswithcode entry of arXiv 2402.10093)',
      'extra/mimref_cluster/cls_last1/acc':
          'ACC 64.6 on IN-1k val, MAE-H/14 refined (paperswithcode; '
          'k-means setting not in the release)',
      'extra/mimref_cluster/cls_last1/nmi':
          'NMI 85.3, same (paperswithcode)',
      'extra/mimref_cluster/cls_last1/ari':
          'ARI 45.5, same (paperswithcode)',
  })
  return c
