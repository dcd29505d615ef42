r"""CAPI ViT-L/14: the paper's pretraining recipe, every value of the official default config.

Run:
  python -m capi_jax.main --config=configs/vitl.py --workdir=/tmp/capi_vitl \
      --config.data.dataset=tfds:imagenet2012

Sections and key names follow the official `default_pretrain_config.yaml` (train / capi / optim /
data / model / efficiency / evals) wherever the concept is the same. Where capi_jax differs:
- `optim.global_batch_size` is the *global* batch (official: `batch_size_per_gpu` x GPUs;
  512 x 32 = 16384). capi_jax splits it over every device JAX sees.
- `efficiency.compute_dtype` is the dtype of activations and matmuls; master weights and the
  optimiser state stay in `efficiency.param_dtype` (float32). The official `param_dtype: bf16`
  (FSDP mixed precision) corresponds to `compute_dtype='bfloat16'` here.
- `efficiency.remat_policy` names what the blocks keep for the backward pass instead of the
  official on/off switch and op list; 'dots_and_attention' is the official default policy.
- `sharding` has no official counterpart: a device mesh and regex rules for parameters.
- `data.dataset` is one string naming a source: `fashion_mnist[:DIR]`, `tfds:NAME`,
  `folder:PATH`, or `synthetic` (random pixels, for benchmarks).
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.name = 'vitl'
  c.method = 'capi'  # The pretraining method (capi_jax/methods/): its heads and losses.

  c.train = ml_collections.ConfigDict()
  c.train.seed = 0
  c.train.nan_check_period = 20
  c.train.log_loss_every = 20
  c.train.auto_resume = True
  c.train.checkpointing = ml_collections.ConfigDict()
  c.train.checkpointing.period = 3750
  c.train.checkpointing.max_to_keep = 3
  c.train.checkpointing.async_save = True

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

  c.optim = ml_collections.ConfigDict()
  c.optim.total_iters = 500_000
  c.optim.global_batch_size = 16384
  c.optim.betas = (0.9, 0.95)
  c.optim.eps = 1e-8
  c.optim.weight_decay = 0.1
  c.optim.lr_schedule = ml_collections.ConfigDict()
  c.optim.lr_schedule.base_value = 1e-3
  c.optim.lr_schedule.final_value = 0.0
  c.optim.lr_schedule.warmup_iters = 50_000
  c.optim.lr_schedule.start_warmup_value = 0.0
  c.optim.lr_schedule.truncate_cos = 0.8
  c.optim.patch_embed_lr_mult = 0.2
  c.optim.rope_lr_mult = 0.0
  c.optim.layernorm_wd_mult = 0.1
  c.optim.momentum_schedule = ml_collections.ConfigDict()
  c.optim.momentum_schedule.start_warmup_value = 1.0
  c.optim.momentum_schedule.base_value = 0.999
  c.optim.momentum_schedule.final_value = 1.0
  c.optim.momentum_schedule.warmup_iters = 50_000
  c.optim.momentum_schedule.truncate_cos = 0.8

  c.data = ml_collections.ConfigDict()
  c.data.dataset = 'tfds:imagenet2012'  # The paper's ViT-L uses IN-22k; prepare it as TFDS.
  c.data.split = 'train'
  c.data.data_dir = ''  # TFDS data_dir / dataset root; '' = the source's default.
  c.data.image_size = 224
  c.data.crop_scale = (0.6, 1.0)
  c.data.do_hflip = True
  c.data.mask_ratio = 0.65
  c.data.prediction_subsampling = 0.05
  c.data.masking_generator = 'InverseBlock'
  c.data.masking_roll = True
  c.data.num_workers = 8  # Grain worker processes per host (0 = in the main process).
  c.data.prefetch_buffer_size = 4

  c.model = ml_collections.ConfigDict()
  c.model.patch_size = 14
  c.model.n_registers = 16
  c.model.register_coordinates = 'edge'  # or 'zeros'
  c.model.scale_reg_to_visible = True
  c.model.norm_eps = 1e-5
  c.model.embed_dim = 1024
  c.model.num_heads = 16
  c.model.mlp_ratio = 4
  c.model.drop_path_rate = 0.2
  # Stochastic-depth subsets are drawn per group of batch / drop_path_groups samples (the release
  # draws one per GPU). Set it to the number of batch shards to keep the selection on-device.
  c.model.drop_path_groups = 1
  c.model.encoder_depth = 24
  c.model.decoder_depth = 12
  c.model.out_layer = -1

  c.efficiency = ml_collections.ConfigDict()
  c.efficiency.param_dtype = 'float32'
  c.efficiency.compute_dtype = 'bfloat16'
  c.efficiency.reduce_dtype = 'float32'
  # What the blocks keep for the backward pass: 'none' (everything), 'dots_and_attention' (the
  # release's default), 'dots', 'full' (block inputs only); see encoder_decoder.REMAT.
  c.efficiency.remat_policy = 'full'

  c.sharding = ml_collections.ConfigDict()
  # Mesh axes and sizes; -1 takes the remaining devices. The batch is split over all axes.
  c.sharding.mesh = (('data', 1), ('fsdp', -1))
  # (regex on the '/'-joined parameter path, strategy): 'fsdp' shards the largest divisible
  # dimension over the fsdp axis, 'replicate' keeps a full copy. First match wins.
  c.sharding.param_rules = (('.*', 'fsdp'),)

  c.evals = ml_collections.ConfigDict()
  c.evals.period = 20_000  # 0 = only at the end.
  c.evals.final = True  # Evaluate the EMA model when training ends.
  c.evals.random_init_baseline = False  # Also show random-init and raw-pixel numbers (once per workdir).
  c.evals.model = 'student'  # 'student' or 'ema'; the final evaluation always uses 'ema'.
  c.evals.dataset = 'tfds:imagenet2012'
  c.evals.train_split = 'train'
  c.evals.test_split = 'validation'
  c.evals.max_train_images = 0  # 0 = all.
  c.evals.batch_size = 256
  c.evals.knn_ks = (10, 20, 100, 200)
  c.evals.knn_temperature = 0.07
  c.evals.probes = ('knn', 'linear', 'attentive')
  c.evals.probe_lrs = (1e-4, 3e-4, 1e-3, 3e-3)
  c.evals.probe_wds = (0.0, 1e-4)
  c.evals.probe_iters = 12_500
  c.evals.probe_batch_size = 1024
  c.evals.segmentation = ''  # e.g. 'folder:/data/ADEChallengeData2016'; '' = off.
  c.evals.seg_knn_ks = (1, 3, 10, 30)
  c.evals.seg_ignore_labels = (0, 255)
  c.evals.held_out_fraction = 0.1
  c.evals.visualize = True
  return c
