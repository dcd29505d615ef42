"""Composed scenes, the folder loader, and the segmentation protocol on known-answer features."""

import numpy as np
from PIL import Image
import pytest

from capi_jax.evaluators import segmentation

IGNORE = (0, 255)


def _items(n: int = 40) -> tuple[np.ndarray, np.ndarray]:
  """Discs whose grey level encodes their class, so a scene's pixels tell their label."""
  yy, xx = np.mgrid[:28, :28]
  disc = (yy - 13.5) ** 2 + (xx - 13.5) ** 2 < 11 ** 2
  labels = np.arange(n) % 10
  items = (disc[None] * (60 + 15 * labels)[:, None, None]).astype(np.uint8)
  return items, labels


def test_scenes_labels_match_item_pixels():
  items, item_labels = _items()
  images, labels = segmentation.compose_scenes(items, item_labels, n_scenes=20, canvas=48, seed=0)
  assert images.shape == labels.shape == (20, 48, 48)
  assert (images[labels == 0] == 0).all()  # Background is black and labelled 0...
  assert (images[labels > 0] > segmentation.MASK_THRESHOLD).all()  # ...items are not.
  assert labels.max() <= 10 and len(np.unique(labels)) > 5
  # Inside a disc the grey level is its class's: the label names the item under the pixel.
  interior = images == 60 + 15 * (labels.astype(int) - 1)
  assert interior[labels > 0].mean() > 0.7
  again, _ = segmentation.compose_scenes(items, item_labels, n_scenes=20, canvas=48, seed=0)
  other, _ = segmentation.compose_scenes(items, item_labels, n_scenes=20, canvas=48, seed=1)
  np.testing.assert_array_equal(images, again)
  assert not np.array_equal(images, other)


def test_patch_targets_are_class_fractions_of_valid_pixels():
  labels = np.array([[[1, 1, 2, 255],
                      [1, 3, 0, 0]]], np.uint8)  # One image, 2x4 pixels, 1x2 patches of 2x2.
  t = segmentation.patch_targets(labels, (1, 2), num_classes=4, ignore_labels=IGNORE)
  np.testing.assert_allclose(t[0, 0, 0], [0, 0.75, 0, 0.25])
  np.testing.assert_allclose(t[0, 0, 1], [0, 0, 1, 0])
  t = segmentation.patch_targets(np.zeros((1, 2, 2), np.uint8), (1, 1), 4, IGNORE)
  assert not t.any()  # No valid pixel: no target.


def test_scores_from_confusion():
  conf = np.array([[0, 0, 0], [0, 3, 1], [0, 1, 0]])  # Class 0 never seen: not averaged.
  s = segmentation.scores_from_confusion(conf)
  assert s['miou'] == pytest.approx((3 / 5 + 0) / 2)
  assert s['pixel_acc'] == pytest.approx(3 / 5)


def _blocky(n: int, seed: int, patch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Labels constant per patch (classes 1..4, some ignored), features that encode them."""
  rng = np.random.default_rng(seed)
  grid_labels = rng.choice([0, 1, 2, 3, 4, 255], p=[.1, .2, .2, .2, .2, .1], size=(n, 4, 4))
  labels = grid_labels.repeat(patch, 1).repeat(patch, 2).astype(np.uint8)
  centres = np.random.default_rng(99).normal(size=(256, 8)) * 3
  feats = centres[grid_labels] + rng.normal(size=(n, 4, 4, 8))
  return feats.astype(np.float32), labels, rng.normal(size=(n, 4, 4, 8)).astype(np.float32)


@pytest.mark.parametrize('patch', [1, 4])
def test_protocol_on_known_answer_features(patch):
  feats, labels, noise = _blocky(60, seed=0, patch=patch)
  test_feats, test_labels, test_noise = _blocky(30, seed=1, patch=patch)
  kw = dict(num_classes=5, ignore_labels=IGNORE, knn_ks=(1, 3, 10), lrs=(1e-2,), wds=(0.0,),
            iters=150, batch_size=64, held_out_fraction=0.2, chunk=16)
  res = segmentation.evaluate_segmentation(feats, labels, test_feats, test_labels, **kw)
  # Patch-sized pixels: exact. Bigger patches: bilinear upsampling blurs patch corners.
  want = 0.99 if patch == 1 else 0.8
  for protocol in ('knn', 'linear'):
    assert res[protocol]['miou'] > want and res[protocol]['pixel_acc'] > want, res
  assert res['knn']['k'] in (1, 3, 10) and res['knn']['metric'] in ('cosine', 'l2')
  res = segmentation.evaluate_segmentation(noise, labels, test_noise, test_labels, **kw)
  for protocol in ('knn', 'linear'):
    assert res[protocol]['miou'] < 0.35, res  # Chance mIoU for 4 classes is about 0.14.


def test_load_folder_ade_layout(tmp_path):
  rng = np.random.default_rng(0)
  for split in ('training', 'validation'):
    (tmp_path / 'images' / split).mkdir(parents=True)
    (tmp_path / 'annotations' / split).mkdir(parents=True)
    for i in range(3):
      Image.fromarray(rng.integers(0, 255, (30, 40, 3), np.uint8)).save(
          tmp_path / 'images' / split / f'img_{i}.jpg')
      mask = np.zeros((30, 40), np.uint8)
      mask[:, 20:] = 7  # Left half class 0, right half class 7.
      Image.fromarray(mask).save(tmp_path / 'annotations' / split / f'img_{i}.png')
  images, labels = segmentation.load_folder(str(tmp_path), 'train', image_size=16, max_images=2)
  assert images.shape == (2, 16, 16, 3) and labels.shape == (2, 16, 16)
  # Shorter side 30 -> 16, width 40 -> 21, centre crop: the split sits at column 8 of 16.
  assert set(np.unique(labels)) == {0, 7}
  assert (labels[:, :, :7] == 0).all() and (labels[:, :, 9:] == 7).all()
  images, _ = segmentation.load_folder(str(tmp_path), 'validation', image_size=16)
  assert len(images) == 3
  with pytest.raises(FileNotFoundError, match='split'):
    segmentation.load_folder(str(tmp_path), 'nonexistent', image_size=16)
