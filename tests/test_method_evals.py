"""MIM-Refiner's and CAE v2's evaluation protocols: the official-code fixtures pass
check_reference, the pieces behave as the releases', and every protocol runs end to end on a
small ViT (each image of the test set scored exactly once).

The second fixture variants (other sizes everywhere, made by the same generators with `--variant
second`) ship beside the first ones and pass too.
"""

import pathlib

import jax
import ml_collections
import numpy as np
import pytest

from capi_jax import check_reference
from capi_jax import evaluators
from capi_jax.engine import evaluation
from capi_jax.evaluators import backbone as backbone_lib
from capi_jax.evaluators import block_features
from capi_jax.evaluators import caev2_linear
from capi_jax.evaluators import datasets
from capi_jax.evaluators import mimref
from capi_jax.evaluators import mimref_probe
from capi_jax.evaluators import protocol
from capi_jax.models import vit
from capi_jax.reference import harness
from configs.mim_refiner import d2v2_h14

FIXTURES = pathlib.Path(__file__).parent / 'fixtures'
FIXTURE = FIXTURES / 'mim_refiner_eval' / 'mimref_eval_small.npz'
CAEV2_FIXTURE = FIXTURES / 'caev2_eval' / 'caev2_eval_small.npz'


def test_shipped_fixture_passes(capsys):
  assert check_reference.main(['check_reference', str(FIXTURE)]) == 0
  out = capsys.readouterr().out
  for quantity in ('features/cls_last4/test', 'knn/avg_last/pred', 'lowshot/5pc_s3/cls_last/w',
                   'kmeans/cls_last4/k7/assign', 'kmeans/metric_cases/2',
                   'probe/schedule/peak2/total1000', 'probe/f32/final[concat_last4].weight',
                   'probe/f64/test_logits'):
    assert quantity in out
  assert 'FAIL' not in out and 'skipped' not in out and out.rstrip().endswith('PASS')


def test_shipped_caev2_fixture_passes(capsys):
  assert check_reference.main(['check_reference', str(CAEV2_FIXTURE)]) == 0
  out = capsys.readouterr().out
  for quantity in ('lp/f32/features[step 0]', 'lp/inputs_step0 (crop, resize, flip, normalise)',
                   'lp/val_inputs', 'lp/f32/lr', 'lp/f64/head_weight_steps',
                   'lp/f32/final/head.0.running_var', 'lp/f64/val predictions',
                   'ft/lr_schedule', 'param_groups lr_scale', 'relative_position_index',
                   'ft/soft_targets', 'randaug level_args', 'erased box replayed',
                   'ft/f32/loss', 'ft/f64/final/*', 'ft/f32/val predictions'):
    assert quantity in out
  assert 'FAIL' not in out and 'skipped' not in out and out.rstrip().endswith('PASS')


@pytest.mark.parametrize('name, kind', [('mim_refiner_eval/mimref_eval_second.npz',
                                         'mim_refiner_eval'),
                                        ('caev2_eval/caev2_eval_second.npz', 'caev2_eval')])
def test_second_variants_pass(name, kind):
  report = harness.run(harness.load_fixture(str(FIXTURES / name)))
  assert report.kind == kind and report.ok, report.table()
  assert not report.skipped


def test_a_wrong_neighbour_vote_fails():
  arrays = harness.load_fixture(str(FIXTURE))
  arrays['knn/cls_last4/pred'] = arrays['knn/cls_last4/pred'].copy()
  arrays['knn/cls_last4/pred'][2, 3] += 1
  suite = harness.suite('mim_refiner_eval')
  report = harness.run(arrays, comparisons=[c for c in suite.comparisons if c.name == 'k-NN'])
  assert [r.quantity for r in report.results if not r.ok] == ['knn/cls_last4/pred']


# ------------------------------------------------------------------------------------- pieces


def test_feature_names_and_block_order():
  assert block_features.parse('cls_last4') == block_features.Feature('cls_last4', 'cls', 4)
  assert block_features.parse('concat_main').last == 0
  for bad in ('cls', 'max_last1', 'cls_last0', 'avg_first2'):
    with pytest.raises(ValueError, match='pooling'):
      block_features.parse(bad)
  # (B, n blocks, T, D): the concatenation keeps the blocks' order on channels, so a class token
  # of the last 2 blocks is [block L-2, block L-1] and 'concat' is [cls..., mean patch...].
  blocks = np.arange(12, dtype=np.float32).reshape(1, 2, 3, 2)
  tokens = block_features.concat_blocks(blocks)
  np.testing.assert_array_equal(block_features.pool(tokens, 'cls', 1), [[0, 1, 6, 7]])
  np.testing.assert_array_equal(block_features.pool(tokens, 'concat', 1),
                                [[0, 1, 6, 7, 3, 4, 9, 10]])


def test_knn_drops_large_ks_and_votes_by_temperature():
  assert mimref.knn_grid((1, 5, 50), (0.07, 1.0), 20) == [(1, 0.07), (1, 1.0), (5, 0.07),
                                                          (5, 1.0)]
  mesh = harness.one_device_mesh()
  # Query 0 has one very close neighbour of class 1 and two farther ones of class 0: a sharp
  # temperature follows the closest, a flat one the majority.
  train = np.asarray([[1.0, 0.0], [0.6, 0.8], [0.6, -0.8]], np.float32)
  pred = mimref.knn_predict(train, np.asarray([1, 0, 0]), np.asarray([[1.0, 0.05]], np.float32),
                            (3,), (0.01, 100.0), 2, mesh)
  np.testing.assert_array_equal(pred, [[1], [0]])


def test_lowshot_fit_reaches_the_optimum_and_averages_splits():
  rng = np.random.default_rng(0)
  x = mimref.lowshot_preprocess(rng.normal(size=(12, 7)) + 3.0)
  np.testing.assert_allclose(x.mean(1), 0, atol=1e-12)
  np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1)
  y = np.arange(12) % 3 + 4  # Classes 4, 5, 6: columns for the classes present only.
  fit = mimref.fit_logreg(x, y, 0.00025 / 12)
  assert fit.w.shape == (7, 3) and fit.gap <= 1e-10
  assert set(fit.predict(x)) <= {4, 5, 6}
  means = mimref.split_means({'1pc_s1/f': 0.2, '1pc_s2/f': 0.4, '2pc_s1/f': 0.5,
                              '2pc_s2/f': 0.7, 'x/f': 1.0})
  assert means == pytest.approx({'1pc/f': 0.3, '2pc/f': 0.6})


def test_subsets_drawn_per_class_and_msn_file_names(tmp_path):
  labels = np.arange(40) % 4
  subsets = mimref.draw_subsets(labels, (1, 3), 2, seed=0)
  assert sorted(subsets) == ['1pc_s1', '1pc_s2', '3pc_s1', '3pc_s2']
  for name, positions in subsets.items():
    counts = np.bincount(labels[positions], minlength=4)
    assert (counts == int(name[0])).all()
  assert mimref.msn_subset_file('/m', 5, 3).as_posix() == '/m/imagenet_subsets3/3imgs_class.txt'
  assert mimref.msn_subset_file('/m', 2, 1).as_posix() == '/m/imagenet_subsets1/2imgs_class.txt'

  class Folder:
    paths = ['/d/a/n1_7.JPEG', '/d/a/n1_9.JPEG', '/d/b/n2_3.JPEG']

    def __len__(self):
      return 3

  listed = tmp_path / 'list.txt'
  listed.write_text('n2_3.JPEG\nn1_7.JPEG\n')
  np.testing.assert_array_equal(mimref.read_subset(listed, Folder()), [0, 2])
  listed.write_text('2\n1\n')
  np.testing.assert_array_equal(mimref.read_subset(listed, Folder()), [1, 2])
  listed.write_text('n9_9.JPEG\n')
  with pytest.raises(ValueError, match='not in the training folder'):
    mimref.read_subset(listed, Folder())


def test_cluster_metrics_edge_cases():
  y = np.asarray([0, 0, 1, 1, 2, 2])
  perfect = mimref.cluster_metrics(y, np.asarray([5, 5, 3, 3, 9, 9]))
  assert perfect == pytest.approx({'acc': 1.0, 'nmi': 1.0, 'ami': 1.0, 'ari': 1.0})
  one = mimref.cluster_metrics(y, np.zeros(6, int))
  assert one['acc'] == pytest.approx(1 / 3) and one['nmi'] == 0.0 and one['ari'] == 0.0


def test_kmeans_plusplus_and_lloyd_find_separated_clusters():
  rng = np.random.default_rng(1)
  centres = np.asarray([[0, 0], [10, 0], [0, 10]], float)
  x = np.concatenate([c + rng.normal(size=(20, 2)) for c in centres])
  _, assign, _ = mimref.lloyd(x, mimref.kmeans_plusplus(x, 3, seed=0))
  assert mimref.cluster_metrics(np.repeat(np.arange(3), 20), assign)['acc'] == 1.0


def test_probe_schedule_edges():
  # Fewer than 11 updates: no warm-up (int(0.1 (T - 1)) = 0); the cosine never reaches 1e-6.
  s = mimref_probe.schedule(10, 2.0)
  assert s[0] == 2.0 and s[-1] > 1e-6 and np.all(np.diff(s) < 0)
  s = mimref_probe.schedule(21, 1.0)
  np.testing.assert_allclose(s[:3], [1 / 3, 2 / 3, 1.0])
  assert [h[0] for h in mimref_probe.Grid((1e-4, 0.5), ('cls', 'concat'), (1, 4), 3, 1.0).heads
          ][:5] == ['lr00001_cls_last1', 'lr00001_cls_last4', 'lr00001_concat_last1',
                    'lr00001_concat_last4', 'lr05_cls_last1']


def test_bad_sections_are_named():
  section = lambda **kw: ml_collections.ConfigDict(kw)
  image_set = section(dataset='synthetic', split='train')
  found = evaluators.get('mimref_knn').problems(section(
      period=0, train=image_set, test=image_set, features=('cls_last1', 'pooled'), ks=(0,),
      taus=(0.07,), resolution=30), protocol.ModelShape(patch_size=4, embed_dim=8))
  assert any("features=('cls_last1', 'pooled')" in f for f in found)
  assert any('ks=(0,)' in f for f in found) and any('resolution=30' in f for f in found)
  found = evaluators.get('mimref_lowshot').problems(section(
      period=0, train=image_set, test=image_set, subsets_dir='/nonexistent', shots=(1,),
      splits=1, features=('cls_last1',), resolution=8, tol=1e-3, max_iter=10), None)
  assert any('imagenet_subsets1/1imgs_class.txt' in f for f in found)


def test_caev2_crop_box_is_one_tf_style_draw():
  # Whole area at ratio 1: the whole image; boxes are clipped, never redrawn.
  assert caev2_linear.crop_box(30, 40, 1.0, 0.5, 0.0, 0.0) == (0, 0, 30, 35)
  assert caev2_linear.crop_box(30, 40, 1.0, 0.999, 0.9, 0.9) == (0, 0, 30, 40)
  rng = np.random.default_rng(0)
  for _ in range(200):
    h, w = rng.integers(5, 60, 2)
    top, left, ch, cw = caev2_linear.crop_box(int(h), int(w), *rng.random(4))
    assert 0 <= top <= h - ch and 0 <= left <= w - cw and 0 < ch <= h and 0 < cw <= w


def test_caev2_schedule_and_lars():
  lrs = caev2_linear.schedule(0.4, 2, 4, 2)  # Fractional epochs 0, 0.5, ..., 3.5.
  np.testing.assert_allclose(lrs[:4], [0.0, 0.1, 0.2, 0.3])
  np.testing.assert_allclose(lrs[4:], 0.2 * (1 + np.cos(np.pi * np.asarray([0, 1, 2, 3]) / 4)))
  params = {'kernel': jax.numpy.full((2, 3), 2.0), 'bias': jax.numpy.ones((3,))}
  grads = {'kernel': jax.numpy.full((2, 3), 4.0), 'bias': jax.numpy.full((3,), 0.5)}
  mu = jax.tree.map(jax.numpy.zeros_like, params)
  new, mu = caev2_linear.lars(params, grads, mu, 1.0)
  # The weight moves by 0.001 ||p|| / ||g|| g; the bias by its plain gradient.
  np.testing.assert_allclose(new['kernel'], 2.0 - 0.001 * 2.0, rtol=1e-6)
  np.testing.assert_allclose(new['bias'], 0.5)
  zero = {'kernel': jax.numpy.zeros((2, 3)), 'bias': jax.numpy.zeros((3,))}
  same, _ = caev2_linear.lars(params, zero, jax.tree.map(jax.numpy.zeros_like, params), 1.0)
  np.testing.assert_allclose(same['kernel'], 2.0)


def test_headline_is_printed_beside_our_numbers():
  flat = {'mimref_probe/max': 0.7173, 'mimref_knn/k10_tau0.07/cls_last1': 0.7}
  text = evaluation.format_headline(flat, {'mimref_probe/max': '84.7% (paper)',
                                           'caev2_linear/max': 'not run here'})
  assert text.splitlines() == ['Beside the papers:',
                               'mimref_probe/max   71.73  | paper: 84.7% (paper)']
  assert evaluation.format_headline(flat, None) == ''
  config = d2v2_h14.get_config('3')
  assert evaluators.config_problems(config.evals, None) == []
  config.evals.headline = ml_collections.ConfigDict({'mimref_probe/max': 84.7})
  assert any('evals.headline' in p for p in evaluators.config_problems(config.evals, None))


# ----------------------------------------------------------------------------------- end to end


class _Images:
  """n tiny RGB images of 3 classes (class-coloured, with noise)."""
  num_classes = 3

  def __init__(self, n: int, seed: int):
    self.n, self.seed = n, seed

  def __len__(self) -> int:
    return self.n

  def __getitem__(self, i: int) -> dict:
    rng = np.random.default_rng(self.seed * 1000 + i)
    pixels = rng.integers(0, 60, (8, 8, 3)).astype(np.uint8)
    pixels[..., i % 3] += 150
    return {'image': pixels, 'label': i % 3, 'name': f'images[{i}]'}


@pytest.fixture(scope='module')
def vit_backbone() -> backbone_lib.Backbone:
  model = vit.ViT(**vit.FAMILIES['kappamodules'], patch_size=4, image_size=8, embed_dim=16,
                  depth=3, num_heads=2)
  params = model.init(jax.random.key(0), np.zeros((1, 8, 8, 3), np.float32))['params']
  return backbone_lib.Backbone.from_module(model, params, harness.one_device_mesh(), (), 8)


def test_every_protocol_runs_end_to_end(vit_backbone, monkeypatch, tmp_path):
  sets = {'train': _Images(30, 0), 'test': _Images(13, 1)}
  monkeypatch.setattr(datasets, 'classif_set',
                      lambda name, spec, data_dir='': datasets.ClassifSet(name, sets[spec.split]))
  image_set = lambda split: ml_collections.ConfigDict(dict(dataset='synthetic', split=split))
  env, log = protocol.Environment(), lambda _: None
  knn = mimref.Knn(period=0, train=image_set('train'), test=image_set('test'),
                   features=('cls_last1', 'avg_last1', 'cls_last2'), ks=(1, 10, 99),
                   taus=(0.07,), resolution=8)
  results, details = knn.run(vit_backbone, env, tmp_path, log)
  assert details == {'n_train': 30, 'n_test': 13}  # Every image once; k 99 > 30 dropped.
  assert sorted(results) == sorted(f'k{k}_tau0.07/{f}' for k in (1, 10)
                                   for f in ('cls_last1', 'avg_last1', 'cls_last2'))
  lowshot = mimref.Lowshot(period=0, train=image_set('train'), test=image_set('test'),
                           subsets_dir='', shots=(1, 2), splits=2, features=('cls_last1',),
                           resolution=8, tol=1e-8, max_iter=1000)
  results, details = lowshot.run(vit_backbone, env, tmp_path, log)
  assert {'1pc_s1/cls_last1', '2pc_s2/cls_last1', '1pc/cls_last1', '2pc/cls_last1'} <= set(results)
  assert not details['subsets_given']
  cluster = mimref.Cluster(period=0, test=image_set('test'), features=('cls_last3',), k=0,
                           resolution=8, max_iter=50)
  results, _ = cluster.run(vit_backbone, env, tmp_path, log)
  assert set(results) == {'cls_last3/acc', 'cls_last3/nmi', 'cls_last3/ami', 'cls_last3/ari'}
  probe = mimref_probe.Probe(period=0, train=image_set('train'), test=image_set('test'),
                             num_classes=0, learning_rates=(0.01, 0.5), poolings=('cls', 'concat'),
                             last_blocks=(1, 2), epochs=2, batch_size=8, resolution=8,
                             log_every=1)
  results, details = probe.run(vit_backbone, env, tmp_path, log)
  assert set(results) == {'max', 'max/cls', 'max/concat', 'max/last1', 'max/last2'}
  assert details['updates'] == 2 * (30 // 8) and len(details['accuracy']) == 8
  # Scores are whole test images: multiples of 1/13.
  assert all(abs(a * 13 - round(a * 13)) < 1e-9 for v in details['accuracy'].values() for a in v)
  linear = caev2_linear.Linear(period=0, train=image_set('train'), test=image_set('test'),
                               num_classes=0, blr=0.1, epochs=3, warmup_epochs=1, min_lr=0.0,
                               batch_size=8, resolution=8, log_every=1)
  results, details = linear.run(vit_backbone, env, tmp_path, log)
  assert set(results) == {'max', 'last'} and len(details['accuracy_per_epoch']) == 3
  assert all(abs(a * 13 - round(a * 13)) < 1e-9 for a in details['accuracy_per_epoch'])
