"""Feature extraction, the end-to-end evaluation on folder datasets, and loading encoders."""

import json
import pathlib

import jax
import numpy as np
from PIL import Image
import pytest

from capi_jax import evaluate
from capi_jax import methods
from capi_jax.core import sharding
from configs import tiny


def _config(data: pathlib.Path | None = None):
  c = tiny.get_config()
  c.data.image_size = 16
  c.model.patch_size = 4
  c.model.n_registers = 4
  c.model.embed_dim = 32
  c.model.num_heads = 2
  c.model.encoder_depth = 1
  c.model.decoder_depth = 1
  c.capi.num_clusters = 16
  if data is not None:
    c.evals.dataset = f'folder:{data / "cls"}'
    c.evals.segmentation = f'folder:{data / "seg"}'
  c.evals.train_split = 'train'
  c.evals.test_split = 'test'
  c.evals.max_train_images = 0
  c.evals.batch_size = 16
  c.evals.knn_ks = (1, 3)
  c.evals.probes = ('knn', 'linear', 'attentive')
  c.evals.probe_lrs = (1e-3, 1e-2)
  c.evals.probe_wds = (0.0,)
  c.evals.probe_iters = 30
  c.evals.probe_batch_size = 16
  c.evals.seg_knn_ks = (1, 3)
  c.evals.held_out_fraction = 0.25
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
      # Left half horizontal stripes (class 1), right half vertical (class 2).
      image = np.concatenate([_stripes(True, rng)[:, :10], _stripes(False, rng)[:, 10:]], 1)
      mask = np.zeros((20, 20), np.uint8)
      mask[:, :10], mask[:, 10:] = 1, 2
      Image.fromarray(image).save(root / 'seg' / 'images' / split / f'{i}.png')
      Image.fromarray(mask).save(root / 'seg' / 'annotations' / split / f'{i}.png')
  return root


def test_extractor_rebatches_pads_and_matches_the_model():
  config = _config()
  mesh = sharding.make_mesh(config)
  params = evaluate.random_init_params(config, mesh)
  extract = evaluate.FeatureExtractor(config, params, mesh)
  rng = np.random.default_rng(0)
  images = rng.normal(size=(21, 16, 16, 3)).astype(np.float32)
  labels = np.arange(21)
  batches = [{'images': images[a:b], 'label': labels[a:b]} for a, b in ((0, 7), (7, 12), (12, 21))]
  out = extract(batches, keep_maps=True, keep_pixels=True)
  np.testing.assert_array_equal(out['label'], labels)  # Order kept, padding dropped.
  assert out['feature_map'].shape == (21, 4, 4, 32) and out['pixels'].shape == (21, 16 * 16 * 3)
  model = methods.from_config(config).eval_model()
  global_repr, _, feature_map = model.apply({'params': jax.device_get(params)}, images)
  # Same float32 computation, batched differently: rounding-level differences only.
  np.testing.assert_allclose(out['global_repr'], global_repr, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(out['patch_mean'], feature_map.mean((1, 2)), rtol=1e-4, atol=1e-5)
  assert out['pca_images'].shape == (evaluate.PCA_IMAGES, 16, 16, 3)


def test_run_evals_end_to_end(data, tmp_path, capsys):
  config = _config(data)
  config.evals.random_init_baseline = True
  mesh = sharding.make_mesh(config)
  params = evaluate.random_init_params(config, mesh)
  flat = evaluate.run_evals(config, params, 7, tmp_path, pixel_baseline=True)
  table = capsys.readouterr().out
  assert 'random_init' in table and 'segmentation/knn/miou' in table
  saved = json.loads((tmp_path / 'eval' / '7' / 'results.json').read_text())
  assert saved['step'] == 7
  for key in ('knn/k1', 'knn_patch_mean/k3', 'linear_global/top1', 'linear_patch_mean/top1',
              'linear_concat/top1', 'attentive/top1', 'pixels_knn/k3',
              'segmentation/knn/miou', 'segmentation/linear/pixel_acc'):
    assert 0 <= flat[key] <= 1, key
  # Stripe orientation is a pixel-level fact: the raw-pixel k-NN gets it.
  assert flat['pixels_knn/k1'] > 0.9
  assert saved['segmentation']['knn']['metric'] in ('cosine', 'l2')
  for picture in ('pca.png', 'pca_segmentation.png'):
    assert (tmp_path / 'eval' / '7' / picture).stat().st_size > 1000
  # The baseline was evaluated once (the same weights here, so the same numbers) and is reused.
  baseline_file = tmp_path / 'eval' / 'random_init' / 'results.json'
  mtime = baseline_file.stat().st_mtime_ns
  baseline = evaluate.random_init_results(config, tmp_path, mesh)
  assert baseline_file.stat().st_mtime_ns == mtime
  assert baseline['knn'] == saved['knn'] and 'pixels_knn' in baseline


def test_format_table():
  table = evaluate.format_table(
      {'knn': {'k10': 0.5}, 'linear_global': {'top1': 0.25, 'held_out_top1': 0.3, 'lr': 1e-3}},
      baseline={'knn': {'k10': 0.125}, 'pixels_knn': {'k10': 0.75}})
  lines = table.splitlines()
  assert 'random_init' in lines[0]
  assert lines[1].split() == ['knn/k10', '50.00', '12.50']
  assert lines[2].split() == ['linear_global/top1', '25.00', '-']
  assert lines[3].split() == ['pixels_knn/k10', '-', '75.00']
  assert 'held_out' not in table and 'lr' not in table


def test_segmentation_spec_errors(data):
  config = _config(data)
  config.evals.segmentation = 'ade20k'
  with pytest.raises(ValueError, match='fashion_mnist_scenes'):
    evaluate.segmentation_data(config)


def test_fashion_mnist_scenes_data():
  config = _config()
  config.evals.segmentation = 'fashion_mnist_scenes'
  train_x, train_y, test_x, test_y, num_classes = evaluate.segmentation_data(config)
  side = 16 * evaluate.SCENE_SIZE_FACTOR
  assert train_x.shape == (evaluate.SCENES_TRAIN, side, side, 3) and train_x.dtype == np.float32
  assert test_y.shape == (evaluate.SCENES_TEST, side, side) and num_classes == 11
  assert 0 < (train_y > 0).mean() < 0.8  # Items and background both present.


def test_load_params_random_and_converted(tmp_path):
  from capi_jax import convert  # pylint: disable=g-import-not-at-top
  config = _config()
  mesh = sharding.make_mesh(config)
  params, name = evaluate.load_params(config, tmp_path, '', 'random', 'ema', mesh)
  assert name == 'random_init'
  again = evaluate.random_init_params(config, mesh)
  jax.tree.map(np.testing.assert_array_equal, params, again)  # Deterministic from the seed.
  convert.save_params({'backbone': params}, tmp_path / 'out')
  restored, name = evaluate.load_params(config, tmp_path, str(tmp_path / 'out'), '', 'ema', mesh)
  assert name == 'converted'
  jax.tree.map(np.testing.assert_array_equal, restored, jax.device_get(params))
  with pytest.raises(FileNotFoundError, match='No checkpoint'):
    evaluate.load_params(config, tmp_path, '', '', 'ema', mesh)
  with pytest.raises(FileNotFoundError, match='not a directory'):
    evaluate.load_params(config, tmp_path, str(tmp_path / 'missing'), '', 'ema', mesh)


def test_load_params_from_a_training_checkpoint(data, tmp_path):
  from capi_jax.core import train  # pylint: disable=g-import-not-at-top
  config = _config(data)
  config.data.dataset = f'folder:{data / "cls"}'
  config.optim.total_iters = 2
  for schedule in (config.optim.lr_schedule, config.optim.momentum_schedule,
                   config.capi.clustering_optimizer.lr_schedule):
    schedule.warmup_iters = 1
  config.optim.global_batch_size = 16
  config.evals.final = False
  state = train.train_and_evaluate(config, tmp_path)
  mesh = sharding.make_mesh(config)
  for which, want in (('ema', state.buffers['ema']), ('student', state.params)):
    params, step = evaluate.load_params(config, tmp_path, '', '', which, mesh)
    assert step == 2
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(params),
                 jax.device_get(want['backbone']))
  params, step = evaluate.load_params(config, tmp_path, str(tmp_path / 'checkpoints' / '2'), '',
                                      'ema', mesh)
  assert step == 2
