r"""MIM-Refiner's config sections, shared by the recipes in this folder.

`refiner(...)` takes configs/common.py's method-neutral sections (train, init, data source,
efficiency, sharding, evals) and sets:
  method = 'mim_refiner'
  init.checkpoint     the run to start from: a capi_jax checkpoint of any method (stage 3: the
                      stage-2 run) or converted official weights
  train               total_iters (epochs of `train_images`), global_batch_size
  mim_refiner         stage, encoder, heads ('main' = final output, 'cls<N>' = raw block N),
                      pooling, temperature, topk, queue_size, head sizes, ema, layer_decay,
                      freeze_end_percent, views (MultiCrop fields; global size = data.image_size)
  mim_refiner.model   the encoder's fields (`mim_refiner.encoder` says which backbone)
  mim_refiner.optim   base_lr (x batch / 256), warmup_iters, end_lr, betas, eps,
                      weight_decay (encoder), head_weight_decay
  evals               MIM-Refiner's protocols (`add_evals`: mimref_probe, mimref_knn,
                      mimref_lowshot, and the extra mimref_cluster) on ImageNet; CAPI's sections
                      stay, to be added to evals.protocols at will
The values are the released recipes' (`docs/reference/mim_refiner_algorithm.md`): AdamW
(0.9, 0.95), warmup 4 epochs then cosine to 1e-6, lr 2e-4 (stage 2) / 4e-4 (stage 3) x batch /
256, weight decay 0.05 / 1e-5 (encoder / heads), layer-wise decay 0.65, queue 65536, heads
2048 / 4096 / 256, top-k 1 (stage 2) / 20 (stage 3), EMA 0.9999, 2 x 224 + 10 local views.
"""

from collections.abc import Sequence

import ml_collections

from capi_jax.models import vit
from configs import common

IMAGENET_TRAIN_IMAGES = 1_281_167


def block_heads(first: int, last: int) -> tuple[str, ...]:
  """'main' and the heads on blocks last, last - 1, ..., first (the release's order)."""
  return ('main',) + tuple(f'cls{i}' for i in range(last, first - 1, -1))


def vit_model(family: str, *, patch_size: int, embed_dim: int, depth: int,
              num_heads: int) -> ml_collections.ConfigDict:
  """A `vit.ViT` model section of `family` at 224 (MIM-Refiner's encoders: MLP ratio 4)."""
  return ml_collections.ConfigDict(dict(
      **vit.FAMILIES[family], patch_size=patch_size, image_size=224, embed_dim=embed_dim,
      depth=depth, num_heads=num_heads, mlp_ratio=4.0, drop_path_rate=0.0))


def parse_stage(arg: str) -> int:
  """The stage from the config argument (`--config=FILE.py:2`); 3 when empty."""
  stage = int(arg or 3)
  if stage not in (2, 3):
    raise ValueError(f'Pass the stage as the config argument, FILE.py:2 or FILE.py:3; got {arg!r}.')
  return stage


def add_evals(evals: ml_collections.ConfigDict, train: ml_collections.ConfigDict,
              test: ml_collections.ConfigDict, *, num_classes: int, resolution: int = 224,
              probe_epochs: int = 50, probe_batch: int = 1024, log_every: int = 250,
              protocols: Sequence[str] = ('mimref_probe', 'mimref_knn', 'mimref_lowshot',
                                          'mimref_cluster')) -> None:
  """MIM-Refiner's evaluation sections (the release's values; see capi_jax/evaluators/mimref.py
  and mimref_probe.py), added to `evals` with `protocols` appended to evals.protocols."""
  sets = lambda: dict(train=ml_collections.ConfigDict(train.to_dict()),
                      test=ml_collections.ConfigDict(test.to_dict()))
  # yamls/eval/probe/template_tracked_dinov2grid.yaml: 13 lrs x (cls, cls + mean patch) x (the
  # final output, the raw last 4 blocks), 50 epochs at batch 1024, best accuracy on the test set.
  evals.mimref_probe = ml_collections.ConfigDict(dict(
      period=0, **sets(), num_classes=num_classes,
      learning_rates=(1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5),
      poolings=('cls', 'concat'), last_blocks=(1, 4), epochs=probe_epochs,
      batch_size=probe_batch, resolution=resolution, log_every=log_every))
  # yamls/eval/knn/template_tracked{,_last4}.yaml: k 10, tau 0.07 on the raw last block's class
  # token and mean patch, and on the class tokens of the last 4 blocks.
  evals.mimref_knn = ml_collections.ConfigDict(dict(
      period=0, **sets(), features=('cls_last1', 'avg_last1', 'cls_last4'), ks=(10,),
      taus=(0.07,), resolution=resolution))
  # yamls/eval/extreme_lowshot: 1, 2, 5 images per class x 3 splits. subsets_dir: a copy of
  # facebookresearch/msn's folder (imagenet_subsets{1,2,3}/) with `train` a folder:PATH
  # ImageNet, for the release's lists; '' draws the subsets from the run's seed instead.
  evals.mimref_lowshot = ml_collections.ConfigDict(dict(
      period=0, **sets(), subsets_dir='', shots=(1, 2, 5), splits=3, features=('cls_last1',),
      resolution=resolution, tol=1e-10, max_iter=20_000))
  # capi_jax's extra (the release has no clustering code): k-means with k = classes on the
  # test set's class tokens of the last block.
  test_only = sets()['test']
  evals.mimref_cluster = ml_collections.ConfigDict(dict(
      period=0, test=test_only, features=('cls_last1',), k=0, resolution=resolution,
      max_iter=300))
  evals.protocols = tuple(evals.protocols) + tuple(p for p in protocols
                                                   if p not in evals.protocols)


def refiner(*, name: str, encoder: str, model: ml_collections.ConfigDict, stage: int,
            heads: Sequence[str], temperature: float, batch: int, epochs: int,
            local_size: int, pooling: str = 'cls', freeze_end_percent: float | None = None,
            train_images: int = IMAGENET_TRAIN_IMAGES) -> ml_collections.ConfigDict:
  """A MIM-Refiner config (see the module docstring); epochs count `train_images` images."""
  c = common.get_config()
  c.name = name
  c.method = 'mim_refiner'
  c.data.image_size = 224
  c.efficiency.remat_policy = 'none'

  updates_per_epoch = train_images // batch
  c.train.total_iters = epochs * updates_per_epoch
  c.train.global_batch_size = batch

  c.mim_refiner = ml_collections.ConfigDict(dict(
      model=model,
      optim=dict(base_lr=2e-4 if stage == 2 else 4e-4, warmup_iters=4 * updates_per_epoch,
                 end_lr=1e-6, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.05,
                 head_weight_decay=1e-5),
      stage=stage, encoder=encoder, heads=tuple(heads), pooling=pooling,
      temperature=temperature, topk=1 if stage == 2 else 20, queue_size=65536,
      proj_hidden_dim=2048, pred_hidden_dim=4096, output_dim=256, proj_hidden_layers=1,
      pred_hidden_layers=0, ema=0.9999, layer_decay=0.65,
      freeze_end_percent=ml_collections.config_dict.placeholder(float),
      views=ml_collections.ConfigDict(dict(
          local_size=local_size, n_local=10, global_scale=(0.25, 1.0),
          local_scale=(0.05, 0.25)))))
  c.mim_refiner.freeze_end_percent = freeze_end_percent
  c.train.checkpointing.period = 5000
  imagenet = lambda split: ml_collections.ConfigDict(dict(dataset='tfds:imagenet2012',
                                                         split=split))
  c.evals.protocols = ()  # MIM-Refiner's own; CAPI's sections stay available.
  add_evals(c.evals, imagenet('train'), imagenet('validation'), num_classes=1000)
  for section in c.evals.values():  # Only the final evaluation, also for CAPI's if added.
    if isinstance(section, ml_collections.ConfigDict) and 'period' in section:
      section.period = 0
  return c
