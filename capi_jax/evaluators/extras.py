"""capi_jax's extras beside the official protocols; their numbers are never mixed with the
official ones (results and tables name them 'extra/...').

- 'knn' (`Knn`): weighted cosine k-NN classification (DINO's: votes exp(cos / T) of the k
  nearest training images) on the global representation and on the mean patch token, several
  k in one neighbour search (`seg.knn_neighbours`, the training vectors split over the
  devices); with `pixels`, the same k-NN on the raw normalised pixels, a baseline that needs no
  network.
- The random-initialisation baseline (the run's own step-0 weights through every protocol) and
  the training curves are drawn by the evaluation runner (`capi_jax.engine.evaluation`).
"""

from collections.abc import Sequence
import dataclasses
import functools
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from capi_jax.base import problems as problems_lib
from capi_jax.evaluators import datasets
from capi_jax.evaluators import protocol
from capi_jax.evaluators import seg


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


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class Knn(protocol.Protocol):
  """The 'knn' extra: weighted k-NN on the global representation, the mean patch token, and
  (`pixels`) the raw normalised pixels. Features are held in host memory."""
  name: ClassVar[str] = 'knn'
  official: ClassVar[bool] = False

  train: Any  # Image set {dataset, split[, labels, class_map]} of the neighbours.
  test: Any  # Image set classified.
  max_train_images: int  # 0 = all (8 D bytes per image in host memory).
  max_test_images: int
  ks: Sequence[int]
  temperature: float
  pixels: bool
  resolution: int

  def check(self, p: protocol.Problems, key: str, model: protocol.ModelShape | None) -> None:
    datasets.check_set(p, f'{key}.train', self.train)
    datasets.check_set(p, f'{key}.test', self.test)
    p.number(f'{key}.max_train_images', self.max_train_images, 0, integer=True)
    p.number(f'{key}.max_test_images', self.max_test_images, 0, integer=True)
    protocol.check_numbers(p, f'{key}.ks', self.ks, lambda v: problems_lib.is_int(v) and v > 0,
                           'positive integers')
    p.check(protocol.is_number(self.temperature) and self.temperature > 0,
            f'{key}.temperature={self.temperature!r} must be > 0.')
    p.boolean(f'{key}.pixels', self.pixels)
    protocol.check_resolution(p, f'{key}.resolution', self.resolution, model)

  def run(self, backbone, env, out_dir, log):
    train = self._features(backbone, env, self.train, self.max_train_images)
    test = self._features(backbone, env, self.test, self.max_test_images)
    results = {}
    for name in ('global', 'patch_mean') + (('pixels',) if self.pixels else ()):
      scores = knn_classify(train[name], train['label'], test[name], test['label'], ks=self.ks,
                            temperature=self.temperature, mesh=backbone.mesh)
      results.update({f'{name}/{k}': v for k, v in scores.items()})
    log(f'knn: {len(train["label"])} train, {len(test["label"])} test images')
    del out_dir  # Nothing but numbers.
    return results, {}

  def _features(self, backbone, env, spec, max_images: int) -> dict[str, np.ndarray]:
    data = datasets.classif_set('knn', spec, env.data_dir)
    positions = np.arange(len(data))
    if 0 < max_images < len(data):  # A fixed random subset: class-sorted folders stay balanced.
      positions = np.sort(np.random.default_rng(0).choice(len(data), max_images, replace=False))
    res = self.resolution
    stream = datasets.stream(data, positions, backbone.batch_size, datasets.ClassifTransform(res),
                             res, seed=0, num_workers=env.num_workers)
    outputs = ('global_repr', 'feature_map') + (('images',) if self.pixels else ())
    out = backbone.extract(stream, outputs)
    found = {'global': out['global_repr'], 'patch_mean': out['feature_map'].mean((1, 2)),
             'label': out['labels']}
    if self.pixels:
      found['pixels'] = out['images'].reshape(len(out['images']), -1)
    return found
