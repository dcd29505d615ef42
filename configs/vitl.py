r"""CAPI ViT-L/14: the paper's pretraining recipe, every value of the official default config.

Run:
  python -m capi_jax.main --config=configs/vitl.py --workdir=/tmp/capi_vitl \
      --config.data.dataset=tfds:imagenet2012

The method-neutral sections (train, init, data source, efficiency, sharding, evals) are
configs/common.py's; CAPI's own keys are in `capi`: its model (`capi.model`, the
EncoderDecoder), the student's optimiser (`capi.optim`), crops and masks (`capi.data`), the
heads and the online clustering. Key names follow the official `default_pretrain_config.yaml`
(train / capi / optim / data / model / efficiency / evals) wherever the concept is the same;
configs/common.py lists where capi_jax differs.
"""

import ml_collections

from configs import common


def get_config() -> ml_collections.ConfigDict:
  c = common.get_config()
  c.name = 'vitl'
  c.method = 'capi'
  c.train.total_iters = 500_000
  c.train.global_batch_size = 16384

  c.capi = ml_collections.ConfigDict()
  c.capi.num_clusters = 16384
  c.capi.student_temp = 0.12
  c.capi.clustering_kwargs = ml_collections.ConfigDict()
  c.capi.clustering_kwargs.target_temp = 0.06
  c.capi.clustering_kwargs.pred_temp = 0.12
  c.capi.clustering_kwargs.n_sk_iter = 3
  c.capi.clustering_kwargs.bias = True
  c.capi.clustering_optimizer = ml_collections.ConfigDict()
  c.capi.clustering_optimizer.betas = (0.9, 0.95)
  c.capi.clustering_optimizer.eps = 1e-8
  c.capi.clustering_optimizer.weight_decay = 0.01  # PyTorch AdamW's default, as in the release.
  c.capi.clustering_optimizer.lr_schedule = ml_collections.ConfigDict()
  c.capi.clustering_optimizer.lr_schedule.base_value = 5e-4
  c.capi.clustering_optimizer.lr_schedule.final_value = 0.0
  c.capi.clustering_optimizer.lr_schedule.warmup_iters = 50_000
  c.capi.clustering_optimizer.lr_schedule.start_warmup_value = 0.0
  c.capi.clustering_optimizer.lr_schedule.truncate_cos = 0.8

  c.capi.model = ml_collections.ConfigDict()
  c.capi.model.patch_size = 14
  c.capi.model.n_registers = 16
  c.capi.model.register_coordinates = 'edge'  # or 'zeros'
  c.capi.model.scale_reg_to_visible = True
  c.capi.model.norm_eps = 1e-5
  c.capi.model.embed_dim = 1024
  c.capi.model.num_heads = 16
  c.capi.model.mlp_ratio = 4
  c.capi.model.drop_path_rate = 0.2
  # Stochastic-depth subsets are drawn per group of batch / drop_path_groups samples (the release
  # draws one per GPU: 32 groups of 512 in the paper's run). Use a multiple of the number of
  # batch shards (devices): each group then lies on one device. A group spread over devices
  # makes GSPMD assemble the kept samples of the whole group on each of them (measured on
  # v5e:4x4 with 1 group: 29 GiB of all-reduces per chip per step).
  c.capi.model.drop_path_groups = 32
  c.capi.model.encoder_depth = 24
  c.capi.model.decoder_depth = 12
  c.capi.model.out_layer = -1

  c.capi.optim = ml_collections.ConfigDict()
  c.capi.optim.betas = (0.9, 0.95)
  c.capi.optim.eps = 1e-8
  c.capi.optim.weight_decay = 0.1
  c.capi.optim.lr_schedule = ml_collections.ConfigDict()
  c.capi.optim.lr_schedule.base_value = 1e-3
  c.capi.optim.lr_schedule.final_value = 0.0
  c.capi.optim.lr_schedule.warmup_iters = 50_000
  c.capi.optim.lr_schedule.start_warmup_value = 0.0
  c.capi.optim.lr_schedule.truncate_cos = 0.8
  c.capi.optim.patch_embed_lr_mult = 0.2
  c.capi.optim.rope_lr_mult = 0.0
  c.capi.optim.layernorm_wd_mult = 0.1
  c.capi.optim.momentum_schedule = ml_collections.ConfigDict()
  c.capi.optim.momentum_schedule.start_warmup_value = 1.0
  c.capi.optim.momentum_schedule.base_value = 0.999
  c.capi.optim.momentum_schedule.final_value = 1.0
  c.capi.optim.momentum_schedule.warmup_iters = 50_000
  c.capi.optim.momentum_schedule.truncate_cos = 0.8

  c.capi.data = ml_collections.ConfigDict()  # The training example: crop, flip, masks.
  c.capi.data.crop_scale = (0.6, 1.0)
  c.capi.data.do_hflip = True
  c.capi.data.mask_ratio = 0.65
  c.capi.data.prediction_subsampling = 0.05
  c.capi.data.masking_generator = 'InverseBlock'
  c.capi.data.masking_roll = True
  return c
