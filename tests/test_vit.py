"""The standard ViT family: parity with MIM-Refiner, CAE v2 (student and CLIP teacher) and the
post-norm data2vec 2.0 layout; position tables and their resize; converters; options.

Every size comes from the fixtures' `meta_json` and array shapes.
"""

import json
import pathlib

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from capi_jax.models import stack
from capi_jax.models import vit
from capi_jax.reference import harness
from capi_jax.weights import rules
from capi_jax.weights import vit as vit_weights

FIXTURES = pathlib.Path(__file__).parent / 'fixtures'
# float32 against the official float32 runs: measured <= 2.3e-6 on values of order 5.
FORWARD_TOL = 1e-5
# The CAE v2 fixture README's tolerance for activations.
CAEV2_TOL = 2e-5
# kappamodules' MIM-Refiner ViT kinds -> vit.FAMILIES.
_KAPPAMODULES_KINDS = {'vit.vit': 'kappamodules', 'vit.data2vec2_vit': 'data2vec2'}


def nhwc(images: np.ndarray) -> jax.Array:
  return jnp.asarray(images.transpose(0, 2, 3, 1))


def group(arrays: dict[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
  return {k: v for k, v in arrays.items() if k.startswith(prefix)}


def assert_same_state_dict(got: dict[str, np.ndarray], expected: dict[str, np.ndarray]):
  assert sorted(got) == sorted(expected)
  for k, v in expected.items():
    assert got[k].dtype == v.dtype, k
    np.testing.assert_array_equal(got[k], v, err_msg=k)


def random_params(model: vit.ViT, seed: int = 0):
  """Random values in `model`'s parameter tree (no initialiser to compile)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: rng.normal(0, 0.3, s.shape).astype(np.float32),
                      vit_weights.param_shapes(model))


# ---------------------------------------------------------------------------- fixtures
@pytest.fixture(scope='module')
def mimref():
  arrays = harness.load_fixture(FIXTURES / 'mim_refiner_reference' / 'mimref_small.npz')
  refine = json.loads(str(arrays['meta_json']))['refine']
  v = refine['vit']
  if v['num_cls_tokens'] != 1:
    raise ValueError(f"vit.ViT has one class token; the fixture has {v['num_cls_tokens']}.")
  family = _KAPPAMODULES_KINDS[v['kind']]
  model = vit.ViT(**{**vit.FAMILIES[family], 'norm_eps': v['eps']}, patch_size=v['patch_size'],
                  image_size=refine['global_res'], embed_dim=v['dim'], depth=v['depth'],
                  num_heads=v['num_attn_heads'], mlp_ratio=v['mlp_ratio'])
  return arrays, refine, model, family


@pytest.fixture(scope='module')
def caev2():
  arrays = harness.load_fixture(FIXTURES / 'caev2_reference' / 'caev2_small.npz')
  meta = json.loads(str(arrays['meta_json']))
  s, t = meta['student'], meta['teacher']
  student = vit.ViT(
      **{**vit.FAMILIES['caev2'], 'norm_eps': s['norm_eps'],
         'layer_scale_init': s['layer_scale_init_value']},
      patch_size=s['patch_size'], image_size=s['img_size'], embed_dim=s['embed_dim'],
      depth=s['depth'], num_heads=s['num_heads'], mlp_ratio=s['mlp_ratio'])
  teacher = vit.ViT(
      **{**vit.FAMILIES['clip'], 'norm_eps': t['norm_eps']}, patch_size=t['vision_patch_size'],
      image_size=t['image_resolution'], embed_dim=t['vision_width'], depth=t['vision_layers'],
      num_heads=t['heads'], out_dim=t['output_dim'])
  return arrays, student, teacher


@pytest.fixture(scope='module')
def d2v2():
  arrays = harness.load_fixture(FIXTURES / 'vit_reference' / 'd2v2_postnorm.npz')
  meta = json.loads(str(arrays['meta_json']))
  c = meta['ctor_kwargs']
  model = vit.ViT(**{**vit.FAMILIES[meta['family']], 'norm_eps': c['eps']},
                  patch_size=c['patch_size'], image_size=c['input_shape'][1], embed_dim=c['dim'],
                  depth=c['depth'], num_heads=c['num_heads'])
  return arrays, model, meta['family']


# ---------------------------------------------------------------------------- position tables
def test_sincos_tables_are_the_releases(mimref, caev2, d2v2):
  for arrays, key in ((mimref[0], 'stage3/init/encoder.pos_embed.embed'),
                     (d2v2[0], 'state_dict/pos_embed.embed')):
    table = arrays[key][0]  # kappamodules' (h, w, D) buffer: bit-identical
    ours = vit.sincos_table(table.shape[0], table.shape[1], table.shape[2], row_first=True)
    np.testing.assert_array_equal(ours, table.reshape(-1, table.shape[2]))
  # CAE v2 computes its table in float32 (one rounding ~6e-8 apart); the class row is zeros.
  table = caev2[0]['student/init/encoder.pos_embed'][0]
  side = int(round((table.shape[0] - 1) ** 0.5))
  np.testing.assert_array_equal(table[0], 0)
  np.testing.assert_allclose(vit.sincos_table(side, side, table.shape[1], row_first=True),
                             table[1:], rtol=0, atol=1e-7)


def test_sincos_column_first_is_the_transposed_grid():
  """MAE's table (column in the first half) at (r, c) is the row-first table at (c, r)."""
  col_first = vit.sincos_table(3, 3, 16, row_first=False).reshape(3, 3, 16)
  row_first = vit.sincos_table(3, 3, 16, row_first=True).reshape(3, 3, 16)
  np.testing.assert_array_equal(col_first, row_first.transpose(1, 0, 2))
  # Patch (r=0, c=1), D = 16: [sin(0 w), cos(0 w), sin(1 w), cos(1 w)], w_k = 10000^(-k/4).
  w = 10000.0 ** -(np.arange(4) / 4)
  np.testing.assert_allclose(row_first[0, 1], np.concatenate(
      [np.zeros(4), np.ones(4), np.sin(w), np.cos(w)]), rtol=0, atol=1e-7)


@pytest.mark.parametrize('method', vit.POS_RESIZES)
def test_resize_pos_table_matches_torch(method):
  torch = pytest.importorskip('torch')
  rng = np.random.default_rng(0)
  for (h, w), size in [((4, 4), (2, 2)), ((14, 14), (6, 6)), ((5, 5), (11, 13)),
                       ((3, 5), (8, 2)), ((16, 16), (37, 37))]:
    table = rng.uniform(-1, 1, (h, w, 8)).astype(np.float32)
    ref = torch.nn.functional.interpolate(
        torch.from_numpy(table).permute(2, 0, 1)[None], size=size, mode=method,
        align_corners=False)[0].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(vit.resize_pos_table(table, size, method), ref, rtol=0, atol=2e-6)
  if method == 'bilinear':  # Its weights are bit-identical to torch's (float32 index math).
    eye = torch.eye(14)[None, :, :, None]
    weights = torch.nn.functional.interpolate(eye, size=(6, 1), mode=method,
                                              align_corners=False)[0, :, :, 0].T.numpy()
    np.testing.assert_array_equal(vit.interpolation_matrix(14, 6, method), weights)


# ---------------------------------------------------------------------------- parity
def test_mim_refiner_pooled_features(mimref):
  arrays, refine, model, family = mimref
  prefix = 'stage3/init/encoder.'
  params = vit_weights.official_to_params(group(arrays, prefix), model, family, prefix=prefix)
  block_heads = tuple(refine['block_heads'])
  encode = jax.jit(lambda images: model.apply({'params': params}, images, blocks=block_heads,
                                              method=model.encode))
  outputs = []
  for views in (arrays['batch0/global_views'], arrays['batch0/local_views']):
    g, b = views.shape[:2]
    outputs.append(encode(nhwc(views.reshape(g * b, *views.shape[2:]))))  # rows view-major
  for head in refine['heads']:
    pooled = [o.tokens[:, 0] if head == 'main' else o.blocks[int(head.removeprefix('cls'))][:, 0]
              for o in outputs]
    np.testing.assert_allclose(np.concatenate(pooled), arrays[f'stage3/step0/pooled/{head}'],
                               rtol=0, atol=FORWARD_TOL, err_msg=head)
  local = arrays['stage3/pos_embed_local'][0]
  table = params['pos_embed'][0].reshape(model.grid, model.grid, -1)
  np.testing.assert_allclose(vit.resize_pos_table(table, local.shape[:2], model.pos_resize),
                             local, rtol=0, atol=1e-6)


def test_caev2_clip_teacher_features(caev2):
  arrays, _, teacher = caev2
  official = group(arrays, 'teacher/visual.')
  params = vit_weights.official_to_params(official, teacher, 'clip', prefix='teacher/visual.')
  params = jax.tree.map(lambda x: x.astype(np.float32), params)  # fp16 tensors, cast exactly
  features = jax.jit(lambda p, x: teacher.apply({'params': p}, x, method=teacher.encode).tokens)(
      params, nhwc(arrays['batch/0/images']))
  np.testing.assert_allclose(features, arrays['fwd/teacher_features'], rtol=0, atol=CAEV2_TOL)


def test_caev2_encoder_on_visible_patches(caev2):
  arrays, student, _ = caev2
  prefix = 'student/init/encoder.'
  params = vit_weights.official_to_params(group(arrays, prefix), student, 'caev2', prefix=prefix)
  masked = arrays['batch/0/bool_masked_pos'].reshape(len(arrays['batch/0/bool_masked_pos']), -1)
  visible = np.stack([np.flatnonzero(~m) for m in masked])  # ascending patch index
  out = jax.jit(lambda p, x, idx: student.apply(
      {'params': p}, x, visible_indices=idx, method=student.encode).tokens)(
          params, nhwc(arrays['batch/0/samples']), jnp.asarray(visible))
  np.testing.assert_allclose(out, arrays['fwd/encoder_out'], rtol=0, atol=CAEV2_TOL)


def test_data2vec2_postnorm_blocks_and_resize(d2v2):
  arrays, model, family = d2v2
  params = vit_weights.official_to_params(group(arrays, 'state_dict/'), model, family,
                                          prefix='state_dict/')
  encode = jax.jit(lambda images: model.apply(
      {'params': params}, images, blocks=tuple(range(model.depth)), method=model.encode))
  out = encode(nhwc(arrays['images']))
  np.testing.assert_allclose(out.tokens, arrays['out/tokens'], rtol=0, atol=FORWARD_TOL)
  for i in range(model.depth):
    np.testing.assert_allclose(out.blocks[i], arrays[f'out/block{i}'], rtol=0, atol=FORWARD_TOL)
  np.testing.assert_allclose(encode(nhwc(arrays['images_small'])).tokens,
                             arrays['out_small/tokens'], rtol=0, atol=FORWARD_TOL)


# ---------------------------------------------------------------------------- converters
def test_round_trips_are_exact(mimref, caev2, d2v2):
  cases = [(group(mimref[0], 'stage3/init/encoder.'), mimref[2], mimref[3], 'stage3/init/encoder.'),
           (group(caev2[0], 'student/init/encoder.'), caev2[1], 'caev2', 'student/init/encoder.'),
           (group(caev2[0], 'teacher/visual.'), caev2[2], 'clip', 'teacher/visual.'),
           (group(d2v2[0], 'state_dict/'), d2v2[1], d2v2[2], 'state_dict/')]
  for official, model, family, prefix in cases:
    params = vit_weights.official_to_params(official, model, family, prefix=prefix)
    assert_same_state_dict(vit_weights.params_to_official(params, family, prefix=prefix), official)
    # Scanned layers: stacked block parameters, converted through the per-block names.
    stacked = vit_weights.official_to_params(official, model.clone(scan_layers=True), family,
                                             prefix=prefix)
    assert 'blocks' in stacked and 'blocks_0' not in stacked
    jax.tree.map(np.testing.assert_array_equal, stacked, stack.to_scan_layout(params))
    assert_same_state_dict(vit_weights.params_to_official(stacked, family, prefix=prefix),
                           official)


def test_mae_checkpoint_names():
  """timm's names (MAE / dBOT / CrossMAE checkpoints) for a one-block model, and back."""
  model = vit.ViT(**vit.FAMILIES['mae'], patch_size=4, image_size=8, embed_dim=16, depth=1,
                  num_heads=2)
  d, n = 16, 4
  expected = {
      'cls_token': (1, 1, d), 'pos_embed': (1, 1 + n, d), 'patch_embed.proj.weight': (d, 3, 4, 4),
      'patch_embed.proj.bias': (d,), 'blocks.0.norm1.weight': (d,), 'blocks.0.norm1.bias': (d,),
      'blocks.0.attn.qkv.weight': (3 * d, d), 'blocks.0.attn.qkv.bias': (3 * d,),
      'blocks.0.attn.proj.weight': (d, d), 'blocks.0.attn.proj.bias': (d,),
      'blocks.0.norm2.weight': (d,), 'blocks.0.norm2.bias': (d,),
      'blocks.0.mlp.fc1.weight': (4 * d, d), 'blocks.0.mlp.fc1.bias': (4 * d,),
      'blocks.0.mlp.fc2.weight': (d, 4 * d), 'blocks.0.mlp.fc2.bias': (d,),
      'norm.weight': (d,), 'norm.bias': (d,)}
  rng = np.random.default_rng(0)
  official = {k: rng.normal(size=s).astype(np.float32) for k, s in expected.items()}
  params = vit_weights.official_to_params(official, model, 'mae')
  assert_same_state_dict(vit_weights.params_to_official(params, 'mae'), official)
  assert vit_weights.official_name('blocks_0/attn/qkv/kernel', 'mae') == 'blocks.0.attn.qkv.weight'
  assert (vit_weights.official_name('blocks_0/attn/qkv/kernel', 'clip')
          == 'transformer.resblocks.0.attn.in_proj_weight')
  with pytest.raises(ValueError, match="Unknown ViT family 'timm'"):
    vit_weights.official_name('cls_token', 'timm')


def test_converter_errors_name_the_parameter(caev2):
  arrays, student, _ = caev2
  prefix = 'student/init/encoder.'
  official = group(arrays, prefix)
  qkv = prefix + 'blocks.0.attn.qkv.weight'
  missing = {k: v for k, v in official.items() if k != qkv}
  with pytest.raises(rules.CheckpointMismatchError,
                     match=rf"missing parameter '{qkv}': expected shape \(\d+, \d+\), found none"):
    vit_weights.official_to_params(missing, student, 'caev2', prefix=prefix)
  extra = {**official, prefix + 'blocks.0.attn.k_bias': official[prefix + 'blocks.0.attn.q_bias']}
  with pytest.raises(rules.CheckpointMismatchError, match=r"unexpected parameter '.*k_bias'"):
    vit_weights.official_to_params(extra, student, 'caev2', prefix=prefix)
  wrong = {**official, qkv: official[qkv][1:]}
  shape = official[qkv].shape
  with pytest.raises(rules.CheckpointMismatchError,
                     match=rf"'{qkv}': expected shape \({shape[0]}, {shape[1]}\), "
                           rf"found \({shape[0] - 1}, {shape[1]}\)"):
    vit_weights.official_to_params(wrong, student, 'caev2', prefix=prefix)
  # The wrong family: timm names where kappamodules' are expected.
  model = vit.ViT(**vit.FAMILIES['kappamodules'], patch_size=4, image_size=8, embed_dim=16,
                  depth=1, num_heads=2)
  timm_names = vit_weights.params_to_official(random_params(model), 'mae')
  with pytest.raises(rules.CheckpointMismatchError,
                     match="missing parameter 'cls_tokens.tokens'"):
    vit_weights.official_to_params(timm_names, model, 'kappamodules')
  with pytest.raises(rules.CheckpointMismatchError, match='No parameter named visual'):
    vit_weights.official_to_params(official, student, 'clip', prefix='visual.')


# ---------------------------------------------------------------------------- options
def tiny(**overrides) -> vit.ViT:
  fields = {**vit.FAMILIES['caev2'], 'patch_size': 4, 'image_size': 12, 'embed_dim': 16,
            'depth': 2, 'num_heads': 2, **overrides}
  return vit.ViT(**fields)


def test_init_and_eval_interface():
  model = tiny(**vit.FAMILIES['mae'], out_dim=8)
  images = jax.random.normal(jax.random.key(1), (2, 16, 8, 3))  # another, non-square size
  params = jax.jit(model.init)(jax.random.key(0), images)['params']
  # MAE's fresh table: column-first, zero class row.
  table = params['pos_embed'][0]
  np.testing.assert_array_equal(table[0], 0)
  np.testing.assert_array_equal(table[1:], vit.sincos_table(
      model.grid, model.grid, model.embed_dim, row_first=False))
  (global_repr, registers, feature_map), out = jax.jit(lambda p, x: (
      model.apply({'params': p}, x),
      model.apply({'params': p}, x, blocks=(1, 0), method=model.encode)))(params, images)
  assert global_repr.shape == (2, 8) and registers.shape == (2, 0, 8)
  assert feature_map.shape == (2, 4, 2, 8)
  np.testing.assert_array_equal(global_repr, out.tokens[:, 0])
  np.testing.assert_array_equal(feature_map.reshape(2, 8, 8), out.tokens[:, 1:])
  assert sorted(out.blocks) == [0, 1] and out.blocks[0].shape == (2, 9, 16)
  with pytest.raises(ValueError, match=r'blocks \[2\] out of range'):
    jax.eval_shape(lambda p, x: model.apply({'params': p}, x, blocks=(2,), method=model.encode),
                   params, images)


def test_visible_indices_select_tokens():
  """All patches as visible indices is the plain forward; a subset gives [class, subset].

  (Which tokens and positions are kept is checked against CAE v2 above.)
  """
  model = tiny(depth=1)
  images = jax.random.normal(jax.random.key(1), (2, 12, 12, 3))
  params = random_params(model)
  all_patches, plain, subset = jax.jit(lambda p, x: [
      model.apply({'params': p}, x, visible_indices=idx, method=model.encode).tokens
      for idx in (jnp.tile(jnp.arange(9), (2, 1)), None, jnp.array([[0, 4, 8], [1, 2, 7]]))])(
          params, images)
  np.testing.assert_array_equal(all_patches, plain)
  assert subset.shape == (2, 4, 16)


def test_frozen_tables_get_no_gradient_learned_ones_do():
  images = jax.random.normal(jax.random.key(1), (2, 12, 12, 3))
  for pos_embed, frozen in (('sincos_row_col', ('pos_embed',)), ('learned', ())):
    model = tiny(pos_embed=pos_embed, depth=1)
    assert model.frozen_params == frozen
    grads = jax.jit(jax.grad(lambda p, m=model: m.apply({'params': p}, images)[0].sum()))(
        random_params(model))
    assert bool(jnp.any(grads['pos_embed'] != 0)) == (not frozen), pos_embed


def _groups(rows: np.ndarray, atol: float) -> list[np.ndarray]:
  """Representatives of the groups of rows equal within atol."""
  groups = []
  for row in rows:
    if not any(np.abs(row - g).max() <= atol for g in groups):
      groups.append(row)
  return groups


@pytest.mark.parametrize('scan', [False, True])
def test_drop_path_is_per_sample_and_needs_its_rng(scan):
  # Block 1 drops at 0.5 (block 0 at 0: rates grow linearly); no final norm. Scanned, the
  # rates are traced: block 0 draws too, and keeps every sample.
  model = tiny(depth=2, drop_path_rate=0.5, final_norm=False, scan_layers=scan)
  one = jax.random.normal(jax.random.key(1), (1, 12, 12, 3))
  images = jnp.tile(one, (256, 1, 1, 1))  # identical samples: outputs differ by the draws only
  params = random_params(model.clone(scan_layers=False))
  params = stack.to_scan_layout(params) if scan else params
  out, evaluated = jax.jit(lambda p, x: (
      model.apply({'params': p}, x, blocks=(0,), train=True, method=model.encode,
                  rngs={'drop_path': jax.random.key(2)}),
      model.apply({'params': p}, x, method=model.encode).tokens))(params, images)
  tokens, block0 = np.asarray(out.tokens), np.asarray(out.blocks[0])
  # Block 1 keeps or drops each of its two branches: 4 outcomes, one of them block 0's output.
  assert len(_groups(tokens.reshape(256, -1), atol=1e-5)) == 4
  both_dropped = np.mean(np.abs(tokens - block0).max(axis=(1, 2)) == 0)
  assert 0.15 < both_dropped < 0.35  # 0.25 expected
  assert len(_groups(np.asarray(evaluated).reshape(256, -1), atol=1e-5)) == 1
  with pytest.raises(flax.errors.InvalidRngError, match='drop_path'):
    jax.eval_shape(lambda p, x: model.apply({'params': p}, x, train=True, method=model.encode),
                   params, images)


def test_compute_dtype_and_remat():
  images = jax.random.normal(jax.random.key(1), (2, 12, 12, 3))
  params = random_params(tiny())
  ref, remat, bf16 = jax.jit(lambda p, x: [
      tiny(**kw).apply({'params': p}, x)[0]
      for kw in ({}, {'remat_policy': 'dots_and_attention'}, {'dtype': jnp.bfloat16})])(params, images)
  np.testing.assert_allclose(remat, ref, rtol=0, atol=1e-6)
  assert bf16.dtype == jnp.bfloat16
  np.testing.assert_allclose(bf16.astype(np.float32), ref, rtol=0, atol=0.1)


@pytest.mark.parametrize('policy', ['none', 'dots_and_attention'])
def test_scanned_blocks_compute_what_the_loop_computes(policy):
  """The same numbers from stacked parameters: kept block outputs, visible indices, layer
  scale and q/v biases (the caev2 family), gradients."""
  loop = tiny(depth=3, remat_policy=policy)
  scanned = loop.clone(scan_layers=True)
  images = jax.random.normal(jax.random.key(1), (2, 12, 12, 3))
  params = random_params(loop)
  stacked = stack.to_scan_layout(params)
  assert stacked['blocks']['attn']['q_bias'].shape == (3, 16)
  visible = jnp.array([[0, 4, 8], [1, 2, 7]])
  encode = lambda m, p: m.apply({'params': p}, images, visible_indices=visible, blocks=(2, 0),
                                method=m.encode)
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5)
  ours, ref = jax.jit(encode, static_argnums=0)(scanned, stacked), encode(loop, params)
  close(ours.tokens, ref.tokens)
  assert sorted(ours.blocks) == [0, 2]
  jax.tree.map(close, ours.blocks, ref.blocks)
  loss = lambda m: lambda p: jnp.sum(jnp.sin(encode(m, p).tokens))
  jax.tree.map(close, stack.to_loop_layout(jax.grad(loss(scanned))(stacked)),
               jax.grad(loss(loop))(params))


def test_from_config_and_field_errors():
  config = ml_collections.ConfigDict(dict(
      model=dict(vit.FAMILIES['clip'], patch_size=4, image_size=12, embed_dim=16, depth=1,
                 num_heads=2, out_dim=8),
      efficiency=dict(compute_dtype='float32', param_dtype='float32', remat_policy='none')))
  model = vit.from_config(config.model, config.efficiency)
  assert (model.activation, model.out_dim, model.norm_eps) == ('quick_gelu', 8, 1e-5)
  teacher = vit.from_config(ml_collections.ConfigDict(dict(patch_size=8)), config.efficiency)
  assert teacher.patch_size == 8 and teacher.embed_dim == vit.ViT.embed_dim
  with config.unlocked():
    config.model.num_layers = 3
  with pytest.raises(ValueError, match=r"Unknown ViT field\(s\) \['num_layers'\]"):
    vit.from_config(config.model, config.efficiency)
  images = jax.ShapeDtypeStruct((1, 12, 12, 3), jnp.float32)
  for field, value, message in [('qkv_bias', 'k', 'qkv_bias must be one of'),
                                ('pos_embed', 'rope', 'pos_embed must be one of'),
                                ('num_heads', 3, 'not divisible by num_heads'),
                                ('image_size', 10, 'image_size 10 is not divisible')]:
    with pytest.raises(ValueError, match=message):
      jax.eval_shape(tiny(**{field: value}).init, jax.random.key(0), images)
