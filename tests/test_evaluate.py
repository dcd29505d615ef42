"""The evaluation driver: config checks, the schedule, every protocol end to end on folder
datasets, the random-init baseline, and loading encoders (training runs, converted and official
checkpoints)."""

import dataclasses
import json
import pathlib
from typing import ClassVar

import jax
import ml_collections
import numpy as np
from PIL import Image
import pytest

from capi_jax import evaluate
from capi_jax import evaluators
from capi_jax.base import sharding
from capi_jax.engine import evaluation
from capi_jax.engine import train
from capi_jax.evaluators import protocol
from capi_jax.methods.capi import convert as capi_convert
from capi_jax.weights import files
from configs import tiny
from configs import vitl


def _set(dataset: str, split: str) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(dataset=dataset, split=split))


def _config(data: pathlib.Path | None = None) -> ml_collections.ConfigDict:
  c = tiny.get_config()
  c.data.image_size = 16
  c.data.num_workers = 0
  c.capi.model.patch_size = 4
  c.capi.model.n_registers = 4
  c.capi.model.embed_dim = 32
  c.capi.model.num_heads = 2
  c.capi.model.encoder_depth = 1
  c.capi.model.decoder_depth = 1
  c.capi.num_clusters = 16
  c.evals.batch_size = 16
  cl = c.evals.classif
  cl.learning_rates, cl.weight_decays = (1e-3, 1e-1), (5e-2,)
  cl.n_iters, cl.warmup_iters, cl.batch_size, cl.resolution, cl.num_classes = 6, 2, 16, 16, 0
  sg = c.evals.seg
  sg.resolution, sg.knn_neighbours, sg.logreg_C = 16, (1, 3), (0.1, 10.0)
  c.evals.viz.resolutions, c.evals.viz.num_images = (16,), 4
  c.evals.knn.ks, c.evals.knn.resolution = (1, 3), 16
  if data is not None:
    cl.train, cl.tests = _set(f'folder:{data / "cls"}', 'train'), ml_collections.ConfigDict(
        {'stripes': _set(f'folder:{data / "cls"}', 'test')})
    c.evals.knn.train, c.evals.knn.test = cl.train, cl.tests.stripes
    sg.dataset, sg.train_split, sg.test_split = f'folder:{data / "seg"}', 'training', 'validation'
    c.evals.viz.dataset, c.evals.viz.split = sg.dataset, 'validation'
  return c


def _stripes(horizontal: bool, rng: np.random.Generator) -> np.ndarray:
  """A 20x20 RGB image of stripes, the class being their orientation, with random phase."""
  line = ((np.arange(20) + rng.integers(4)) // 2 % 2) * 200 + rng.integers(0, 40, 20)
  image = np.repeat(line[:, None] if horizontal else line[None, :], 20, 1 if horizontal else 0)
  return np.repeat(image[..., None], 3, -1).astype(np.uint8)


@pytest.fixture(scope='module')
def data(tmp_path_factory) -> pathlib.Path:
  """cls/{train,test}/{horizontal,vertical}/*.png and an ADE20K-layout seg/ folder."""
  root = tmp_path_factory.mktemp('data')
  rng = np.random.default_rng(0)
  for split, n in (('train', 24), ('test', 10)):
    for name in ('horizontal', 'vertical'):
      (root / 'cls' / split / name).mkdir(parents=True)
      for i in range(n):
        Image.fromarray(_stripes(name == 'horizontal', rng)).save(
            root / 'cls' / split / name / f'{i}.png')
  for split, n in (('training', 12), ('validation', 6)):
    (root / 'seg' / 'images' / split).mkdir(parents=True)
    (root / 'seg' / 'annotations' / split).mkdir(parents=True)
    for i in range(n):
      # Left half horizontal stripes (class 1), right half vertical (class 2), a void band.
      image = np.concatenate([_stripes(True, rng)[:, :10], _stripes(False, rng)[:, 10:]], 1)
      mask = np.zeros((20, 20), np.uint8)
      mask[:, :10], mask[:, 10:], mask[:2] = 1, 2, 255
      Image.fromarray(image).save(root / 'seg' / 'images' / split / f'{i}.png')
      Image.fromarray(mask).save(root / 'seg' / 'annotations' / split / f'{i}.png')
  return root


def _evals_problems(config: ml_collections.ConfigDict) -> list[str]:
  return evaluators.config_problems(config.evals, evaluation.model_shape(config))


def test_shipped_configs_pass_and_bad_values_are_named():
  assert _evals_problems(tiny.get_config()) == []
  assert _evals_problems(vitl.get_config()) == []
  c = tiny.get_config()
  c.evals.protocols = ('seg', 'segmentation')
  c.evals.seg.knn_distances = ('cosine', 'l1')
  c.evals.seg.resolution = 30
  c.evals.seg.extra_key = 1
  problems = _evals_problems(c)
  assert len(problems) == 4, problems
  for needle in ("'segmentation'", 'knn_distances', 'seg.resolution=30', "['extra_key']"):
    assert any(needle in p for p in problems), (needle, problems)
  c.evals.seg.knn_neighbours = None  # Any value: sentences, never an exception.
  assert any('knn_neighbours=None' in p for p in _evals_problems(c))


def test_checks_read_the_evaluated_model():
  """Patch size and width come from the method's evaluation model, not from a config section."""
  assert evaluation.model_shape(tiny.get_config()) == protocol.ModelShape(4, 96)
  c = tiny.get_config()
  c.evals.classif.resolution = 30
  assert evaluators.config_problems(c.evals, None) == []  # Unknown model: only whole numbers.
  found = evaluators.config_problems(c.evals, protocol.ModelShape(patch_size=4, embed_dim=96))
  assert found == ['evals.classif.resolution=30 must be a positive multiple of '
                   'model.patch_size=4.'], found
  found = evaluators.config_problems(vitl.get_config().evals, protocol.ModelShape(14, 1000))
  assert len(found) == 1 and 'model.embed_dim divisible by 64' in found[0], found


def test_a_registered_protocol_plugs_in_without_touching_the_registry(tmp_path):
  @dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
  class Count(protocol.Protocol):
    name: ClassVar[str] = 'count_test'
    official: ClassVar[bool] = False
    images: int

    def check(self, p, key, model):
      p.number(f'{key}.images', self.images, 1, integer=True)

    def run(self, backbone, env, out_dir, log):
      return {'images': float(self.images)}, {}

  evaluators.register(Count)
  c = tiny.get_config()
  assert _evals_problems(c) == []  # Its section is needed only when it is listed.
  c.evals.protocols = ('count_test',)
  assert _evals_problems(c) == ["evals lacks ['count_test'] (see configs/vitl.py)."]
  c.evals.count_test = ml_collections.ConfigDict(dict(period=0, images=0))
  assert _evals_problems(c) == ['evals.count_test.images=0 must be an integer >= 1.']
  c.evals.count_test.images = 3
  assert _evals_problems(c) == []
  flat = evaluation.flatten({'count_test': {'results': evaluators.from_config(
      c.evals, 'count_test').run(None, protocol.Environment(), tmp_path, print)[0]}})
  assert flat == {'extra/count_test/images': 3.0}


def test_official_schedule():
  c = vitl.get_config()
  assert evaluators.due(c, 10_000) == ('seg', 'viz')
  assert evaluators.due(c, 20_000) == ('classif', 'seg', 'viz')
  assert evaluators.due(c, 5_000) == ()


def test_run_evals_end_to_end(data, tmp_path, capsys):
  config = _config(data)
  config.evals.random_init_baseline = True
  # One device: the protocols' sharding is tested on 8 in test_seg.py / test_classif.py.
  mesh = sharding.make_mesh(config, jax.devices()[:1])
  params = evaluation.random_init_params(config, mesh)
  flat = evaluation.run_evals(config, params, 7, tmp_path, mesh=mesh)
  table = capsys.readouterr().out
  assert 'random_init' in table and 'seg/labels_knn_mIoU' in table
  saved = json.loads((tmp_path / 'eval' / '7' / 'results.json').read_text())
  assert saved['step'] == 7 and set(saved['protocols']) == {'classif', 'seg', 'viz', 'knn'}
  for key in ('classif/cls_stripes_acc', 'classif/avg_patch_stripes_acc',
              'classif/cls_avg_patch_stripes_acc', 'seg/labels_knn_mIoU', 'seg/labels_knn_acc',
              'seg/labels_logreg_mIoU', 'seg/hparam_fitting.logreg.mIoU_C=10.0_max_iter=1000_'
              'tol=1e-12_linesearch_max_iter=50_lbfgs_hessian_rank=5',
              'extra/knn/global/k1', 'extra/knn/pixels/k3'):
    assert 0 <= flat[key] <= 1, key
  assert flat['extra/knn/pixels/k1'] > 0.9  # Stripe orientation is a pixel-level fact.
  pictures = sorted(p.name for p in (tmp_path / 'eval' / '7' / 'viz_16').iterdir())
  assert '0000000_pca_sep.png' in pictures and '0000005_pca_jointall_flips_7.png' in pictures
  # The baseline was evaluated once (the same weights here, so the same numbers) and is reused.
  baseline_file = tmp_path / 'eval' / 'random_init' / 'results.json'
  mtime = baseline_file.stat().st_mtime_ns
  baseline = evaluation.random_init_results(config, tmp_path, mesh)
  assert baseline_file.stat().st_mtime_ns == mtime
  assert evaluation.flatten(baseline) == flat


def test_format_table_names_extras_last():
  results = {'knn': {'results': {'global/k10': 0.5}},
             'seg': {'results': {'labels_knn_mIoU': 0.25}}}
  baseline = {'seg': {'results': {'labels_knn_mIoU': 0.125}}}
  lines = evaluation.format_table(results, baseline).splitlines()
  assert 'random_init' in lines[0]
  assert lines[1].split() == ['seg/labels_knn_mIoU', '25.00', '12.50']
  assert lines[2].split() == ['extra/knn/global/k10', '50.00', '-']


def test_load_params_random_converted_and_official(tmp_path):
  config = _config()
  mesh = sharding.make_mesh(config)
  params, name, _ = evaluate.load_params(config, tmp_path, '', 'random', 'ema', mesh)
  assert name == 'random_init'
  files.save_params({'backbone': params}, tmp_path / 'out')
  restored, name, _ = evaluate.load_params(config, tmp_path, str(tmp_path / 'out'), '', 'ema',
                                           mesh)
  assert name == 'converted'
  jax.tree.map(np.testing.assert_array_equal, restored, jax.device_get(params))
  capi_convert.export_official({'backbone': jax.device_get(params)}, tmp_path / 'capi_tiny.npz')
  official, name, _ = evaluate.load_params(config, tmp_path, str(tmp_path / 'capi_tiny.npz'), '',
                                        'ema', mesh)
  assert name == 'capi_tiny'
  jax.tree.map(np.testing.assert_array_equal, official, jax.device_get(params))
  with pytest.raises(FileNotFoundError, match='No checkpoint'):
    evaluate.load_params(config, tmp_path, '', '', 'ema', mesh)
  with pytest.raises(FileNotFoundError, match='not a directory'):
    evaluate.load_params(config, tmp_path, str(tmp_path / 'missing'), '', 'ema', mesh)
  with pytest.raises(FileNotFoundError, match='official checkpoint file'):
    evaluate.load_params(config, tmp_path, str(tmp_path / 'missing.pth'), '', 'ema', mesh)


def test_load_params_from_a_training_checkpoint(data, tmp_path):
  config = _config(data)
  config.data.dataset = f'folder:{data / "cls"}'
  config.train.total_iters = 2
  for schedule in (config.capi.optim.lr_schedule, config.capi.optim.momentum_schedule,
                   config.capi.clustering_optimizer.lr_schedule):
    schedule.warmup_iters = 1
  config.train.global_batch_size = 16
  config.evals.final = False
  state = train.train_and_evaluate(config, tmp_path)
  mesh = sharding.make_mesh(config)
  for which, want in (('ema', state.buffers['ema']), ('student', state.params)):
    params, step, _ = evaluate.load_params(config, tmp_path, '', '', which, mesh)
    assert step == 2
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(params),
                 jax.device_get(want['backbone']))
  params, step, _ = evaluate.load_params(config, tmp_path, str(tmp_path / 'checkpoints' / '2'), '',
                                      'ema', mesh)
  assert step == 2
