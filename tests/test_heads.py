"""Heads and losses: parity with the official release, sharded Sinkhorn, target entropy."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from capi_jax.methods.capi import convert as capi_convert
from capi_jax.methods.capi import heads
from capi_jax.reference import capi as capi_parity
from capi_jax.reference import harness

FORWARD_TOL = 1e-5  # float32 parity; measured errors are ~1e-7 .. 3e-6.
GRAD_TOL = 1e-4


@pytest.fixture(scope='module')
def ctx(fixture_path):
  return capi_parity.Context(harness.load_fixture(fixture_path))


def _clustering_params(ctx, prefix='clustering/'):
  sd = {'layer.weight': ctx.arrays[prefix + 'layer.weight'],
        'layer.bias': ctx.arrays[prefix + 'layer.bias']}
  k, d = sd['layer.weight'].shape
  return capi_convert.clustering_head_to_flax(sd, d, k)


def _clustering_fn(ctx):
  kw = ctx.config.capi.clustering_kwargs
  return functools.partial(heads.clustering_targets_and_loss, target_temp=kw.target_temp,
                           pred_temp=kw.pred_temp, n_sk_iter=kw.n_sk_iter)


def test_clustering_targets_loss_and_grads_match_reference(ctx):
  params = _clustering_params(ctx)
  (loss, assignments), grads = jax.value_and_grad(_clustering_fn(ctx), has_aux=True)(
      params, jnp.asarray(ctx.arrays['clustering/input']))
  np.testing.assert_allclose(assignments, ctx.arrays['clustering/assignments'], atol=FORWARD_TOL)
  np.testing.assert_allclose(loss, ctx.arrays['clustering/loss'], rtol=FORWARD_TOL)
  np.testing.assert_allclose(grads['kernel'].T, ctx.arrays['clustering/grad_weight'],
                             atol=GRAD_TOL)
  np.testing.assert_allclose(grads['bias'], ctx.arrays['clustering/grad_bias'], atol=GRAD_TOL)


def test_student_head_logits_loss_and_grads_match_reference(ctx):
  sd = {k: ctx.arrays['student_head/' + k]
        for k in ('last_layer.weight_v', 'last_layer.weight_g')}
  k, d = sd['last_layer.weight_v'].shape
  params = capi_convert.student_head_to_flax(sd, d, k)

  def loss_fn(p):
    logits = heads.L2NormLinear(k).apply({'params': p}, ctx.arrays['student_head/input'])
    return heads.capi_loss(logits, ctx.arrays['student_head/targets'],
                           ctx.config.capi.student_temp), logits

  (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  np.testing.assert_allclose(logits, ctx.arrays['student_head/logits'], atol=FORWARD_TOL)
  np.testing.assert_allclose(loss, ctx.arrays['student_head/loss'], rtol=FORWARD_TOL)
  np.testing.assert_allclose(grads['kernel_v'].T, ctx.arrays['student_head/grad_weight_v'],
                             atol=GRAD_TOL)
  np.testing.assert_allclose(grads['kernel_g'].T, ctx.arrays['student_head/grad_weight_g'],
                             atol=GRAD_TOL)


def test_first_iteration_losses_and_target_entropy_match_reference(ctx):
  """Teacher forward of the fixture's training run: clustering loss and target entropy.

  The release logs target_entropy = mean over predicted tokens of -sum_k t log t of the Sinkhorn
  targets at the predicted positions (not the entropy of the mean assignment).
  """
  backbone = capi_convert.backbone_to_flax(ctx.group('step/init/student/backbone'), ctx.config)
  params = _clustering_params(ctx, 'step/init/teacher_head/')
  images = ctx.images('step/0/images')
  patches = jax.jit(functools.partial(ctx.model.apply, method='encode_all'))(
      {'params': backbone}, images)
  loss, assignments = _clustering_fn(ctx)(params, jnp.swapaxes(patches, 0, 1))
  predict = ctx.per_image_indices('step/0/predict_indices', 'step/0/images')
  targets = jnp.take_along_axis(jnp.swapaxes(assignments, 0, 1), predict[:, :, None], axis=1)
  np.testing.assert_allclose(loss, ctx.arrays['step/0/clustering_loss'], rtol=FORWARD_TOL)
  np.testing.assert_allclose(heads.target_entropy(targets), ctx.arrays['step/0/target_entropy'],
                             rtol=FORWARD_TOL)


def test_sinkhorn_normalises_rows_and_is_shift_invariant_per_position():
  scores = jax.random.normal(jax.random.key(0), (3, 8, 5)) * 10
  m = heads.sinkhorn_knopp(scores, 3)
  np.testing.assert_allclose(m.sum(-1), 1.0, rtol=1e-5)
  shifted = heads.sinkhorn_knopp(scores + jnp.arange(3.0)[:, None, None], 3)
  np.testing.assert_allclose(shifted, m, rtol=1e-5)


def test_sharded_sinkhorn_equals_single_device():
  """Batch split over 8 devices: the sums over samples are global, results equal one device."""
  devices = jax.devices()
  assert len(devices) == 8
  mesh = jax.sharding.Mesh(np.array(devices), ('data',))
  n_pos, batch, dim, k = 4, 16, 8, 12
  patches = jax.random.normal(jax.random.key(0), (n_pos, batch, dim))
  params = heads.ClusteringHead(k).init(jax.random.key(1), patches[0])['params']
  params = {**params, 'bias': jax.random.normal(jax.random.key(2), (k,))}
  fn = jax.jit(jax.value_and_grad(functools.partial(
      heads.clustering_targets_and_loss, target_temp=0.06, pred_temp=0.12, n_sk_iter=3),
      has_aux=True))

  single = jax.device_put(patches, devices[0])
  (loss_1, assign_1), grads_1 = fn(params, single)
  sharded = jax.device_put(patches, jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec(None, 'data')))
  (loss_8, assign_8), grads_8 = fn(params, sharded)

  assert len(assign_8.sharding.device_set) == 8
  np.testing.assert_allclose(assign_8, assign_1, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(loss_8, loss_1, rtol=1e-6)
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6),
               grads_8, grads_1)
  # Per-shard normalisation would differ: the batch axis really is normalised globally.
  local = heads.sinkhorn_knopp(
      heads.ClusteringHead(k).apply({'params': params}, patches[:, :2]) / 0.06, 3)
  assert not np.allclose(local, assign_1[:, :2], atol=1e-4)
  # The step's form, two groups of positions with the batch split, under the mesh (head
  # parameters gathered, per-sample targets on their batch shard): as on one device.
  picked = jax.random.randint(jax.random.key(3), (batch, 2), 0, n_pos)
  step = jax.jit(functools.partial(heads.clustering_step, target_temp=0.06, pred_temp=0.12,
                                   n_sk_iter=3, chunks=2))
  with jax.set_mesh(mesh):
    loss_s, grads_s, targets_s = step(params, sharded, jax.device_put(
        picked, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))))
  targets_1 = np.take_along_axis(np.swapaxes(assign_1, 0, 1), np.asarray(picked)[..., None], 1)
  np.testing.assert_allclose(targets_s, targets_1, atol=1e-6)
  np.testing.assert_allclose(loss_s, loss_1, rtol=1e-6)
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6),
               grads_s, grads_1)


def test_heads_init_as_release():
  x = jnp.zeros((1, 64))
  clustering = heads.ClusteringHead(512).init(jax.random.key(0), x)['params']
  assert 0.95 < float(jnp.std(clustering['kernel'])) < 1.05
  np.testing.assert_array_equal(clustering['bias'], 0)
  assert 'bias' not in heads.ClusteringHead(8, use_bias=False).init(jax.random.key(0), x)['params']
  student = heads.L2NormLinear(512).init(jax.random.key(0), x)['params']
  assert 0.019 < float(jnp.std(student['kernel_v'])) < 0.021
  assert student['kernel_g'].shape == (1, 512)
  np.testing.assert_array_equal(student['kernel_g'], 1)


def test_target_entropy_of_one_hot_and_uniform():
  one_hot = jax.nn.one_hot(jnp.array([1, 3]), 4)
  np.testing.assert_allclose(heads.target_entropy(one_hot), 0.0, atol=1e-7)
  np.testing.assert_allclose(heads.target_entropy(jnp.full((2, 4), 0.25)), np.log(4), rtol=1e-6)


def test_clustering_in_groups_of_positions_equals_the_whole(ctx):
  params = _clustering_params(ctx)
  patches = jnp.asarray(ctx.arrays['clustering/input'])  # (n_pos, batch, D)
  n_pos, batch = patches.shape[:2]
  picked = jax.random.randint(jax.random.key(0), (batch, 3), 0, n_pos)
  (loss, assignments), grads = jax.value_and_grad(_clustering_fn(ctx), has_aux=True)(
      params, patches)
  targets = np.take_along_axis(np.swapaxes(assignments, 0, 1), np.asarray(picked)[..., None], 1)
  kw = ctx.config.capi.clustering_kwargs
  chunks = [c for c in range(2, n_pos + 1) if n_pos % c == 0][0]
  for c, unroll in ((1, False), (chunks, False), (chunks, True)):
    loss_c, grads_c, targets_c = jax.jit(functools.partial(
        heads.clustering_step, target_temp=kw.target_temp, pred_temp=kw.pred_temp,
        n_sk_iter=kw.n_sk_iter, chunks=c, unroll=unroll))(params, patches, picked)
    np.testing.assert_allclose(loss_c, loss, rtol=1e-6)
    np.testing.assert_allclose(targets_c, targets, atol=1e-6)  # jit vs eager roundings.
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6),
                 grads_c, grads)
  # The fewest groups whose logits fit the budget.
  assert heads.position_chunks(256, 64, 16384) == 4
  assert heads.position_chunks(64, 64, 1024) == 1
  assert heads.position_chunks(6, 1, 100, max_bytes=1000) == 3
