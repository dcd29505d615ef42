r"""A fixed CPU benchmark shape, for comparing capi_jax with the official PyTorch code.

Run:
  python -m capi_jax.bench --config=configs/bench_cpu.py

Images 112x112, patch 14 (64 tokens), width 192, 3 heads, encoder depth 12, predictor depth 6,
16 registers, 1024 clusters, global batch 64, mask ratio 0.65, prediction subsampling 0.25,
drop path 0.1, float32, synthetic images: the shape of `torch_reference_bench.py --shape
bench_cpu`, so that `benchmarks/side_by_side.py` times both codes on it (README, Speed).
"""

import ml_collections

from configs import vitl


def get_config() -> ml_collections.ConfigDict:
  c = vitl.get_config()
  c.name = 'bench_cpu'
  c.capi.num_clusters = 1024
  c.train.global_batch_size = 64
  c.data.dataset = 'synthetic'
  c.data.image_size = 112
  c.capi.data.mask_ratio = 0.65
  c.capi.data.prediction_subsampling = 0.25
  c.data.num_workers = 0
  c.capi.model.patch_size = 14
  c.capi.model.n_registers = 16
  c.capi.model.embed_dim = 192
  c.capi.model.num_heads = 3
  c.capi.model.encoder_depth = 12
  c.capi.model.decoder_depth = 6
  c.capi.model.drop_path_rate = 0.1
  c.capi.model.drop_path_groups = 1  # One subset over the batch, as the official single process.
  c.efficiency.compute_dtype = 'float32'
  c.efficiency.remat_policy = 'none'
  c.efficiency.scan_layers = False  # The CPU side-by-side times the per-block loop.
  return c
