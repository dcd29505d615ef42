"""Pictures: PCA of patch features as RGB beside the input images, and training curves.

Both write PNG files with matplotlib's Agg backend (no display needed).
"""

from collections.abc import Sequence
import json
import math
import pathlib

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

from capi_jax.data import transforms  # pylint: disable=g-import-not-at-top,wrong-import-position


def pca_rgb(feature_map: np.ndarray) -> np.ndarray:
  """The first three principal components of the patch features, as colours.

  The components are fitted jointly on all the given images' patches (so colours mean the same
  thing across images, as in the paper's figures) and each is mapped to [0, 1] between its 1st
  and 99th percentiles, which keeps a few outlier patches from washing the picture out.

  Args:
    feature_map: (n, h, w, dim) patch features.

  Returns:
    (n, h, w, 3) float32 in [0, 1].
  """
  n, h, w, dim = feature_map.shape
  x = feature_map.reshape(-1, dim).astype(np.float64)
  x = x - x.mean(0)
  # Eigenvectors of the (dim, dim) covariance: cheaper than an SVD of all the patches.
  _, vectors = np.linalg.eigh(x.T @ x)
  proj = x @ vectors[:, ::-1][:, :3]
  if proj.shape[1] < 3:  # Fewer than three feature channels: pad with grey.
    proj = np.pad(proj, ((0, 0), (0, 3 - proj.shape[1])))
  lo, hi = np.percentile(proj, 1, axis=0), np.percentile(proj, 99, axis=0)
  rgb = np.clip((proj - lo) / np.maximum(hi - lo, 1e-12), 0, 1)
  return rgb.reshape(n, h, w, 3).astype(np.float32)


def denormalize(images: np.ndarray) -> np.ndarray:
  """ImageNet-normalised (n, H, W, 3) images -> displayable [0, 1] RGB."""
  return np.clip(images * transforms.IMAGENET_STD + transforms.IMAGENET_MEAN, 0, 1)


def save_pca_figure(images: np.ndarray, feature_map: np.ndarray, path: str | pathlib.Path,
                    title: str = '') -> None:
  """Input images (top row) above the PCA colours of their patch features (bottom row).

  Args:
    images: (n, H, W, 3) ImageNet-normalised images.
    feature_map: (n, h, w, dim) their patch features.
    path: PNG file to write.
    title: figure title.
  """
  n = len(images)
  colours = pca_rgb(feature_map)
  fig, axes = plt.subplots(2, n, figsize=(1.6 * n, 3.4), squeeze=False)
  for i in range(n):
    axes[0, i].imshow(denormalize(images[i]), interpolation='nearest')
    # 'nearest' shows the patch grid as it is: one colour per patch.
    axes[1, i].imshow(colours[i], interpolation='nearest')
  for ax in axes.ravel():
    ax.set_axis_off()
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def read_metrics(path: str | pathlib.Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """metrics.jsonl -> {key: (steps, values)} for every numeric key."""
  series: dict[str, list[tuple[int, float]]] = {}
  with open(path) as f:
    for line in f:
      if not line.strip():
        continue
      record = json.loads(line)
      step = record.get('step')
      for key, value in record.items():
        if key != 'step' and isinstance(value, (int, float)) and not isinstance(value, bool):
          series.setdefault(key, []).append((step, value))
  return {k: (np.array([s for s, _ in v]), np.array([x for _, x in v], np.float64))
          for k, v in series.items()}


def save_training_curves(metrics_path: str | pathlib.Path, path: str | pathlib.Path,
                         keys: Sequence[str] | None = None) -> list[str]:
  """One panel per metric of metrics.jsonl against the step; returns the keys plotted.

  Args:
    metrics_path: the training run's metrics.jsonl.
    path: PNG file to write.
    keys: metrics to plot, default all numeric ones (in first-seen order).
  """
  series = read_metrics(metrics_path)
  keys = [k for k in (keys or series) if k in series and len(series[k][0])]
  if not keys:
    raise ValueError(f'No numeric metric to plot in {metrics_path}.')
  cols = min(3, len(keys))
  rows = math.ceil(len(keys) / cols)
  fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 2.8 * rows), squeeze=False)
  for ax, key in zip(axes.ravel(), keys):
    steps, values = series[key]
    ax.plot(steps, values, marker='.' if len(steps) < 30 else None, linewidth=1)
    ax.set_title(key, fontsize=9)
    ax.set_xlabel('step', fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    # Rates spanning decades (lr warmup, losses falling fast) read better on a log axis.
    finite = values[np.isfinite(values)]
    if len(finite) and finite.min() > 0 and finite.max() / finite.min() > 100:
      ax.set_yscale('log')
  for ax in axes.ravel()[len(keys):]:
    ax.set_axis_off()
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return keys
