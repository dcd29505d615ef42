"""PCA pictures separate regions with different features; curves read metrics.jsonl."""

import json

import numpy as np
from PIL import Image
import pytest

from capi_jax.evaluators import visualize


def _regions(n: int = 4, side: int = 8, dim: int = 16) -> tuple[np.ndarray, np.ndarray]:
  """(features (n, side, side, dim), region ids (n, side, side)): four quadrants per image.

  Four regions span three principal directions, so every colour channel carries structure.
  """
  rng = np.random.default_rng(0)
  yy, xx = np.mgrid[:side, :side]
  region = np.broadcast_to(2 * (yy >= side // 2) + (xx >= side // 2), (n, side, side))
  centres = rng.normal(size=(4, dim)) * 5
  return centres[region] + 0.05 * rng.normal(size=(n, side, side, dim)), region


def test_pca_colours_follow_feature_regions():
  feats, region = _regions()
  rgb = visualize.pca_rgb(feats)
  assert rgb.shape == (*feats.shape[:3], 3)
  assert rgb.min() >= 0 and rgb.max() <= 1
  means = np.stack([rgb[region == r].mean(0) for r in range(4)])
  spread = max(rgb[region == r].std(0).max() for r in range(4))
  gaps = [np.abs(means[a] - means[b]).max() for a in range(4) for b in range(a)]
  assert min(gaps) > 10 * spread  # One colour per region, distinct across regions.


def test_pca_handles_fewer_than_three_channels():
  assert visualize.pca_rgb(np.random.default_rng(0).normal(size=(2, 3, 3, 2))).shape == (2, 3, 3, 3)


def test_pca_figure_is_written(tmp_path):
  feats, region = _regions()
  images = np.repeat(region[..., None].repeat(4, 1).repeat(4, 2), 3, -1).astype(np.float32)
  visualize.save_pca_figure(images, feats, tmp_path / 'pca.png', title='regions')
  with Image.open(tmp_path / 'pca.png') as png:
    assert png.size[0] > png.size[1] > 100  # Four columns, two rows.


def test_training_curves(tmp_path):
  path = tmp_path / 'metrics.jsonl'
  with open(path, 'w') as f:
    for step in range(0, 100, 10):
      f.write(json.dumps({'step': step, 'loss': 5.0 / (step + 1), 'lr': 1e-3, 'note': 'x'}) + '\n')
    f.write(json.dumps({'step': 100, 'knn_k10': 0.7}) + '\n')
  series = visualize.read_metrics(path)
  assert set(series) == {'loss', 'lr', 'knn_k10'}  # Strings are not plotted.
  np.testing.assert_array_equal(series['loss'][0], np.arange(0, 100, 10))
  keys = visualize.save_training_curves(path, tmp_path / 'curves.png')
  assert keys == ['loss', 'lr', 'knn_k10']
  assert (tmp_path / 'curves.png').stat().st_size > 1000
  with pytest.raises(ValueError, match='No numeric metric'):
    visualize.save_training_curves(path, tmp_path / 'none.png', keys=['missing'])
