"""Epoch loop of the probes trained online on a frozen backbone (MIM-Refiner's, CAE v2's).

Each epoch is a fresh permutation of the training set cut into whole batches (the last partial
batch dropped, as torch's DataLoader with drop_last), read and augmented by the readers
(`datasets.stream`); after each epoch every head is scored on the whole test set (each image
exactly once). What is trained, and how, is the protocol's `Heads`.
"""

from collections.abc import Callable
import dataclasses
import time

import jax
from jax.experimental import multihost_utils
import numpy as np

from capi_jax.evaluators import datasets


@dataclasses.dataclass
class Heads:
  """What a protocol trains online (it keeps its parameters itself).

  Attributes:
    update: (iteration, images, labels) -> loss: one training step on a global batch (arrays
      already placed by `backbone.global_array`).
    correct: (images, labels, valid) -> (heads,) correct test predictions among the valid rows.
    names: the heads' names, in `correct`'s order.
  """
  update: Callable[[int, jax.Array, jax.Array], jax.Array]
  correct: Callable[[jax.Array, jax.Array, jax.Array], jax.Array]
  names: list[str]


def num_classes(protocol: str, train_set: datasets.ClassifSet, given: int) -> int:
  """`given`, or the training set's number of classes when 0 (a ValueError if unknown)."""
  found = given or getattr(train_set.source, 'num_classes', 0)
  if not found:
    raise ValueError(f'{train_set.name}: the number of classes is unknown; set '
                     f'config.evals.{protocol}.num_classes.')
  return found


def epoch_order(n: int, batch: int, epochs: int, seed: int, spare_batches: int
                ) -> tuple[np.ndarray, int]:
  """(positions of every training batch, updates per epoch): each epoch a fresh permutation cut
  into floor(n / batch) whole batches, then `spare_batches` batches more (readers' rounds and
  undecodable images)."""
  per_epoch = n // batch
  if per_epoch == 0:
    raise ValueError(f'The probe batch {batch} exceeds the {n} training images.')
  rng = np.random.default_rng(seed)
  parts = [rng.permutation(n)[:per_epoch * batch] for _ in range(epochs)]
  parts.append(np.resize(rng.permutation(n), spare_batches * batch))
  return np.concatenate(parts), per_epoch


@dataclasses.dataclass
class Outcome:
  """accuracy (epochs, heads) on the test set after each epoch; losses [(iteration, loss)]."""
  accuracy: np.ndarray
  losses: list[tuple[int, float]]
  train_seconds: float
  eval_seconds: float


def run(name: str, backbone, train_set: datasets.ClassifSet, test_set: datasets.ClassifSet,
        heads: Heads, *, epochs: int, batch_size: int, resolution: int,
        train_transform: datasets.Transform, num_workers: int, seed: int, log_every: int,
        log: Callable[[str], None]) -> Outcome:
  """Trains `heads` for `epochs` epochs of `train_set`, scoring them on `test_set` after each."""
  if batch_size % backbone.mesh.devices.size:
    raise ValueError(f'{name}: the batch {batch_size} does not split over the '
                     f'{backbone.mesh.devices.size} devices.')
  order, per_epoch = epoch_order(len(train_set), batch_size, epochs, seed,
                                 spare_batches=2 * max(num_workers, 1))
  total = per_epoch * epochs
  batches = datasets.stream(train_set, order, batch_size, train_transform, resolution, seed=seed,
                            num_workers=num_workers, training=True)
  accuracy = np.zeros((epochs, len(heads.names)))
  losses, eval_seconds = [], 0.0
  start = time.perf_counter()
  try:
    for epoch in range(epochs):
      for it in range(epoch * per_epoch, (epoch + 1) * per_epoch):
        batch = next(batches)
        loss = heads.update(it, backbone.global_array(batch['images']),
                            backbone.global_array(batch['labels']))
        if (it + 1) % log_every == 0 or it + 1 == total:
          losses.append((it + 1, float(np.mean(np.asarray(loss)))))
          log(f'{name}: update {it + 1}/{total}, loss {losses[-1][1]:.4f}')
      t_eval = time.perf_counter()
      accuracy[epoch] = score(backbone, test_set, heads, resolution, num_workers)
      eval_seconds += time.perf_counter() - t_eval
      best = int(accuracy[epoch].argmax())
      log(f'{name}: epoch {epoch + 1}/{epochs}, test accuracy {accuracy[epoch][best]:.4f} '
          f'({heads.names[best]})')
  finally:
    batches.close()
  seconds = time.perf_counter() - start
  return Outcome(accuracy, losses, seconds - eval_seconds, eval_seconds)


def score(backbone, test_set: datasets.ClassifSet, heads: Heads, resolution: int,
          num_workers: int) -> np.ndarray:
  """(heads,) accuracy of every head on every image of `test_set` (evaluation transform)."""
  correct, count = 0, 0
  for batch in datasets.stream(test_set, np.arange(len(test_set)), backbone.batch_size,
                               datasets.ClassifTransform(resolution), resolution, seed=0,
                               num_workers=num_workers):
    correct = correct + np.asarray(heads.correct(backbone.global_array(batch['images']),
                                                 backbone.global_array(batch['labels']),
                                                 backbone.global_array(batch['valid'])))
    count += int(np.sum(batch['valid']))  # This host's rows.
  count = int(np.asarray(multihost_utils.process_allgather(np.int64(count))).sum())
  if not count:
    raise ValueError(f'{test_set.name}: no image to score.')
  return np.asarray(correct, np.float64) / count
