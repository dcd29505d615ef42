"""EncoderDecoder: parity with the official release, shape generality, stochastic depth, dtypes."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from capi_jax.models import encoder_decoder
from capi_jax.models import layers
from capi_jax.models import stack
from capi_jax.reference import capi as capi_parity
from capi_jax.reference import harness

# float32 parity with the PyTorch release; errors measured ~3e-6 on values of order 3.
FORWARD_TOL = 1e-5


@pytest.fixture(scope='module')
def ctx(fixture_path):
  return capi_parity.Context(harness.load_fixture(fixture_path))


def small_config(**overrides) -> ml_collections.ConfigDict:
  """A second architecture: other patch size, width, heads, depths and register count."""
  model = dict(patch_size=8, n_registers=8, register_coordinates='edge', scale_reg_to_visible=True,
               norm_eps=1e-5, embed_dim=48, num_heads=3, mlp_ratio=4, drop_path_rate=0.0,
               encoder_depth=2, decoder_depth=2, out_layer=-1)
  model.update(overrides)
  return ml_collections.ConfigDict(dict(
      model=model, efficiency=dict(compute_dtype='float32', param_dtype='float32',
                                   remat_policy='none')))


def build(cfg: ml_collections.ConfigDict, **kwargs) -> encoder_decoder.EncoderDecoder:
  """The EncoderDecoder of a `small_config` (its model section and efficiency)."""
  return encoder_decoder.from_config(cfg.model, cfg.efficiency, **kwargs)


def test_rope_frequencies_bit_identical_to_release(ctx):
  ref = ctx.arrays['backbone/encoder.blocks.0.residual1.fn.rope.freqs']
  np.testing.assert_array_equal(encoder_decoder.rope_frequencies(ref.shape[1]), ref)


def test_torch_linspace_endpoints_and_symmetry():
  x = layers.torch_linspace(0, 1, 7)
  assert x[0] == 0 and x[-1] == 1 and x.dtype == np.float32
  np.testing.assert_array_equal(layers.torch_linspace(0, 1, 1), [0])


def test_edge_register_coordinates_go_around_the_square():
  coords = encoder_decoder.register_coordinates('edge', 8)
  np.testing.assert_array_equal(
      coords, [[0, 0], [0.5, 0], [1, 0], [1, 0.5], [1, 1], [0.5, 1], [0, 1], [0, 0.5]])
  np.testing.assert_array_equal(encoder_decoder.register_coordinates('zeros', 4), np.zeros((4, 2)))
  with pytest.raises(ValueError, match='divisible by 4'):
    encoder_decoder.register_coordinates('edge', 6)


def test_patch_coordinates_row_major_non_square():
  coords = encoder_decoder.patch_coordinates(2, 3)
  np.testing.assert_array_equal(coords[:, 0], [0, 0, 0, 1, 1, 1])
  np.testing.assert_array_equal(coords[:, 1], [0, 0.5, 1, 0, 0.5, 1])


def test_eval_forward_matches_reference(ctx):
  global_repr, registers, feature_map = ctx.model.apply(
      {'params': ctx.backbone}, ctx.images('fwd/images'))
  for name, ours in [('global_repr', global_repr), ('registers', registers),
                     ('feature_map', feature_map)]:
    np.testing.assert_allclose(ours, ctx.arrays[f'fwd/{name}'], atol=FORWARD_TOL, rtol=0,
                               err_msg=name)


def test_training_forward_matches_reference(ctx):
  variables = {'params': ctx.backbone}
  images = ctx.images('pretrain/images')
  visible = ctx.per_image_indices('pretrain/visible_indices', 'pretrain/images')
  predict = ctx.per_image_indices('pretrain/predict_indices', 'pretrain/images')
  student_patches, predictions = ctx.model.apply(
      variables, images, visible, predict, train=False, method='pretrain')
  teacher_patches = ctx.model.apply(variables, images, method='encode_all')
  np.testing.assert_allclose(student_patches, ctx.arrays['pretrain/student_patches'],
                             atol=FORWARD_TOL, rtol=0)
  ref_predictions = ctx.arrays['pretrain/student_predictions']
  np.testing.assert_allclose(np.asarray(predictions).reshape(ref_predictions.shape),
                             ref_predictions, atol=FORWARD_TOL, rtol=0)
  np.testing.assert_allclose(teacher_patches, ctx.arrays['pretrain/teacher_patches'],
                             atol=FORWARD_TOL, rtol=0)


def test_parameter_names_used_by_optimiser_groups(ctx):
  paths = {'/'.join(k.key for k in p) for p, _ in jax.tree_util.tree_flatten_with_path(
      ctx.backbone)[0]}
  assert {'patch_embed/kernel', 'patch_embed/bias', 'registers', 'mask_token'} <= paths
  assert 'encoder/blocks_0/residual1/norm/scale' in paths
  assert 'decoder/blocks_1/residual1/fn/rope/freqs' in paths
  assert 'encoder/blocks_2/residual2/fn/fc2/kernel' in paths
  assert not any(p.endswith('bias') and 'patch_embed' not in p for p in paths)


@pytest.mark.parametrize('overrides', [
    {},
    {'register_coordinates': 'zeros', 'scale_reg_to_visible': False, 'out_layer': 1,
     'n_registers': 2},
])
def test_teacher_equals_student_when_everything_is_visible(overrides):
  """encode_all == pretrain's student patches when all tokens are visible (non-square image)."""
  model = build(small_config(**overrides))
  images = jax.random.normal(jax.random.key(0), (2, 40, 24, 3))
  variables = jax.jit(model.init)(jax.random.key(1), images)
  n_tokens = (40 // 8) * (24 // 8)
  visible = jnp.tile(jnp.arange(n_tokens)[None], (2, 1))
  predict = jnp.array([[0, 7], [14, 3]])
  student, predictions = jax.jit(functools.partial(model.apply, train=False, method='pretrain'))(
      variables, images, visible, predict)
  teacher = jax.jit(functools.partial(model.apply, method='encode_all'))(variables, images)
  np.testing.assert_allclose(student, teacher, atol=1e-5, rtol=1e-5)
  assert predictions.shape == (2, 2, 48)
  _, registers, feature_map = jax.jit(model.apply)(variables, images)
  np.testing.assert_allclose(feature_map.reshape(2, n_tokens, 48), teacher, atol=1e-5, rtol=1e-5)
  assert registers.shape == (2, model.n_registers, 48)


def test_predictions_depend_only_on_own_image_and_position():
  """A query's prediction doesn't depend on the other queries (cross-attention only)."""
  model = build(small_config())
  images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  variables = jax.jit(model.init)(jax.random.key(1), images)
  visible = jnp.tile(jnp.array([0, 1, 4, 5, 6, 9]), (2, 1))
  apply = jax.jit(functools.partial(model.apply, variables, images, visible, train=False,
                                    method='pretrain'))
  _, both = apply(jnp.array([[2, 3], [2, 3]]))
  _, one = apply(jnp.array([[3], [3]]))
  np.testing.assert_allclose(both[:, 1:], one, atol=1e-5, rtol=1e-5)


def test_image_size_must_be_divisible_by_patch_size():
  model = build(small_config())
  with pytest.raises(ValueError, match='not divisible by the patch size'):
    model.init(jax.random.key(0), jnp.zeros((1, 30, 32, 3)))


@pytest.mark.parametrize('b, groups', [(5, 1), (10, 2)])
def test_efficient_drop_path_updates_a_random_subset_scaled(b, groups):
  """In each group of `local` samples, max(int(local*keep), 1) get the branch, x local/n_keep."""
  drop, local = 0.5, b // groups
  n_keep = max(int(local * (1 - drop)), 1)
  mlp = functools.partial(layers.Mlp, 2)
  norm = functools.partial(encoder_decoder.RMSNorm, 1e-5)
  train = encoder_decoder.Residual(norm, mlp, drop_rate=drop, deterministic=False, drop_path_groups=groups)
  evaluate = encoder_decoder.Residual(norm, mlp, drop_rate=drop, deterministic=True)
  x = jax.random.normal(jax.random.key(0), (b, 3, 8))
  variables = evaluate.init(jax.random.key(1), x)
  full = evaluate.apply(variables, x)
  out = train.apply(variables, x, rngs={'drop_path': jax.random.key(2)})
  changed = np.any(np.asarray(out) != np.asarray(x), axis=(1, 2))
  np.testing.assert_array_equal(changed.reshape(groups, local).sum(1), n_keep)
  np.testing.assert_allclose(out[changed] - x[changed], (full - x)[changed] * local / n_keep,
                             atol=1e-5, rtol=1e-5)


def test_drop_path_in_training_forward_needs_and_uses_rng():
  model = build(small_config(drop_path_rate=0.4))
  images = jax.random.normal(jax.random.key(0), (4, 16, 16, 3))
  variables = jax.jit(model.init)(jax.random.key(1), images)
  visible = jnp.tile(jnp.array([0, 1, 2]), (4, 1))
  predict = jnp.tile(jnp.array([3]), (4, 1))
  apply = jax.jit(lambda k: model.apply(variables, images, visible, predict, train=True,
                                        rngs={'drop_path': k}, method='pretrain'))
  a, b = apply(jax.random.key(2)), apply(jax.random.key(3))
  assert a[0].shape == (4, 3, 48) and a[1].shape == (4, 1, 48)
  assert not np.allclose(a[1], b[1])
  np.testing.assert_array_equal(apply(jax.random.key(2))[1], a[1])


def test_remat_policies_do_not_change_values_or_gradients():
  images = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
  visible = jnp.tile(jnp.array([0, 1, 2]), (2, 1))
  predict = jnp.tile(jnp.array([3]), (2, 1))
  params = jax.jit(build(small_config()).init)(jax.random.key(1), images)['params']
  directions = jax.random.normal(jax.random.key(4), (2, 2, 3, 48))

  def grads(policy):
    cfg = small_config(drop_path_rate=0.5)
    cfg.efficiency.remat_policy = policy
    model = build(cfg)

    def loss(p):
      s, pr = model.apply({'params': p}, images, visible, predict, train=True,
                          rngs={'drop_path': jax.random.key(3)}, method='pretrain')
      # Outputs are RMS-normed, so sum(s**2) would be constant: project on fixed directions.
      return jnp.sum(s * directions[0][:, :3]) + jnp.sum(pr * directions[1][:, :1])

    return jax.jit(jax.grad(loss))(params)

  reference = grads('none')
  for policy in layers.REMAT_POLICIES[1:]:
    for ours, ref in zip(jax.tree.leaves(grads(policy)), jax.tree.leaves(reference)):
      # Recomputation reorders float32 sums: agree to ~1e-5 of each gradient's scale.
      assert np.max(np.abs(ours - ref)) <= 1e-4 * np.max(np.abs(ref)), policy


@pytest.mark.parametrize('policy,kept,recomputed', [
    ('dots_and_attention', ('attention_out', 'Dense'), ('exp', 'erf', 'rsqrt')),
    ('dots', ('Dense',), ('attention_out', 'exp', 'erf', 'rsqrt')),
    ('full', (), ('attention_out', 'Dense', 'exp', 'erf', 'rsqrt')),
])
def test_remat_policy_keeps_what_it_names(policy, kept, recomputed, capsys):
  """What one block saves for its backward pass: 'Dense' = weight-matmul outputs, 'exp' =
  softmax, 'erf' = GELU, 'rsqrt' = RMSNorm, 'attention_out' = the attention output."""
  block = encoder_decoder.Transformer(depth=1, num_heads=3, remat_policy=policy)
  x = jax.random.normal(jax.random.key(0), (2, 5, 48))
  coords = jax.random.uniform(jax.random.key(1), (2, 5, 2))
  params = block.init(jax.random.key(2), x, coords, (1,), True)
  loss = lambda p: jnp.sum(block.apply(p, x, coords, (1,), True)[1] ** 3)
  jax.ad_checkpoint.print_saved_residuals(loss, params)
  # One line per saved array, naming the op that made it (parameters aside).
  saved = [line for line in capsys.readouterr().out.splitlines() if 'from the argument' not in line]

  def has(name):
    return any(name in line and (name != 'exp' or 'output of exp' in line) for line in saved)
  for name in kept:
    assert has(name), (policy, name, saved)
  for name in recomputed:
    assert not has(name), (policy, name, saved)


def test_rope_freqs_get_no_gradient_when_not_trained():
  images = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
  visible, predict = jnp.tile(jnp.arange(3), (2, 1)), jnp.tile(jnp.array([3]), (2, 1))

  def grads(train_rope_freqs):
    model = build(small_config(), train_rope_freqs=train_rope_freqs)
    params = jax.jit(model.init)(jax.random.key(1), images)['params']
    loss = lambda p: jnp.sum(model.apply({'params': p}, images, visible, predict, train=False,
                                         method='pretrain')[1][..., 0])
    return jax.jit(jax.grad(loss))(params)

  frozen, trained = grads(False), grads(True)
  flat = lambda g: {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(g)}
  frozen, trained = flat(frozen), flat(trained)
  for name in frozen:
    if 'freqs' in name:
      assert not np.any(frozen[name]) and np.any(trained[name]), name
    else:  # The same gradient, up to float32 reassociation.
      np.testing.assert_allclose(frozen[name], trained[name], rtol=1e-5, atol=1e-7, err_msg=name)


def test_bf16_compute_keeps_float32_params_and_stays_close():
  cfg = small_config()
  images = jax.random.normal(jax.random.key(0), (2, 16, 24, 3))
  f32 = build(cfg)
  variables = jax.jit(f32.init)(jax.random.key(1), images)
  cfg.efficiency.compute_dtype = 'bfloat16'
  bf16 = build(cfg)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(
      jax.eval_shape(bf16.init, jax.random.key(1), images)))
  out16 = jax.jit(bf16.apply)(variables, images)
  out32 = jax.jit(f32.apply)(variables, images)
  for a, b in zip(out16, out32):
    assert a.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(a, np.float32), b, atol=0.1, rtol=0.05)


def test_from_config_rejects_unknown_remat_policy():
  cfg = small_config()
  cfg.efficiency.remat_policy = 'everything'
  with pytest.raises(ValueError, match='remat_policy'):
    build(cfg).init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))


def test_residual_is_plain_when_deterministic():
  """No rng is needed outside training even with a non-zero drop rate."""
  res = encoder_decoder.Residual(functools.partial(encoder_decoder.RMSNorm), functools.partial(nn.Dense, 4),
                        drop_rate=0.9, deterministic=True)
  x = jax.random.normal(jax.random.key(1), (3, 2, 4))
  variables = res.init(jax.random.key(0), x)
  # Every sample gets its whole branch, unscaled: x + fn(norm(x)), with fn and norm applied
  # by hand from the same parameters.
  norm = encoder_decoder.RMSNorm().apply({'params': variables['params']['norm']}, x)
  branch = nn.Dense(4).apply({'params': variables['params']['fn']}, norm)
  assert float(jnp.abs(branch).max()) > 0.1  # A branch that is there to be dropped.
  np.testing.assert_allclose(res.apply(variables, x), x + branch, rtol=1e-6, atol=1e-6)


def test_grouped_drop_path_on_a_sharded_batch_equals_one_device():
  """drop_path_groups = number of batch shards: same numbers as on one device."""
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ('data',))
  res = encoder_decoder.Residual(functools.partial(encoder_decoder.RMSNorm), functools.partial(layers.Mlp, 2),
                        drop_rate=0.5, deterministic=False, drop_path_groups=8)
  x = jax.random.normal(jax.random.key(0), (16, 3, 8))
  variables = res.init(jax.random.key(1), x)
  apply = jax.jit(lambda v, x: res.apply(v, x, rngs={'drop_path': jax.random.key(2)}))
  sharded = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data')))
  np.testing.assert_allclose(apply(variables, sharded), apply(variables, x), rtol=1e-6, atol=1e-6)


def test_scanned_blocks_compute_what_the_loop_computes():
  """efficiency.scan_layers: the same numbers on the same (stacked) parameters, in every
  forward (eval: one predictor block of two; pretrain; encode with kept block outputs) and
  in the gradients, within float32 reassociation."""
  loop_cfg, scan_cfg = small_config(encoder_depth=3, out_layer=2), small_config(
      encoder_depth=3, out_layer=2)
  scan_cfg.efficiency.scan_layers = True
  loop, scanned = build(loop_cfg), build(scan_cfg)
  images = jax.random.normal(jax.random.key(0), (2, 16, 24, 3))
  params = jax.jit(loop.init)(jax.random.key(1), images)['params']
  stacked = stack.to_scan_layout(params)
  assert jax.tree.structure(stacked) == jax.tree.structure(
      jax.eval_shape(scanned.init, jax.random.key(1), images)['params'])
  assert stacked['encoder']['blocks']['residual1']['fn']['q_proj']['kernel'].shape == (3, 48, 48)
  close = functools.partial(np.testing.assert_allclose, atol=2e-5, rtol=2e-5)
  jax.tree.map(close, scanned.apply({'params': stacked}, images),
               loop.apply({'params': params}, images))
  visible, predict = jnp.tile(jnp.arange(3), (2, 1)), jnp.tile(jnp.array([3, 5]), (2, 1))
  run = lambda model, p, fn: model.apply({'params': p}, images, visible, predict, method=fn)
  jax.tree.map(close, run(scanned, stacked, 'pretrain'), run(loop, params, 'pretrain'))
  encode = lambda model, p: model.apply({'params': p}, images, blocks=(0, 2), method='encode')
  ours, ref = encode(scanned, stacked), encode(loop, params)
  close(ours.tokens, ref.tokens)
  assert sorted(ours.blocks) == [0, 2]
  jax.tree.map(close, ours.blocks, ref.blocks)
  loss = lambda model: lambda p: jnp.sum(jnp.sin(run(model, p, 'pretrain')[1]))
  grads = jax.grad(loss(scanned))(stacked)
  jax.tree.map(close, stack.to_loop_layout(grads), jax.grad(loss(loop))(params))


def test_scanned_blocks_draw_stochastic_depth_per_layer():
  cfg = small_config(drop_path_rate=0.5, encoder_depth=3)
  cfg.efficiency.scan_layers = True
  model = build(cfg)
  images = jax.random.normal(jax.random.key(0), (4, 16, 16, 3))
  variables = jax.jit(model.init)(jax.random.key(1), images)
  visible, predict = jnp.tile(jnp.arange(3), (4, 1)), jnp.tile(jnp.array([3]), (4, 1))
  apply = jax.jit(lambda k: model.apply(variables, images, visible, predict, train=True,
                                        rngs={'drop_path': k}, method='pretrain'))
  a, b = apply(jax.random.key(2)), apply(jax.random.key(3))
  assert np.all(np.isfinite(a[1])) and not np.allclose(a[1], b[1])
  np.testing.assert_array_equal(apply(jax.random.key(2))[1], a[1])
