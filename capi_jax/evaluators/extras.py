"""capi_jax's extras beside the official protocols; their numbers are never mixed with the
official ones (results and tables name them 'extra/...').

- 'knn': weighted cosine k-NN classification (DINO's: votes exp(cos / T) of the k nearest
  training images) on the global representation and on the mean patch token, several k in one
  neighbour search (`seg.knn_neighbours`, the training vectors split over the devices).
- 'pixels_knn': the same k-NN on the raw normalised pixels, a baseline that needs no network.
- The random-initialisation baseline (the run's own step-0 weights through every protocol) and
  the training curves are drawn by `capi_jax.evaluate`; `save_training_curves` is here.
"""

from collections.abc import Callable, Sequence
import functools
from typing import Any
import json
import math
import pathlib

import jax
import jax.numpy as jnp
import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

from capi_jax.evaluators import datasets  # pylint: disable=g-import-not-at-top,wrong-import-position
from capi_jax.evaluators import seg  # pylint: disable=g-import-not-at-top,wrong-import-position
from capi_jax.evaluators import transforms  # pylint: disable=g-import-not-at-top,wrong-import-position


@functools.partial(jax.jit, static_argnames=('ks', 'num_classes'))
def _weighted_votes(distances: jax.Array, labels: jax.Array, temperature: jax.Array, *,
                    ks: tuple[int, ...], num_classes: int) -> jax.Array:
  """(q, k_max) cosine distances and neighbour labels -> (len(ks), q) predicted classes."""
  weights = jnp.exp((1 - distances) / temperature)
  rows = jnp.arange(labels.shape[0])[:, None]
  preds = []
  for k in ks:
    votes = jnp.zeros((labels.shape[0], num_classes)).at[rows, labels[:, :k]].add(weights[:, :k])
    preds.append(votes.argmax(-1))
  return jnp.stack(preds)


def knn_classify(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray,
                 test_y: np.ndarray, *, ks: Sequence[int], temperature: float,
                 mesh: jax.sharding.Mesh) -> dict[str, float]:
  """Top-1 accuracy of weighted cosine k-NN for each k: {'k10': acc, ...} in [0, 1]."""
  ks = tuple(int(k) for k in ks)
  num_classes = int(max(train_y.max(), test_y.max())) + 1
  index = seg.knn_fit(train_x, distance='cosine', dtype='float32', mesh=mesh)
  correct = np.zeros(len(ks))
  start = 0
  for distances, nearest in seg.knn_neighbours(index, test_x, max(ks)):
    preds = _weighted_votes(jnp.asarray(distances), jnp.asarray(train_y[nearest]),
                            jnp.float32(temperature), ks=ks, num_classes=num_classes)
    correct += (np.asarray(preds) == test_y[start:start + len(nearest)]).sum(1)
    start += len(nearest)
  return {f'k{k}': float(c / len(test_x)) for k, c in zip(ks, correct)}


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


def knn_from_config(config, backbone, out_dir, log: Callable[[str], None] = print
                    ) -> tuple[dict[str, float], dict[str, Any]]:
  """The 'knn' extra with `config.evals.knn`: on the global representation, the mean patch
  token, and (`pixels`) the raw normalised pixels. Features are held in host memory."""
  c = config.evals.knn
  res, batch = c.resolution, backbone.batch_size
  transform = lambda im, rng: transforms.classif_eval(im, res)

  def features(spec, max_images: int) -> dict[str, np.ndarray]:
    data = datasets.classif_set('knn', spec, config.data.data_dir)
    positions = np.arange(len(data))
    if 0 < max_images < len(data):  # A fixed random subset: class-sorted folders stay balanced.
      positions = np.sort(np.random.default_rng(0).choice(len(data), max_images, replace=False))
    stream = datasets.stream(config, data, datasets.pad_positions(positions, batch), batch,
                             transform, res, seed=0)
    outputs = ('global_repr', 'feature_map') + (('images',) if c.pixels else ())
    out = backbone.extract(stream, outputs)
    found = {'global': out['global_repr'], 'patch_mean': out['feature_map'].mean((1, 2)),
             'label': out['labels']}
    if c.pixels:
      found['pixels'] = out['images'].reshape(len(out['images']), -1)
    return found

  train, test = features(c.train, c.max_train_images), features(c.test, c.max_test_images)
  results = {}
  for name in ('global', 'patch_mean') + (('pixels',) if c.pixels else ()):
    scores = knn_classify(train[name], train['label'], test[name], test['label'], ks=c.ks,
                          temperature=c.temperature, mesh=backbone.mesh)
    results.update({f'{name}/{k}': v for k, v in scores.items()})
  log(f'knn: {len(train["label"])} train, {len(test["label"])} test images')
  del out_dir  # Nothing but numbers.
  return results, {}
