"""Input pipeline: sources, bad data, determinism, exact resumption, global arrays (evaluation
batches: tests/test_eval_batches.py)."""

import gzip
import io
import itertools
import logging
import pathlib

import grain
import jax
import numpy as np
import pytest
from PIL import Image

from capi_jax import methods
from capi_jax.data import pipeline
from capi_jax.data import sources
from capi_jax.data import transforms
from configs import tiny


def _config(dataset='fashion_mnist', batch=8, num_workers=0, image_size=32, patch_size=4):
  c = tiny.get_config()
  c.data.dataset = dataset
  c.train.global_batch_size = batch
  c.data.num_workers = num_workers
  c.data.prefetch_buffer_size = 2
  c.data.image_size = image_size
  c.capi.model.patch_size = patch_size
  return c


def _loader(config, **kwargs):
  """The training loader with the config's method's transform (CAPI's crops and masks)."""
  return pipeline.create_train_loader(config, methods.from_config(config).train_transform(),
                                      **kwargs)


def _take(iterator, n):
  return list(itertools.islice(iterator, n))


def _assert_same_batches(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def _rgb(h, w, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _encoded(image: Image.Image, fmt: str) -> bytes:
  buf = io.BytesIO()
  image.save(buf, format=fmt)
  return buf.getvalue()


def _write_bad_data_folder(root: pathlib.Path) -> tuple[list[str], list[str]]:
  """An ImageFolder-style tree with odd and broken files: (good names, bad names)."""
  good = {
      'a/rgb.jpg': _encoded(Image.fromarray(_rgb(48, 64)), 'JPEG'),
      'a/rgb.png': _encoded(Image.fromarray(_rgb(40, 30, 1)), 'PNG'),
      'a/rgba.webp': _encoded(Image.fromarray(_rgb(33, 35, 2)).convert('RGBA'), 'WEBP'),
      'a/deeper/grey.png': _encoded(Image.fromarray(_rgb(50, 50, 3)[..., 0]), 'PNG'),
      'b/cmyk.jpg': _encoded(Image.fromarray(_rgb(64, 64, 4)).convert('CMYK'), 'JPEG'),
      'b/rgba.png': _encoded(Image.fromarray(_rgb(20, 60, 5)).convert('RGBA'), 'PNG'),
      'b/sixteen_bit.png': _encoded(
          Image.fromarray((np.arange(40 * 40).reshape(40, 40) * 40).astype(np.uint16)), 'PNG'),
      'b/tiny.png': _encoded(Image.fromarray(_rgb(1, 1, 6)), 'PNG'),
      'b/thin.jpg': _encoded(Image.fromarray(_rgb(3, 90, 7)), 'JPEG'),
      'b/UPPER.JPEG': _encoded(Image.fromarray(_rgb(30, 30, 8)), 'JPEG'),
  }
  palette = Image.fromarray(_rgb(24, 24, 9)).convert('P')
  palette.info['transparency'] = 0
  good['b/palette.png'] = _encoded(palette, 'PNG')
  truncated = _encoded(Image.fromarray(_rgb(64, 64, 10)), 'JPEG')
  bad = {
      'a/truncated.jpg': truncated[:len(truncated) // 2],
      'b/garbage.jpg': np.random.default_rng(11).bytes(500),
      'b/empty.png': b'',
  }
  for name, data in {**good, **bad}.items():
    (root / name).parent.mkdir(parents=True, exist_ok=True)
    (root / name).write_bytes(data)
  (root / 'a' / 'notes.txt').write_text('not an image')
  return sorted(good), sorted(bad)


@pytest.fixture(scope='module')
def bad_folder(tmp_path_factory):
  root = tmp_path_factory.mktemp('bad_data')
  good, bad = _write_bad_data_folder(root)
  return root, good, bad


# --- sources ---------------------------------------------------------------------------------


def test_fashion_mnist_loads_real_images_with_labels():
  train = sources.make_source('fashion_mnist', 'train')
  test = sources.make_source('fashion_mnist', 'test')
  assert (len(train), len(test)) == (60000, 10000)
  assert set(np.unique(test.labels)) == set(range(10))
  example = sources.decode(train[0])
  assert example['image'].mode == 'RGB' and example['image'].size == (28, 28)
  pixels = np.asarray(example['image'])
  assert pixels.std() > 10 and np.array_equal(pixels[..., 0], pixels[..., 2])
  assert example['label'] == 9  # The first training image is an ankle boot.

  batch = next(_loader(_config(batch=32), seed=0, process_index=0,
                                                  process_count=1))
  # Pixels travel as uint8; the method normalises them on the device.
  assert batch['images'].shape == (32, 32, 32, 3) and batch['images'].dtype == np.uint8
  # The method's transform decides the example's keys (CAPI's: the crop and its masks).
  assert set(batch) == {'images', 'visible_indices', 'predict_indices'}
  # Fashion-MNIST: mostly black background, bright garments.
  assert batch['images'].min() == 0 and batch['images'].max() > 200


def test_fashion_mnist_from_a_user_directory(tmp_path):
  for name in ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte'):
    src = pathlib.Path(sources.FASHION_MNIST_DIR) / f'{name}.gz'
    (tmp_path / name).write_bytes(gzip.decompress(src.read_bytes()))  # Raw (not .gz) files.
  source = sources.make_source(f'fashion_mnist:{tmp_path}', 'train')
  assert len(source) == 60000
  with pytest.raises(FileNotFoundError, match='t10k-images-idx3-ubyte'):
    sources.make_source(f'fashion_mnist:{tmp_path}', 'test')


def test_folder_source_labels_and_splits(tmp_path):
  for split, n in (('train', 3), ('val', 2)):
    for cls in ('cat', 'dog'):
      for i in range(n):
        (tmp_path / split / cls).mkdir(parents=True, exist_ok=True)
        Image.fromarray(_rgb(20, 20, i)).save(tmp_path / split / cls / f'{i}.png')
  train = sources.make_source(f'folder:{tmp_path}', 'train')
  val = sources.make_source(f'folder:{tmp_path}', 'val')
  assert (len(train), len(val)) == (6, 4)
  assert train.class_names == ['cat', 'dog'] and train.labels == [0, 0, 0, 1, 1, 1]
  with pytest.raises(FileNotFoundError, match="no sub-folder 'test'"):
    sources.make_source(f'folder:{tmp_path}', 'test')
  # A flat folder is the unlabelled train split.
  flat = sources.make_source(f'folder:{tmp_path / "train" / "cat"}', 'train')
  assert len(flat) == 3 and flat.labels == [-1] * 3 and flat.num_classes == 0


def test_missing_and_empty_datasets_have_clear_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match='No images'):
    sources.make_source(f'folder:{tmp_path}', 'train')
  with pytest.raises(FileNotFoundError, match='does not exist'):
    sources.make_source(f'folder:{tmp_path / "nope"}', 'train')
  with pytest.raises(FileNotFoundError, match='dataset-fashion-mnist'):
    sources.make_source(f'fashion_mnist:{tmp_path}', 'train')
  with pytest.raises(ValueError, match='splits'):
    sources.make_source('fashion_mnist', 'validation')
  with pytest.raises(ValueError, match='Unknown dataset'):
    sources.make_source('imagenet', 'train')
  with pytest.raises(FileNotFoundError, match='array_record'):
    sources.make_source('tfds:mnist', 'train', data_dir=str(tmp_path))
  (tmp_path / 'train-images-idx3-ubyte').write_bytes(b'\x00\x00\x08\x03\x00')
  with pytest.raises(ValueError, match='Cannot read IDX'):
    sources.make_source(f'fashion_mnist:{tmp_path}', 'train')


def test_synthetic_source_is_deterministic():
  source = sources.make_source('synthetic', 'train', image_size=16)
  np.testing.assert_array_equal(source[5]['image'], source[5]['image'])
  assert source[5]['image'].shape == (16, 16, 3)
  assert not np.array_equal(source[5]['image'], source[6]['image'])


# --- TFDS ArrayRecord without TensorFlow -----------------------------------------------------


def _build_tiny_tfds(data_dir: pathlib.Path) -> None:
  """Prepares a 12 + 5 image ArrayRecord TFDS dataset; needs no TensorFlow (PNG bytes in)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  class CapiTestImages(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version('1.0.0')

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          'image': tfds.features.Image(shape=(None, None, 3), encoding_format='png'),
          'label': tfds.features.ClassLabel(num_classes=3)}))

    def _split_generators(self, dl_manager):
      del dl_manager
      return {'train': self._generate_examples(12), 'test': self._generate_examples(5)}

    def _generate_examples(self, n):
      for i in range(n):
        image = Image.fromarray(_rgb(20 + i, 30, i))
        yield i, {'image': io.BytesIO(_encoded(image, 'PNG')), 'label': i % 3}

  CapiTestImages(data_dir=str(data_dir), file_format='array_record').download_and_prepare()


def test_tfds_array_record_source_without_tensorflow(tmp_path):
  with pytest.raises(ImportError):
    import tensorflow  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  _build_tiny_tfds(tmp_path)
  source = sources.make_source('tfds:capi_test_images', 'train', data_dir=str(tmp_path))
  assert len(source) == 12 and source.num_classes == 3
  example = sources.decode(source[0])
  assert example['image'].mode == 'RGB' and example['image'].width == 30

  config = _config('tfds:capi_test_images', batch=8)
  config.data.data_dir = str(tmp_path)
  batch = next(_loader(config, seed=0, process_index=0,
                                                  process_count=1))
  assert batch['images'].shape == (8, 32, 32, 3)
  test = sources.make_source('tfds:capi_test_images', 'test', data_dir=str(tmp_path))
  # Source order with SkipDecoding'd images decoded by us: labels follow the records.
  labels = [sources.decode(test[i])['label'] for i in range(len(test))]
  assert sorted(labels) == [0, 0, 1, 1, 2]


# --- bad data --------------------------------------------------------------------------------


def test_to_rgb_converts_every_mode():
  cases = {
      'L': Image.fromarray(np.full((4, 4), 7, np.uint8)),
      'RGBA': Image.fromarray(np.full((4, 4, 4), 9, np.uint8)),
      'CMYK': Image.new('CMYK', (4, 4), (0, 0, 0, 0)),
      'I;16': Image.fromarray(np.full((4, 4), 65535, np.uint16)),
      '1': Image.new('1', (4, 4), 1),
      'LA': Image.new('LA', (4, 4), (5, 100)),
  }
  expected = {'L': 7, 'RGBA': 9, 'CMYK': 255, 'I;16': 255, '1': 255, 'LA': 5}
  for mode, image in cases.items():
    assert image.mode == mode
    rgb = sources.to_rgb(image)
    assert rgb.mode == 'RGB', mode
    np.testing.assert_array_equal(np.asarray(rgb), expected[mode], err_msg=mode)
  half = Image.fromarray(np.full((2, 2), 32896, np.uint16))  # 128 * 257
  assert np.asarray(sources.to_rgb(half)).max() == 128


def test_corrupt_files_are_skipped_and_reported(bad_folder, caplog):
  root, good, bad = bad_folder
  config = _config(f'folder:{root}', batch=4)
  before = sources.skipped_records()
  source = sources.make_source(f'folder:{root}', 'train')
  with caplog.at_level(logging.WARNING):
    decoded = [sources.decode(source[i]) for i in range(len(source))]
  labels = [d['label'] for d in decoded if d is not None]
  assert len(labels) == len(good)  # Every good file, odd modes and sizes included.
  assert labels == sorted(labels) and set(labels) == {0, 1}
  assert all(d['image'].mode == 'RGB' for d in decoded if d is not None)
  assert sources.skipped_records() - before == len(bad)
  for name in bad:
    assert any(name in r.getMessage() and 'Skipping' in r.getMessage() for r in caplog.records)

  # Training batches stay full: skipped records are replaced by the next ones in the stream.
  iterator = _loader(config, seed=0, process_index=0, process_count=1)
  for batch in _take(iterator, 6):
    assert batch['images'].shape == (4, 32, 32, 3) and batch['images'].dtype == np.uint8


def test_an_unreadable_dataset_stops_with_a_clear_error(tmp_path):
  for i in range(3):
    (tmp_path / f'{i}.jpg').write_bytes(b'not a jpeg')
  iterator = _loader(_config(f'folder:{tmp_path}', batch=2), seed=0,
                                                process_index=0, process_count=1)
  with pytest.raises(ValueError, match='in a row could not be decoded'):
    next(iterator)


# --- augmentation ----------------------------------------------------------------------------


def test_crop_box_follows_torchvision():
  rng = np.random.default_rng(0)
  for height, width in ((100, 100), (50, 200), (1, 1), (7, 3)):
    for _ in range(50):
      top, left, h, w = transforms.sample_crop_box(height, width, (0.6, 1.0), (3 / 4, 4 / 3),
                                                       rng)
      assert 0 < h <= height and 0 < w <= width
      assert 0 <= top <= height - h and 0 <= left <= width - w
  # Impossible aspect ratios fall back to the largest centred crop with ratio 4/3.
  assert transforms.sample_crop_box(10, 400, (0.6, 1.0), (3 / 4, 4 / 3), rng) == (
      0, 193, 10, 13)
  # Areas: uniform in scale * area (up to rounding) when the crop fits.
  areas = [np.prod(transforms.sample_crop_box(200, 200, (0.2, 0.4), (1.0, 1.0), rng)[2:])
           for _ in range(500)]
  assert 0.19 * 40000 < min(areas) and max(areas) < 0.41 * 40000


def test_eval_image_resizes_shorter_side_and_centre_crops():
  image = Image.fromarray(_rgb(60, 120))
  out = transforms.eval_image(image, 224)
  assert out.shape == (224, 224, 3) and out.dtype == np.float32
  white = transforms.eval_image(Image.new('RGB', (10, 30), (255, 255, 255)), 32)
  np.testing.assert_allclose(white, np.broadcast_to(
      (1 - transforms.IMAGENET_MEAN) / transforms.IMAGENET_STD, (32, 32, 3)), rtol=1e-5)


def test_normalize_on_device_matches_the_host():
  # Every pixel value in every channel, in a jitted function as in the train step.
  pixels = np.stack([np.arange(256, dtype=np.uint8)] * 3, axis=-1).reshape(16, 16, 3)
  on_device = np.asarray(jax.jit(transforms.normalize_on_device)(pixels))
  assert on_device.dtype == np.float32
  np.testing.assert_allclose(on_device, transforms.normalize(pixels), rtol=0, atol=1e-6)
  # Other statistics (e.g. CLIP's): (pixel / 255 - mean) / std, to float32 rounding.
  mean, std = np.array([0.48, 0.46, 0.41]), np.array([0.27, 0.26, 0.28])
  np.testing.assert_allclose(transforms.normalize_on_device(pixels, mean, std),
                             (pixels / 255 - mean) / std, rtol=0, atol=1e-6)
  # Anything but uint8 pixels is refused (floats are not silently taken as normalised).
  with pytest.raises(ValueError, match='uint8'):
    transforms.normalize_on_device(transforms.normalize(pixels))
  with pytest.raises(ValueError, match='uint8'):
    transforms.normalize_on_device(pixels.astype(np.int32))


def test_train_batch_masks_follow_the_config():
  config = _config(batch=4, image_size=32, patch_size=4)  # 8x8 grid.
  batch = next(_loader(config, seed=0, process_index=0,
                                                  process_count=1))
  n_masked = int(64 * config.capi.data.mask_ratio)
  n_predict = int(n_masked * config.capi.data.prediction_subsampling)
  assert batch['visible_indices'].shape == (4, 64 - n_masked)
  assert batch['predict_indices'].shape == (4, n_predict)
  assert (np.diff(batch['visible_indices'], axis=1) > 0).all()
  for visible, predict in zip(batch['visible_indices'], batch['predict_indices']):
    assert not set(visible.tolist()) & set(predict.tolist())


# --- determinism and resumption ---------------------------------------------------------------


def test_same_seed_same_batches_different_seed_different():
  config = _config(batch=8)
  make = lambda seed: _loader(config, seed=seed, process_index=0,
                                                         process_count=1)
  a, b, c = _take(make(0), 3), _take(make(0), 3), _take(make(1), 3)
  _assert_same_batches(a, b)
  for k in ('images', 'visible_indices', 'predict_indices'):
    assert not np.array_equal(a[0][k], c[0][k])


def test_hosts_get_different_data():
  config = _config(batch=8)
  host0 = next(_loader(config, seed=0, process_index=0,
                                                  process_count=2))
  host1 = next(_loader(config, seed=0, process_index=1,
                                                  process_count=2))
  assert host0['images'].shape[0] == host1['images'].shape[0] == 4
  assert not np.array_equal(host0['images'], host1['images'])
  assert not np.array_equal(host0['visible_indices'], host1['visible_indices'])


def test_epochs_are_reshuffled(tmp_path):
  for i in range(6):
    Image.fromarray(np.full((8, 8, 3), i * 40, np.uint8)).save(tmp_path / f'{i}.png')
  config = _config(f'folder:{tmp_path}', batch=6)
  config.capi.data.crop_scale = (1.0, 1.0)
  config.capi.data.do_hflip = False
  first, second = _take(_loader(config, seed=0, process_index=0,
                                                           process_count=1), 2)
  order = lambda b: np.argsort(b['images'][:, 0, 0, 0])
  assert sorted(order(first).tolist()) == list(range(6))  # Each epoch: every image once.
  assert not np.array_equal(first['images'][:, 0, 0, 0], second['images'][:, 0, 0, 0])


@pytest.mark.parametrize('num_workers', (0, 2))
def test_resume_reproduces_the_remaining_batches(num_workers, bad_folder):
  # The folder has corrupt files, so the resumed stream must also skip them identically.
  config = _config(f'folder:{bad_folder[0]}', batch=4, num_workers=num_workers)
  make = lambda: _loader(config, seed=3, process_index=0,
                                                    process_count=1)
  uninterrupted = make()
  _take(uninterrupted, 5)
  state = uninterrupted.get_state()
  expected = _take(uninterrupted, 4)
  resumed = make()
  resumed.set_state(state)
  _assert_same_batches(expected, _take(resumed, 4))
  for it in (uninterrupted, resumed):
    if hasattr(it, 'close'):
      it.close()


def test_resume_through_an_orbax_checkpoint(tmp_path):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  config = _config(batch=8)
  make = lambda: _loader(config, seed=0, process_index=0,
                                                    process_count=1)
  iterator = make()
  _take(iterator, 3)
  with ocp.CheckpointManager(
      tmp_path, item_handlers={'data_iter': grain.checkpoint.CheckpointHandler()}) as manager:
    manager.save(3, args=ocp.args.Composite(
        data_iter=grain.checkpoint.CheckpointSave(iterator)))
    manager.wait_until_finished()
  expected = _take(iterator, 3)
  resumed = make()
  with ocp.CheckpointManager(
      tmp_path, item_handlers={'data_iter': grain.checkpoint.CheckpointHandler()}) as manager:
    manager.restore(manager.latest_step(), args=ocp.args.Composite(
        data_iter=grain.checkpoint.CheckpointRestore(resumed)))
  _assert_same_batches(expected, _take(resumed, 3))


# --- global arrays and throughput ------------------------------------------------------------


def test_make_global_batch_shards_the_leading_axis():
  mesh = jax.make_mesh((8,), ('data',), axis_types=(jax.sharding.AxisType.Explicit,))
  batch = next(_loader(_config(batch=16), seed=0, process_index=0,
                                                  process_count=1))
  spec = jax.sharding.PartitionSpec('data')
  arrays = pipeline.make_global_batch(batch, mesh, spec)
  assert arrays.keys() == batch.keys()
  for k, v in arrays.items():
    assert v.shape == batch[k].shape and v.sharding.spec == spec
    assert len(v.addressable_shards) == 8
    np.testing.assert_array_equal(np.asarray(v), batch[k])


def test_measure_throughput_reports_rates():
  config = _config(batch=8)
  result = pipeline.measure_throughput(config, methods.from_config(config).train_transform(),
                                       num_batches=2, warmup_batches=1)
  assert result['images_per_s'] > 0 and result['batch_size'] == 8
  assert result['images_per_s_per_worker'] == result['images_per_s']
  assert result['images_per_cpu_s'] > 0
