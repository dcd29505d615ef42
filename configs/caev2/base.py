r"""CAE v2 ViT-B/16: the release's base pretraining recipe (`caev2_base_300e.sh`).

Run (the teacher is OpenAI's CLIP ViT-B/16 file, which is not shipped: download `ViT-B-16.pt`
from OpenAI's CLIP release and pass its path):
  python -m capi_jax.main --config=configs/caev2/base.py --workdir=/tmp/caev2_base \
      --config.caev2.teacher.checkpoint=/path/to/ViT-B-16.pt

Every value is the release's (`docs/reference/caev2_algorithm.md`, Recipes): ImageNet-1k,
300 epochs of 625 iterations at batch 2048 (256 x 8 GPUs), lr 1.5e-3 from 0 over 10 warm-up
epochs then cosine to 1e-5, AdamW (0.9, 0.999) with weight decay 0.05, gradient clip 3.0,
drop path 0.1, layer scale 0.1; 98 of 196 patches masked by BEiT's block generator; the
teacher sees the same crop at 224, CLIP-normalised. The official checkpoint `ViT-B-16.pt`
(TorchScript) is read directly, its QuickGELU read from the archive; or convert it once
(`python -m capi_jax.convert --config=configs/caev2/base.py --family=clip
--section=caev2.teacher.model --to=capi_jax --input=ViT-B-16.pt --output=/tmp/clip_b16`) and
pass /tmp/clip_b16 with --config.caev2.teacher.model.activation=quick_gelu (a directory, like a
state dict, does not say it; open_clip / LAION CLIP weights: =gelu). The method-neutral sections are configs/common.py's (its ImageNet source at
224, efficiency, sharding, evals); CAE v2's own keys are in `caev2` (its student `model`,
`optim`, `data` augmentation, masks, regressor and teacher). The evaluation
is CAE v2's linear probe ('caev2_linear', `add_evals`: the class token after the last norm,
BatchNorm + Linear, LARS, blr 0.1 x batch / 256, 90 epochs); CAPI's sections stay, to be added
to evals.protocols at will.
"""

import ml_collections

from capi_jax.models import vit
from configs import common

IMAGENET_TRAIN_IMAGES = 1_281_167
ITERS_PER_EPOCH = IMAGENET_TRAIN_IMAGES // 2048  # The release drops the last partial batch.


def add_evals(evals: ml_collections.ConfigDict, train: ml_collections.ConfigDict,
              test: ml_collections.ConfigDict, *, num_classes: int, batch_size: int,
              epochs: int = 90, warmup_epochs: float = 10, resolution: int = 224,
              log_every: int = 100) -> None:
  """CAE v2's linear-probe section (`tools/run_linear.py` as project/CAEv2/scripts run it:
  --blr 0.1 --epochs 90, warm-up 10, weight decay 0; see capi_jax/evaluators/caev2_linear.py),
  with 'caev2_linear' appended to evals.protocols."""
  evals.caev2_linear = ml_collections.ConfigDict(dict(
      period=0, train=train, test=test, num_classes=num_classes, blr=0.1, epochs=epochs,
      warmup_epochs=warmup_epochs, min_lr=0.0, batch_size=batch_size, resolution=resolution,
      log_every=log_every))
  if 'caev2_linear' not in evals.protocols:
    evals.protocols = tuple(evals.protocols) + ('caev2_linear',)


def get_config() -> ml_collections.ConfigDict:
  c = common.get_config()
  c.name = 'caev2_base'
  c.method = 'caev2'
  c.train.total_iters = 300 * ITERS_PER_EPOCH
  c.train.global_batch_size = 2048
  c.train.checkpointing.period = 10 * ITERS_PER_EPOCH

  c.caev2 = ml_collections.ConfigDict()
  c.caev2.num_mask_patches = 98  # Exactly this many per image (50% of 196).
  c.caev2.min_mask_patches_per_block = 16
  c.caev2.max_mask_patches_per_block = 0  # 0: no cap (the release's None).
  c.caev2.mask_min_aspect = 0.3
  c.caev2.loss_weight = 1.0  # --latent_alignment_loss_weight
  c.caev2.regressor = ml_collections.ConfigDict()
  c.caev2.regressor.embed_dim = 768  # --decoder_embed_dim (a projection when != model width)
  c.caev2.regressor.depth = 4  # --regressor_depth
  c.caev2.regressor.num_heads = 12  # Always 12 in the release (its --decoder_num_heads is unused).
  c.caev2.regressor.layer_scale_init = 0.1
  c.caev2.teacher = ml_collections.ConfigDict()
  c.caev2.teacher.backbone = 'clip'
  c.caev2.teacher.checkpoint = ''  # Path to OpenAI's ViT-B-16.pt (not shipped).
  c.caev2.teacher.image_size = 224  # --second_input_size
  c.caev2.teacher.normalization = 'clip'
  # activation '': the checkpoint's. OpenAI's TorchScript ViT-B-16.pt says QuickGELU; a state
  # dict or converted directory does not (open_clip / LAION's use GELU under the same names):
  # set 'quick_gelu' or 'gelu' for those.
  c.caev2.teacher.model = ml_collections.ConfigDict(dict(
      vit.FAMILIES['clip'], patch_size=16, image_size=224, embed_dim=768, depth=12,
      num_heads=12, mlp_ratio=4.0, out_dim=512, activation=''))

  # The student encoder.
  c.caev2.model = ml_collections.ConfigDict(dict(
      vit.FAMILIES['caev2'], patch_size=16, image_size=224, embed_dim=768, depth=12,
      num_heads=12, mlp_ratio=4.0, drop_path_rate=0.1))

  c.caev2.optim = ml_collections.ConfigDict()
  c.caev2.optim.betas = (0.9, 0.999)
  c.caev2.optim.eps = 1e-8
  c.caev2.optim.weight_decay = 0.05  # Constant, as in every recipe.
  c.caev2.optim.clip_grad = 3.0
  c.caev2.optim.lr_schedule = ml_collections.ConfigDict()
  c.caev2.optim.lr_schedule.base_value = 1.5e-3  # --lr, used as given (no batch scaling).
  c.caev2.optim.lr_schedule.final_value = 1e-5  # --min_lr
  c.caev2.optim.lr_schedule.warmup_iters = 10 * ITERS_PER_EPOCH  # From 0 (not --warmup_lr).

  c.caev2.data = ml_collections.ConfigDict()  # The training example (config.data: the source).
  c.caev2.data.crop_scale = (0.4, 1.0)  # --crop_min_size, --crop_max_size
  c.caev2.data.color_jitter = 0.4
  c.caev2.data.do_hflip = True

  for name in c.evals.protocols:  # CAPI's, if added to evals.protocols: every 50 epochs.
    c.evals[name].period = 50 * ITERS_PER_EPOCH
  c.evals.protocols = ()  # CAE v2's own; CAPI's sections stay available.
  imagenet = lambda split: ml_collections.ConfigDict(dict(dataset='tfds:imagenet2012',
                                                         split=split))
  # caev2_base_300e.sh / caev2_small_300e.sh: batch 1024 x 8 GPUs (tiny.py: 2048 x 8).
  add_evals(c.evals, imagenet('train'), imagenet('validation'), num_classes=1000,
            batch_size=8192)
  return c  # caev2_linear only at the end (evals.final): 90 epochs of ImageNet.
