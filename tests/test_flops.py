"""Tests for the analytic FLOP count: hand-computed values, and XLA's own count of the model."""

import jax
import jax.numpy as jnp
import pytest

from capi_jax import methods
from capi_jax.engine import benchmark
from capi_jax.engine import state as state_lib
from capi_jax.engine import step as step_lib
from capi_jax.methods.capi import flops
from capi_jax.models import encoder_decoder
from configs import bench_cpu
from configs import tiny


def _trivial_config():
  """2 images of 2x2 patches of 2x2 pixels, width 2, one block each: small enough by hand."""
  c = tiny.get_config()
  c.train.global_batch_size = 2
  c.data.image_size = 4
  c.capi.data.mask_ratio = 0.5
  c.capi.data.prediction_subsampling = 0.5
  c.capi.model.patch_size = 2
  c.capi.model.n_registers = 4
  c.capi.model.embed_dim = 2
  c.capi.model.num_heads = 1
  c.capi.model.mlp_ratio = 4
  c.capi.model.encoder_depth = 1
  c.capi.model.decoder_depth = 1
  c.capi.model.drop_path_rate = 0.0
  c.capi.num_clusters = 3
  c.capi.clustering_kwargs.n_sk_iter = 1
  return c


def test_step_shapes_follow_the_masking_rule():
  s = flops.step_shapes(bench_cpu.get_config())
  # 112 / 14 = 8 -> 64 tokens; int(64 * 0.65) = 41 masked; int(41 * 0.25) = 10 predicted;
  # efficient drop path keeps int(64 * 0.9) = 57 samples per branch.
  assert (s.n_tokens, s.n_visible, s.n_predict, s.n_keep) == (64, 23, 10, 57)


def test_trivial_config_by_hand():
  # n_tokens 4, n_visible 2, n_predict 1, registers 4, dim 2, mlp 8, patch_dim 12, K 3, B 2.
  parts = flops.train_step_flops(_trivial_config())
  # Teacher, per image, 8 tokens: patch embed 2*4*12*2 = 192; block: q,k,v,o 4*(2*8*2*2) = 256,
  # scores + weighted sum 2*(2*8*2*8) = 512, MLP 2*(2*8*2*8) = 512; total 1472, times 2 images.
  assert parts['teacher_encoder'] == 2 * (192 + 256 + 512 + 512)
  # 8 teacher tokens @ (2, 3): 2*8*2*3 = 96, forward + weight gradient.
  assert parts['clustering_head'] == 2 * 96
  # 24 logits, (4 setup + 4 per iteration) ops each.
  assert parts['sinkhorn'] == 24 * 8
  # 24 logits, 5 ops forward, 10 backward.
  assert parts['clustering_loss'] == 24 * 15
  # Student, per image, 6 tokens: projections 4*(2*6*2*2) = 192, attention 2*(2*6*2*6) = 288,
  # MLP 2*(2*6*2*8) = 384 -> 864, 3x for forward + backward; patch embed of all 4 patches
  # (the visible ones are kept after it) 192 per image, 2x (no gradient w.r.t. the image).
  assert parts['student_encoder'] == 3 * 2 * 864 + 2 * 2 * 192
  # Predictor, per image, 1 query on 6 context tokens: q,o 2*(2*1*2*2) = 16, k,v 2*(2*6*2*2)
  # = 96, attention 2*(2*1*2*6) = 48, MLP 2*(2*1*2*8) = 64 -> 224, 3x.
  assert parts['predictor'] == 3 * 2 * 224
  # 2 predicted tokens @ (2, 3): 24, 3x.
  assert parts['student_head'] == 3 * 24
  assert parts['capi_loss'] == 6 * 15
  assert parts['total'] == sum(v for k, v in parts.items() if k != 'total') == 11146


def test_efficient_drop_path_counts_kept_samples():
  c = _trivial_config()
  c.train.global_batch_size = 10
  c.capi.model.drop_path_rate = 0.25  # max(int(10 * 0.75), 1) = 7 samples per residual branch.
  dropped = flops.train_step_flops(c)
  c.capi.model.drop_path_rate = 0.0
  full = flops.train_step_flops(c)
  assert dropped['predictor'] * 10 == full['predictor'] * 7
  assert dropped['teacher_encoder'] == full['teacher_encoder']
  with c.unlocked():
    c.capi.model.drop_path_rate = 0.25
    c.capi.model.drop_path_groups = 2  # 2 groups of 5: max(int(5 * 0.75), 1) = 3 kept in each.
  grouped = flops.train_step_flops(c)
  assert grouped['predictor'] * 10 == full['predictor'] * 6


def test_rejects_image_size_not_multiple_of_patch():
  c = _trivial_config()
  c.data.image_size = 5
  with pytest.raises(ValueError, match='multiple of'):
    flops.step_shapes(c)


def _xla_flops(fn, *args) -> float:
  """XLA's FLOP count of the compiled `fn(*args)` (one dict, or a list of one per program)."""
  cost = jax.jit(fn).lower(*args).compile().cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  return float(cost['flops'])


def test_encoder_forward_matches_xla_cost_analysis():
  c = tiny.get_config()  # 32x32 images, patch 4: 64 tokens + 4 registers.
  # Width 384 and one block: the elementwise ops the count leaves out stay below 3%.
  c.capi.model.embed_dim, c.capi.model.num_heads, c.capi.model.encoder_depth = 384, 6, 1
  batch = 4
  model = encoder_decoder.from_config(c.capi.model, c.efficiency)
  images = jnp.zeros((batch, c.data.image_size, c.data.image_size, 3), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.key(0), images)
  xla = _xla_flops(lambda v, x: model.apply(v, x, method='encode_all'), variables, images)
  s = flops.step_shapes(c)
  analytic = batch * flops.encoder_forward_flops(s.n_tokens, s)
  # XLA also counts norms, RoPE, GELU and the softmax (1 FLOP per element op), which the
  # analytic count leaves out: 2.9% here (8% at width 128, where they weigh more).
  assert analytic == pytest.approx(xla, rel=0.04)
  assert analytic < xla


def test_train_step_matches_xla_cost_analysis():
  """The whole step (teacher, Sinkhorn, student forward + backward, heads, losses, AdamW, EMA)."""
  c = tiny.get_config()
  c.capi.model.embed_dim, c.capi.model.num_heads = 384, 6
  c.capi.model.encoder_depth, c.capi.model.decoder_depth = 2, 1
  c.capi.model.drop_path_rate = 0.1  # 16 images -> every residual branch runs on 14.
  c.train.global_batch_size = 16
  method = methods.from_config(c)
  optimizer = method.optimizer(jax.eval_shape(method.init, jax.random.PRNGKey(0)).params)
  abstract_state = jax.eval_shape(state_lib.init_fn(method, optimizer), jax.random.PRNGKey(0))
  step = step_lib.make_train_step(method, optimizer)
  xla = _xla_flops(step, abstract_state, benchmark.synthetic_batch(c, method.train_transform()))
  # Measured 2.6% below XLA's count: the elementwise ops, AdamW and the EMA are left out.
  assert method.flops_per_step()['total'] == pytest.approx(xla, rel=0.04)
