r"""MIM-Refiner on data2vec 2.0 ViT-H/14: the released stage-2 / stage-3 recipe.

Run (stage 2 from the converted official weights, then stage 3 from stage 2):
  python -m capi_jax.main --config=configs/mim_refiner/d2v2_h14.py:2 --workdir=/tmp/d2v2_h14_s2 \
      --config.init.checkpoint=CONVERTED_WEIGHTS_DIR --config.data.dataset=tfds:imagenet2012
  python -m capi_jax.main --config=configs/mim_refiner/d2v2_h14.py:3 --workdir=/tmp/d2v2_h14_s3 \
      --config.init.checkpoint=/tmp/d2v2_h14_s2/checkpoints/LAST_STEP \
      --config.data.dataset=tfds:imagenet2012

Heads on the final output and blocks 30..20 (CLS pooling), temperature 0.3,
batch 512, local views at 98; see configs/mim_refiner/base.py for the shared values.
"""

import ml_collections

from configs.mim_refiner import base


def get_config(arg: str = '') -> ml_collections.ConfigDict:
  stage = base.parse_stage(arg)
  model = base.vit_model('data2vec2', patch_size=14, embed_dim=1280, depth=32,
                         num_heads=16)
  c = base.refiner(name=f'mimref_d2v2_h14_s{stage}', encoder='data2vec2', model=model,
                 stage=stage, heads=base.block_heads(20, 30), temperature=0.3, batch=512,
                 epochs=20, local_size=98)
  c.evals.headline = ml_collections.ConfigDict({
      'mimref_probe/max':
          '84.7% IN-1k linear probe, D2V2-H/14 refined (arXiv 2402.10093, abstract)',
      'mimref_lowshot/1pc/cls_last1':
          '64.2% IN-1k 1-shot, D2V2-H/14 refined (arXiv 2402.10093 v1-v3, abstract)',
      'extra/mimref_cluster/cls_last1/acc':
          'ACC 67.3 on IN-1k val, D2V2-H/14 refined (paperswithcode entry of the paper; '
          'its k-means setting is not in the release)',
      'extra/mimref_cluster/cls_last1/nmi':
          'NMI 87.2, same (paperswithcode)',
      'extra/mimref_cluster/cls_last1/ari':
          'ARI 42.2, same (paperswithcode)',
  })
  return c
