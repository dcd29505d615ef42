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
- `sharding` has no official counterpart (the release uses torch FSDP): a device mesh, regex
  rules storing parameters sharded, and a size below which they replicate.
- `data.dataset` is one string naming a source: `fashion_mnist[:DIR]`, `tfds:NAME`,
  `folder:PATH`, or `synthetic` (random pixels, for benchmarks).
"""

import ml_collections
import numpy as np


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.name = 'vitl'
  c.method = 'capi'  # The pretraining method (capi_jax/methods/): its heads and losses.

  c.train = ml_collections.ConfigDict()
  c.train.seed = 0
  c.train.nan_check_period = 20
  c.train.log_loss_every = 20
  c.train.auto_resume = True
  # (START, STOP): a jax.profiler trace of steps START..STOP-1 into WORKDIR/profile (README).
  c.train.profile_steps = ()
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
  # draws one per GPU: 32 groups of 512 in the paper's run). Use a multiple of the number of
  # batch shards (devices): each group then lies on one device. A group spread over devices
  # makes GSPMD assemble the kept samples of the whole group on each of them (measured on
  # v5e:4x4 with 1 group: 29 GiB of all-reduces per chip per step).
  c.model.drop_path_groups = 32
  c.model.encoder_depth = 24
  c.model.decoder_depth = 12
  c.model.out_layer = -1

  c.efficiency = ml_collections.ConfigDict()
  c.efficiency.param_dtype = 'float32'
  c.efficiency.compute_dtype = 'bfloat16'
  c.efficiency.reduce_dtype = 'float32'
  # What the blocks keep for the backward pass: 'none' (everything), 'dots_and_attention' (the
  # release's default), 'dots', 'full' (block inputs only); see encoder_decoder.REMAT.
  # Measured with `python -m capi_jax.aot --topology=v5e:4x4` (16 GiB per chip) at 64 images
  # per chip: dots_and_attention 9.72 GiB per chip (2.23e13 FLOPs per step), full 6.55 GiB
  # (2.48e13); dots_and_attention still fits at 104 per chip (14.93 GiB). docs/pod_plans.md.
  c.efficiency.remat_policy = 'dots_and_attention'
  # The blocks of each stack as one scan over stacked parameters (checkpoints hold them with a
  # leading layer axis; `models/stack.py`), not a Python loop: XLA compiles one block per stack
  # instead of every one. False keeps the per-block loop (parity, debugging); checkpoints move
  # between the two layouts on restore and through `convert`.
  c.efficiency.scan_layers = True

  # FSDP (capi_jax/base/sharding.py): parameters, EMA and optimiser state are stored sharded
  # over the 'fsdp' axis; each transformer block gathers its own weights where it runs.
  c.sharding = ml_collections.ConfigDict()
  # Mesh axes and sizes; -1 takes the remaining devices. The batch is split over all axes;
  # 'data' replicates the parameters (over 'data', state memory does not shrink).
  c.sharding.mesh = (('data', 1), ('fsdp', -1))
  # Several TPU slices (or GPU nodes): (axis, slices it spans) for the axes that cross the data
  # centre network, e.g. (('data', 2),) with mesh (('data', 2), ('fsdp', -1)) on 2 slices.
  c.sharding.dcn_mesh = ()
  # (regex on the '/'-joined parameter path, strategy): 'fsdp' shards the largest divisible
  # dimension over the fsdp axis, 'replicate' keeps a full copy. First match wins.
  c.sharding.param_rules = (('.*', 'fsdp'),)
  # Arrays below this size are replicated whatever their rule (norm scales, biases, tokens):
  # their shards would save little memory for one more collective each.
  c.sharding.min_shard_bytes = 64 * 1024

  # The official evaluations (default_eval_config.yaml, default_pretrain_config.yaml `evals`):
  # seg + viz of the student every 10k steps, classification every 20k, all on the EMA at the
  # end. Dataset roots are placeholders: point them at local copies. See capi_jax/evaluators.
  c.evals = ml_collections.ConfigDict()
  c.evals.protocols = ('classif', 'seg', 'viz')  # Add 'knn' for capi_jax's k-NN extra.
  c.evals.model = 'student'  # 'student' or 'ema' for the periodic evaluations.
  c.evals.final = True  # Every protocol on the EMA model when training ends.
  c.evals.batch_size = 1024  # Images per forward when extracting features (128 x 8 GPUs).
  c.evals.compute_dtype = 'float32'  # The official evaluations run the model in float32.
  c.evals.random_init_baseline = False  # Also show the random init's numbers (once per workdir).

  c.evals.classif = ml_collections.ConfigDict()  # eval_classification.py, classif_in1k_torchvision.
  c.evals.classif.period = 20_000
  c.evals.classif.train = ml_collections.ConfigDict(dict(dataset='tfds:imagenet2012',
                                                         split='train'))
  # Named test sets; add ImageNet-V2 / -ReaL / -A / -R / ObjectNet as folders or TFDS sets with
  # `labels` (a JSON list per image: an int or a list of valid ints) and `class_map` (a JSON
  # list of the logit columns to score) files where they need them.
  c.evals.classif.tests = ml_collections.ConfigDict({'imagenet_val': ml_collections.ConfigDict(
      dict(dataset='tfds:imagenet2012', split='validation', labels='', class_map=''))})
  c.evals.classif.num_classes = 1000
  c.evals.classif.representations = ('cls', 'avg_patch', 'patch')
  c.evals.classif.learning_rates = (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2)
  c.evals.classif.weight_decays = (5e-4, 1e-3, 5e-2)
  c.evals.classif.n_iters = 12_500
  c.evals.classif.warmup_iters = 1250
  c.evals.classif.batch_size = 1024  # Global: 128 per GPU x 8 GPUs; lr x batch / 256.
  c.evals.classif.ranks = 8  # The official samplers' ranks that make up a batch.
  c.evals.classif.val_proportion = 0.1
  c.evals.classif.resolution = 224
  c.evals.classif.log_every = 250

  c.evals.seg = ml_collections.ConfigDict()  # eval_segmentation.py, seg_ade20k.
  c.evals.seg.period = 10_000
  c.evals.seg.dataset = 'ade20k:/data/ade20k'  # The folder holding ADEChallengeData2016.
  c.evals.seg.train_split = 'training'
  c.evals.seg.val_split = ''  # '': hold out a tenth of train, as the official run.
  c.evals.seg.test_split = 'validation'
  c.evals.seg.resolution = 224
  c.evals.seg.ignore_labels = (0, 255)
  c.evals.seg.classifiers = ('knn', 'logreg')
  c.evals.seg.standardization = 'StandardScaler'
  c.evals.seg.knn_neighbours = (1, 3, 10, 30)
  c.evals.seg.knn_distances = ('cosine', 'L2')
  c.evals.seg.knn_dtype = 'bfloat16'  # The ADE20K job's setting (the function default: float32).
  c.evals.seg.logreg_C = tuple(float(x) for x in 10 ** np.linspace(-6, 5, 8))
  c.evals.seg.logreg_max_iter = 1000
  c.evals.seg.logreg_tol = 1e-12
  c.evals.seg.logreg_linesearch_max_iter = 50
  c.evals.seg.logreg_memory = 5
  c.evals.seg.world_size = 8  # Ties between grid points go to the official 8 ranks' order.

  c.evals.viz = ml_collections.ConfigDict()  # eval_visualizations.py, viz_ade20k(_448).
  c.evals.viz.period = 10_000
  c.evals.viz.dataset = 'ade20k:/data/ade20k'
  c.evals.viz.split = 'training'
  c.evals.viz.resolutions = (224, 448)
  c.evals.viz.num_images = 1024

  c.evals.knn = ml_collections.ConfigDict()  # capi_jax's extra (only if listed in protocols).
  c.evals.knn.period = 0
  c.evals.knn.train = ml_collections.ConfigDict(dict(dataset='tfds:imagenet2012', split='train'))
  c.evals.knn.test = ml_collections.ConfigDict(dict(dataset='tfds:imagenet2012',
                                                    split='validation'))
  c.evals.knn.max_train_images = 0  # 0 = all (features held in host memory: 8 D bytes/image).
  c.evals.knn.max_test_images = 0
  c.evals.knn.ks = (10, 20, 100, 200)
  c.evals.knn.temperature = 0.07
  c.evals.knn.pixels = False
  c.evals.knn.resolution = 224
  return c
