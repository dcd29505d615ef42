"""check_reference: the shipped fixture passes; other configs in the same format run the same code.

Only the shipped fixture holds official numbers. The generated fixtures below are written by
capi_jax itself (official names and layouts, NCHW images, flat indices): they show that nothing
in check_reference depends on the shipped fixture's patch size, width, depth, registers, image
shapes, batch or cluster count, and that a wrong number is caught.
"""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from capi_jax import check_reference
from capi_jax.base import schedules
from capi_jax.methods.capi import convert as capi_convert
from capi_jax.methods.capi import heads
from capi_jax.models import encoder_decoder
from capi_jax.reference import capi as capi_parity
from capi_jax.reference import harness


def test_shipped_fixture_passes(fixture_path, capsys):
  assert check_reference.main(['check_reference', str(fixture_path)]) == 0
  out = capsys.readouterr().out
  for quantity in ('fwd/global_repr', 'pretrain/student_predictions', 'clustering/grad_weight',
                   'student_head/grad_weight_g', 'schedule/lr', 'step/1/capi_loss'):
    assert quantity in out
  assert 'FAIL' not in out and 'skipped' not in out and out.rstrip().endswith('PASS')


def _randomise_norm_scales(params, key):
  """Like the official fixture: scales away from 1 so that a wrong mapping shows."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  keys = jax.random.split(key, len(leaves))
  return jax.tree_util.tree_unflatten(treedef, [
      leaf * (1 + 0.3 * jax.random.normal(k, leaf.shape)) if path[-1].key == 'scale' else leaf
      for (path, leaf), k in zip(leaves, keys)])


def make_fixture(official_model: dict, fwd_hw: tuple[int, int], train_hw: tuple[int, int],
                 batch: int, n_visible: int, n_predict: int, num_clusters: int,
                 seed: int = 0) -> dict[str, np.ndarray]:
  """A fixture in the shipped format, numbers computed by capi_jax (not by the release)."""
  schedule = dict(base_value=1e-3, final_value=1e-6, warmup_iters=5, truncate_cos=0.8,
                  total_iters=20)
  meta = {'model': official_model, 'capi': {'student_temp': 0.1, 'target_temp': 0.05,
                                            'pred_temp': 0.1, 'n_sk_iter': 4, 'bias': True},
          'num_clusters': num_clusters, 'schedule_lr': schedule,
          'schedule_momentum': {**schedule, 'start_warmup_value': 1.0, 'base_value': 0.99,
                                'final_value': 1.0}}
  cfg = capi_parity.config_from_meta(meta)
  model = encoder_decoder.from_config(cfg.capi.model, cfg.efficiency)
  keys = iter(jax.random.split(jax.random.key(seed), 16))
  rand = lambda shape, scale=1.0: np.asarray(jax.random.normal(next(keys), shape)) * scale
  out = {'meta_json': np.array(json.dumps(meta))}

  fwd_images = rand((2, 3, *fwd_hw)).astype(np.float32)
  nhwc = lambda x: jnp.asarray(x).transpose(0, 2, 3, 1)
  params = jax.jit(model.init)(next(keys), nhwc(fwd_images))['params']
  params = _randomise_norm_scales(params, next(keys))
  out.update({f'backbone/{k}': v for k, v in capi_convert.backbone_to_official(params).items()})
  variables = {'params': params}
  global_repr, registers, feature_map = jax.jit(model.apply)(variables, nhwc(fwd_images))
  out.update({'fwd/images': fwd_images, 'fwd/global_repr': global_repr,
              'fwd/registers': registers, 'fwd/feature_map': feature_map})

  p = cfg.capi.model.patch_size
  n_tokens = (train_hw[0] // p) * (train_hw[1] // p)
  images = rand((batch, 3, *train_hw)).astype(np.float32)
  rng = np.random.default_rng(seed)
  order = np.stack([rng.permutation(n_tokens) for _ in range(batch)])
  visible = np.sort(order[:, :n_visible], axis=1)
  predict = order[:, n_visible:n_visible + n_predict]
  mask = np.ones((batch, n_tokens), bool)
  np.put_along_axis(mask, visible, False, axis=1)
  offsets = np.arange(batch)[:, None] * n_tokens
  student_patches, predictions = jax.jit(functools.partial(
      model.apply, train=False, method='pretrain'))(variables, nhwc(images), visible, predict)
  teacher = jax.jit(functools.partial(model.apply, method='encode_all'))(variables, nhwc(images))
  dim = cfg.capi.model.embed_dim
  out.update({'pretrain/images': images, 'pretrain/mask': mask,
              'pretrain/visible_indices': (visible + offsets).ravel(),
              'pretrain/predict_indices': (predict + offsets).ravel(),
              'pretrain/student_patches': student_patches,
              'pretrain/student_predictions': np.asarray(predictions).reshape(-1, dim),
              'pretrain/teacher_patches': teacher})

  kw = cfg.capi.clustering_kwargs
  clustering = {'kernel': rand((dim, num_clusters)), 'bias': rand((num_clusters,), 0.1)}
  clustering_input = jnp.swapaxes(teacher, 0, 1)
  (loss, assignments), grads = jax.value_and_grad(functools.partial(
      heads.clustering_targets_and_loss, target_temp=kw.target_temp, pred_temp=kw.pred_temp,
      n_sk_iter=kw.n_sk_iter), has_aux=True)(clustering, clustering_input)
  official = capi_convert.clustering_head_to_official(clustering)
  official_grads = capi_convert.clustering_head_to_official(grads)
  out.update({'clustering/layer.weight': official['layer.weight'],
              'clustering/layer.bias': official['layer.bias'],
              'clustering/input': clustering_input, 'clustering/assignments': assignments,
              'clustering/loss': loss, 'clustering/grad_weight': official_grads['layer.weight'],
              'clustering/grad_bias': official_grads['layer.bias']})

  student = {'kernel_v': rand((dim, num_clusters), 0.02),
             'kernel_g': 1 + rand((1, num_clusters), 0.3)}
  head_input = np.asarray(predictions).reshape(-1, dim)
  targets = jnp.take_along_axis(jnp.swapaxes(assignments, 0, 1), predict[:, :, None], axis=1)
  targets = targets.reshape(-1, num_clusters)

  def student_loss(p):
    logits = heads.L2NormLinear(num_clusters).apply({'params': p}, head_input)
    return heads.capi_loss(logits, targets, cfg.capi.student_temp), logits

  (loss, logits), grads = jax.value_and_grad(student_loss, has_aux=True)(student)
  official = capi_convert.student_head_to_official(student)
  official_grads = capi_convert.student_head_to_official(grads)
  out.update({f'student_head/{k}': v for k, v in official.items()})
  out.update({'student_head/input': head_input, 'student_head/targets': targets,
              'student_head/logits': logits, 'student_head/loss': loss,
              'student_head/grad_weight_v': official_grads['last_layer.weight_v'],
              'student_head/grad_weight_g': official_grads['last_layer.weight_g']})

  for name in ('lr', 'momentum'):
    settings = dict(meta[f'schedule_{name}'])
    total = settings.pop('total_iters')
    values = schedules.warmup_cosine(total_iters=total, **settings)
    out[f'schedule/{name}'] = np.concatenate([values, np.full(3, settings['final_value'])])
  return {k: np.asarray(v) for k, v in out.items()}


SECOND_CONFIG = dict(
    official_model={'patch_size': 8, 'n_registers': 8, 'transformers_kwargs': {
        'embed_dim': 48, 'drop_path_rate': 0.1, 'block_kwargs': {'attn_kwargs': {'num_heads': 3}}},
                    'encoder_kwargs': {'depth': 2}, 'decoder_kwargs': {'depth': 1}},
    fwd_hw=(40, 24), train_hw=(32, 40), batch=3, n_visible=7, n_predict=2, num_clusters=16)

THIRD_CONFIG = dict(
    official_model={'patch_size': 4, 'n_registers': 2, 'register_coordinates': 'zeros',
                    'scale_reg_to_visible': False, 'out_layer': 1,
                    'norm_layer_kwargs': {'eps': 1e-6}, 'transformers_kwargs': {
                        'embed_dim': 32, 'drop_path_rate': 0.0,
                        'block_kwargs': {'attn_kwargs': {'num_heads': 2}}},
                    'encoder_kwargs': {'depth': 2}, 'decoder_kwargs': {'depth': 2}},
    fwd_hw=(8, 20), train_hw=(12, 8), batch=5, n_visible=3, n_predict=1, num_clusters=8)


@pytest.fixture(scope='module')
def second_fixture():
  return make_fixture(**SECOND_CONFIG)


def test_other_configs_run_every_comparison(second_fixture):
  for fixture in (second_fixture, make_fixture(**THIRD_CONFIG, seed=1)):
    report = harness.run(fixture)
    assert report.ok, report.table()
    assert [name for name, _ in report.skipped] == ['two training iterations'], report.table()
    assert len(report.results) == 16, report.table()


def test_config_from_meta_reads_the_official_model_config():
  cfg = capi_parity.config_from_meta({'model': THIRD_CONFIG['official_model']})
  assert (cfg.capi.model.patch_size, cfg.capi.model.n_registers, cfg.capi.model.embed_dim,
          cfg.capi.model.num_heads) == (4, 2, 32, 2)
  m = cfg.capi.model
  assert m.register_coordinates == 'zeros' and not m.scale_reg_to_visible
  assert (cfg.capi.model.out_layer, cfg.capi.model.norm_eps) == (1, 1e-6)
  assert (cfg.capi.model.encoder_depth, cfg.capi.model.decoder_depth) == (2, 2)


@pytest.mark.parametrize('change, message', [
    ({'norm_layer_type': 'LayerNorm'}, 'norm_layer_type'),
    ({'decoder_kwargs': {'depth': 1, 'embed_dim': 16}}, 'same embed_dim'),
    ({'mystery': 3}, 'mystery'),
])
def test_config_from_meta_rejects_what_capi_jax_does_not_implement(change, message):
  with pytest.raises(ValueError, match=message):
    capi_parity.config_from_meta({'model': {**SECOND_CONFIG['official_model'], **change}})


def test_a_wrong_number_fails_with_a_non_zero_exit(second_fixture, tmp_path, capsys):
  broken = dict(second_fixture)
  broken['fwd/feature_map'] = broken['fwd/feature_map'] + 1e-3
  np.savez(tmp_path / 'broken.npz', **broken)
  assert check_reference.main(['check_reference', str(tmp_path / 'broken.npz')]) == 1
  out = capsys.readouterr().out
  row = next(line for line in out.splitlines() if line.startswith('fwd/feature_map'))
  assert row.rstrip().endswith('FAIL')


def test_missing_arrays_skip_with_the_reason(second_fixture):
  partial = {k: v for k, v in second_fixture.items() if not k.startswith(('schedule/', 'fwd/'))}
  report = harness.run(partial)
  skipped = dict(report.skipped)
  assert 'schedule/lr' in skipped['schedules'] and 'fwd/images' in skipped['eval forward']
  assert report.ok and 'skipped: schedules' in report.table()


def test_registered_comparisons_and_skips():
  registry = []
  calls = []

  def register(name):
    def wrap(fn):
      registry.append(harness.Comparison(name, (), fn))
      return fn
    return wrap

  @register('exact')
  def _exact(ctx):
    calls.append(ctx.config.capi.model.patch_size)
    return [harness.compare('x', np.ones(3), np.ones(3), 1e-5)]

  @register('not yet')
  def _not_yet(ctx):
    raise harness.Skipped('needs a module that does not exist yet')

  arrays = {'meta_json': np.array(json.dumps({'model': SECOND_CONFIG['official_model']})),
            'backbone/registers': np.zeros((1, 2, 32))}
  report = harness.run(arrays, comparisons=registry)
  assert calls == [8] and report.ok
  assert report.skipped == [('not yet', 'needs a module that does not exist yet')]


def test_flat_indices_must_be_grouped_by_image():
  np.testing.assert_array_equal(
      capi_parity.per_image_indices(np.array([1, 3, 4, 7]), 2, 4), [[1, 3], [0, 3]])
  with pytest.raises(ValueError, match='grouped by image'):
    capi_parity.per_image_indices(np.array([4, 1, 3, 7]), 2, 4)


def test_tolerance_is_relative_for_large_values():
  assert harness.compare('big', [1000.005], [1000.0], 1e-5).ok
  assert not harness.compare('small', [0.5 + 2e-5], [0.5], 1e-5).ok
  assert not harness.compare('nan', [np.nan], [0.5], 1e-5).ok


def test_a_fixture_with_nothing_comparable_fails(second_fixture, tmp_path, capsys):
  weights_only = {k: v for k, v in second_fixture.items()
                  if k.startswith('backbone/') or k == 'meta_json'}
  report = harness.run(weights_only)
  assert not report.results and not report.ok and len(report.skipped) == 6
  np.savez(tmp_path / 'weights.npz', **weights_only)
  assert check_reference.main(['check_reference', str(tmp_path / 'weights.npz')]) == 1
  assert 'FAIL: nothing was compared' in capsys.readouterr().out


def test_unknown_fixture_format_is_refused():
  with pytest.raises(ValueError, match='no known fixture format'):
    harness.run({'meta_json': np.array('{}'), 'something/else': np.zeros(3)})


def test_absolute_tolerance():
  assert harness.compare('a', [1000.005], [1000.0], 1e-2, absolute=True).ok
  assert not harness.compare('a', [1000.005], [1000.0], 1e-3, absolute=True).ok
