"""The segmentation protocol's pieces beyond the fixture: sharding, chunking, two classes, ties,
and the dataset readers on their released folder layouts."""

import jax
import numpy as np
from PIL import Image
import pytest
import scipy.io
import scipy.optimize

from capi_jax.evaluators import seg
from capi_jax.evaluators import seg_data


def _mesh(n_devices: int) -> jax.sharding.Mesh:
  return jax.make_mesh((n_devices,), ('batch',), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=jax.devices()[:n_devices])


def _blobs(n: int, dim: int, classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  rng = np.random.default_rng(seed)
  y = rng.integers(0, classes, n)
  return (rng.normal(size=(classes, dim))[y] * 1.5 + rng.normal(size=(n, dim))).astype(
      np.float32), y


def test_knn_same_on_one_and_eight_devices_and_with_small_chunks():
  x, y = _blobs(300, 12, 4, seed=0)
  queries, _ = _blobs(70, 12, 4, seed=1)
  rows = np.repeat(y[:, None], 4, 1).astype(np.uint8)
  rows[::7, 0] = 255  # Ignore labels vote too.
  for distance in seg.KNN_DISTANCES:
    reference = seg.knn_predict(seg.knn_fit(x, distance=distance, dtype='float32',
                                            mesh=_mesh(1)), rows, queries, (1, 5))
    for mesh, chunk in ((_mesh(8), 65536), (_mesh(1), 16)):
      index = seg.knn_fit(x, distance=distance, dtype='float32', mesh=mesh, key_chunk=chunk)
      preds = seg.knn_predict(index, rows, queries, (1, 5))
      for k in (1, 5):
        np.testing.assert_array_equal(preds[k], reference[k])


def test_knn_vote_takes_the_smallest_of_tied_labels():
  x = np.array([[1, 0], [1, 0.01], [0, 1]], np.float32)
  rows = np.array([[7, 3], [2, 3], [2, 9]], np.uint8)
  index = seg.knn_fit(x, distance='L2', dtype='float32', mesh=_mesh(1))
  preds = seg.knn_predict(index, rows, np.array([[1, 0]], np.float32), (2, 3))
  np.testing.assert_array_equal(preds[2], [[2, 3]])  # 7 vs 2: a tie, the smaller wins.
  np.testing.assert_array_equal(preds[3], [[2, 3]])


def test_row_modes_and_fit_mask():
  rows = np.array([[5, 5, 3, 3], [255, 255, 1, 2], [0, 0, 0, 4]], np.uint8)
  np.testing.assert_array_equal(seg.row_modes(rows), [3, 255, 0])
  np.testing.assert_array_equal(seg.fit_mask(rows, (0, 255)), [True, False, False])


def test_patch_label_rows_layout():
  labels = np.arange(2 * 4 * 6, dtype=np.uint8).reshape(2, 4, 6)
  rows = seg.patch_label_rows(labels, 2)
  assert rows.shape == (2 * 2 * 3, 4)
  np.testing.assert_array_equal(rows[1], [2, 3, 8, 9])  # Image 0, patch row 0, column 1.
  np.testing.assert_array_equal(rows[6], [24, 25, 30, 31])  # Image 1, first patch.


def test_metrics_count_a_predicted_ignore_label_as_a_class():
  gt = np.array([1, 1, 2, 255], np.uint8)
  pred = np.array([1, 255, 2, 2], np.uint8)
  # Pixel 4 is ignored; classes 1 (1/2), 2 (1/1) and the predicted 255 (0/1).
  assert seg.metrics(gt, pred, (255,)) == pytest.approx({'mIoU': (0.5 + 1 + 0) / 3,
                                                         'acc': 2 / 3})


def _scipy_logreg(x, y, C, binary):
  """The official problem in float64 with scipy: C * sum CE + |W|^2 / 2 (bias unpenalised)."""
  classes = np.unique(y)
  yi = np.searchsorted(classes, y)
  outputs = 1 if binary else len(classes)
  dim = x.shape[1]

  def f(theta):
    w, b = theta[:outputs * dim].reshape(outputs, dim), theta[outputs * dim:]
    z = x @ w.T + b
    if binary:
      loss = np.logaddexp(0, z[:, 0]) - yi * z[:, 0]
      dz = (1 / (1 + np.exp(-z[:, 0])) - yi)[:, None]
    else:
      z = z - z.max(1, keepdims=True)
      p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
      loss = -np.log(p[np.arange(len(y)), yi])
      dz = p - np.eye(len(classes))[yi]
    value = C * loss.sum() + (w ** 2).sum() / 2
    grad = np.concatenate([(C * dz.T @ x + w).ravel(), C * dz.sum(0)])
    return value, grad

  theta = scipy.optimize.minimize(f, np.zeros(outputs * (dim + 1)), jac=True, method='L-BFGS-B',
                                  options=dict(maxiter=5000, gtol=1e-10, ftol=1e-15)).x
  return theta[:outputs * dim].reshape(outputs, dim), theta[outputs * dim:]


@pytest.mark.parametrize('classes', [2, 5])
def test_logreg_reaches_the_float64_minimiser_on_eight_devices(classes):
  x, y = _blobs(203, 6, classes, seed=classes)
  y = y * 3 + 1  # Labels that are not 0..n-1.
  for C in (1e-3, 10.0):
    coef, intercept = _scipy_logreg(x.astype(np.float64), y, C, binary=classes == 2)
    if classes > 2:
      intercept = intercept - intercept.mean()
    model = seg.fit_logreg(x, y, C=C, mesh=_mesh(8))
    scale = max(1.0, np.abs(coef).max())
    assert np.abs(model.coef - coef).max() < 1e-4 * scale
    assert np.abs(model.intercept - intercept).max() < 1e-4 * scale
    reference = model.classes[(x @ coef.T + intercept).argmax(1)] if classes > 2 else \
        model.classes[(x @ coef[0] + intercept[0] > 0).astype(int)]
    np.testing.assert_array_equal(model.predict(x), reference)


def test_selection_order_follows_the_official_ranks():
  assert seg.selection_order(5, 1) == [0, 1, 2, 3, 4]
  assert seg.selection_order(10, 8) == [0, 8, 1, 9, 2, 3, 4, 5, 6, 7]


# ---------------------------------------------------------------------------- readers


def _save(path, array):
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(array).save(path)


def _image(rng):
  return rng.integers(0, 255, (12, 16, 3), np.uint8)


def test_ade20k_and_folder_layouts(tmp_path):
  rng = np.random.default_rng(0)
  for name in ('b', 'a'):
    _save(tmp_path / 'ADEChallengeData2016' / 'images' / 'training' / f'{name}.jpg', _image(rng))
    _save(tmp_path / 'ADEChallengeData2016' / 'annotations' / 'training' / f'{name}.png',
          np.full((12, 16), ord(name), np.uint8))
  data = seg_data.make_seg_set(f'ade20k:{tmp_path}', 'training')
  assert len(data) == 2
  image, mask = data[0]
  assert image.mode == 'RGB' and image.size == (16, 12)
  assert np.asarray(mask).max() == ord('a')  # Sorted by file name.
  folder = seg_data.make_seg_set(f'folder:{tmp_path / "ADEChallengeData2016"}', 'training')
  assert folder.mask_paths == data.mask_paths
  with pytest.raises(FileNotFoundError, match='validation'):
    seg_data.make_seg_set(f'ade20k:{tmp_path}', 'validation')
  with pytest.raises(ValueError, match='ade20k:ROOT'):
    seg_data.make_seg_set('ade20k', 'training')


def test_voc2012_trainaug_reads_sbd_mat_masks(tmp_path):
  rng = np.random.default_rng(0)
  voc = tmp_path / 'original' / 'VOCdevkit' / 'VOC2012'
  sbd = tmp_path / 'aug' / 'benchmark_RELEASE' / 'dataset'
  (voc / 'ImageSets' / 'Segmentation').mkdir(parents=True)
  (voc / 'ImageSets' / 'Segmentation' / 'train.txt').write_text('v1\nv2\n')
  (voc / 'ImageSets' / 'Segmentation' / 'val.txt').write_text('v3\n')
  for i in ('v1', 'v2', 'v3'):
    _save(voc / 'JPEGImages' / f'{i}.jpg', _image(rng))
    _save(voc / 'SegmentationClass' / f'{i}.png', np.full((12, 16), 4, np.uint8))
  sbd.mkdir(parents=True)
  (sbd / 'train.txt').write_text('s1\n')
  (sbd / 'val.txt').write_text('s2\n')
  (sbd / 'cls').mkdir()
  for i in ('s1', 's2'):
    _save(sbd / 'img' / f'{i}.jpg', _image(rng))
    segmentation = np.full((12, 16), 7, np.uint8)
    scipy.io.savemat(sbd / 'cls' / f'{i}.mat',
                     {'GTcls': {'Segmentation': segmentation, 'Boundaries': [], 'CategoriesPresent': 7}})
  assert len(seg_data.make_seg_set(f'voc2012:{tmp_path}', 'train')) == 2
  assert len(seg_data.make_seg_set(f'voc2012:{tmp_path}', 'val')) == 1
  trainaug = seg_data.make_seg_set(f'voc2012:{tmp_path}', 'trainaug')
  assert len(trainaug) == 4
  _, mask = trainaug[3]
  assert np.asarray(mask).shape == (12, 16) and (np.asarray(mask) == 7).all()


def test_cityscapes_maps_label_ids_to_train_ids(tmp_path):
  rng = np.random.default_rng(0)
  _save(tmp_path / 'leftImg8bit' / 'val' / 'lindau' / 'lindau_000000_000019_leftImg8bit.png',
        _image(rng))
  ids = np.array([[7, 26, 0, 33]], np.uint8).repeat(12, 0).repeat(4, 1)
  _save(tmp_path / 'gtFine' / 'val' / 'lindau' / 'lindau_000000_000019_gtFine_labelIds.png', ids)
  _, mask = seg_data.make_seg_set(f'cityscapes:{tmp_path}', 'val')[0]
  np.testing.assert_array_equal(np.unique(np.asarray(mask)), [0, 13, 18, 255])


def test_fashion_mnist_scenes_labels_match_item_pixels():
  yy, xx = np.mgrid[:28, :28]
  disc = (yy - 13.5) ** 2 + (xx - 13.5) ** 2 < 11 ** 2
  item_labels = np.arange(40) % 10
  items = (disc[None] * (60 + 15 * item_labels)[:, None, None]).astype(np.uint8)
  images, labels = seg_data.compose_scenes(items, item_labels, n_scenes=20, canvas=48, seed=0)
  assert images.shape == labels.shape == (20, 48, 48)
  assert (images[labels == 0] == 0).all() and (images[labels > 0] > seg_data.MASK_THRESHOLD).all()
  interior = images == 60 + 15 * (labels.astype(int) - 1)
  assert interior[labels > 0].mean() > 0.7  # The label names the item under the pixel.
  again, _ = seg_data.compose_scenes(items, item_labels, n_scenes=20, canvas=48, seed=0)
  np.testing.assert_array_equal(images, again)
