r"""The method-neutral part of every config: what the engine reads, whatever the method.

A method's config is this plus its own section (`config.<method>`: its model, optimiser, data
augmentation and everything else it reads) and the two training lengths, which have no default:
  c = common.get_config()
  c.name, c.method = 'vitl', 'capi'
  c.train.total_iters, c.train.global_batch_size = 500_000, 16384
  c.capi = ...  # configs/vitl.py
Sections:
  train       seed, steps (`total_iters`), global batch, logging, checkpoints, profiling
  init        the checkpoint a run starts from ('' = from scratch)
  data        the training images' source and size, and the input pipeline's workers
  efficiency  dtypes, remat policy, scanned block stacks
  sharding    the device mesh and how parameters are stored over it
  evals       the evaluations (capi_jax/evaluators), for every method
The values are configs/vitl.py's (CAPI ViT-L/14, the official default config). Where capi_jax
differs from the official key names:
- `train.global_batch_size` is the *global* batch (official: `batch_size_per_gpu` x GPUs;
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
from ml_collections import config_dict
import numpy as np


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.name = ''  # Set by the method's config.
  c.method = ''  # The pretraining method (capi_jax/methods/): its section is config.<method>.

  c.train = ml_collections.ConfigDict()
  c.train.seed = 0
  # Optimiser steps and images per step over all devices: every method's config sets both.
  c.train.total_iters = config_dict.placeholder(int)
  c.train.global_batch_size = config_dict.placeholder(int)
  c.train.nan_check_period = 20
  c.train.log_loss_every = 20
  c.train.auto_resume = True
  # (START, STOP): a jax.profiler trace of steps START..STOP-1 into WORKDIR/profile (README).
  c.train.profile_steps = ()
  c.train.checkpointing = ml_collections.ConfigDict()
  c.train.checkpointing.period = 3750
  c.train.checkpointing.max_to_keep = 3
  c.train.checkpointing.async_save = True

  # The run to start from: a capi_jax checkpoint of any method, a `capi_jax.convert` output or
  # an official file ('' = from scratch); read by the default `Method.pretrained_paths`.
  c.init = ml_collections.ConfigDict()
  c.init.checkpoint = ''

  c.data = ml_collections.ConfigDict()
  c.data.dataset = 'tfds:imagenet2012'  # The paper's ViT-L uses IN-22k; prepare it as TFDS.
  c.data.split = 'train'
  c.data.data_dir = ''  # TFDS data_dir / dataset root; '' = the source's default.
  c.data.image_size = 224
  c.data.num_workers = 8  # Grain worker processes per host (0 = in the main process).
  c.data.prefetch_buffer_size = 4

  c.efficiency = ml_collections.ConfigDict()
  c.efficiency.param_dtype = 'float32'
  c.efficiency.compute_dtype = 'bfloat16'
  # The dtype the blocks' weight gradients are summed over devices in (the FSDP gradient
  # collectives; `layers.reduce_gradients_in`): float32 as the release; 'bfloat16' halves those
  # bytes (compiled for v5e:2x2 and H100, the collectives of a bf16 step are f32 / bf16 accordingly).
  c.efficiency.reduce_dtype = 'float32'
  # What the blocks keep for the backward pass: 'none' (everything), 'dots_and_attention' (the
  # release's default), 'dots', 'full' (block inputs only); see encoder_decoder.REMAT.
  # Compiled with `python -m capi_jax.aot --topology=v5e:4x4` (ViT-L/14, 16 GiB per chip,
  # blocks scanned) at 64 images per chip: dots_and_attention 2.09 GiB per chip, full 1.72 GiB
  # (XLA's FLOPs 2.56e13 and 2.57e13 per chip per step); dots_and_attention fits up to 848 per
  # chip (15.65 of the 15.75 GiB the compiler lets a program use). docs/pod_plans.md.
  c.efficiency.remat_policy = 'dots_and_attention'
  # The blocks of each stack as one scan over stacked parameters (checkpoints hold them with a
  # leading layer axis; `models/stack.py`), not a Python loop: XLA compiles one block per stack
  # instead of every one. False keeps the per-block loop (parity, debugging); checkpoints move
  # between the two layouts on restore and through `convert`.
  c.efficiency.scan_layers = True
  # Attention kernels (`models/layers.attention`): 'xla' (einsum and float32 softmax: exact, every
  # platform), 'cudnn' (cuDNN flash attention, NVIDIA GPUs, bf16), 'splash' (Pallas splash
  # attention, TPUs), 'auto' (cudnn on GPUs, splash on TPUs from 512 keys on, else xla). A
  # kernel that cannot serve a call falls back to 'xla' and says so once in the log.
  c.efficiency.attention = 'xla'

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
  # Logical axis -> mesh axis (MaxText's logical_axis_rules; names in base/sharding.py's
  # PARAM_AXES): with a 'tensor' axis in the mesh, e.g. (('fsdp', -1), ('tensor', 4)), attention
  # heads and MLP hidden units split over it (Megatron-style). The batch splits over every mesh
  # axis no rule claims, or over a ('batch', axes) rule's axes.
  c.sharding.logical_rules = (('heads', 'tensor'), ('mlp', 'tensor'))

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
