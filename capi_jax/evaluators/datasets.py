"""Classification datasets of the evaluations, and the streams of batches that feed the devices.

A `ClassifSet` is a random-access image source (`sources.make_source`: fashion_mnist, tfds:NAME,
folder:PATH, synthetic) with what scoring needs:
- targets: the source's labels, or a JSON `labels` file with one entry per image in the
  source's order, an int or a list of valid ints (ImageNet-ReaL's `real.json`, ObjectNet's
  class lists; an empty list means the image is not scored);
- class_map: a JSON list of logit columns kept before the argmax (ImageNet-A / -R: their 200
  ImageNet-1k classes), labels then index that list.

`stream` turns positions of a set into this process's share of fixed-size global batches, read
and transformed by Grain (`batched`: threads, `config.data.num_workers` processes): each process
reads only its rows of each global batch. Position -1 is padding (a blank image, no target). An
undecodable image is scored as a padding row (and logged by `sources.decode`).
"""

from collections.abc import Callable, Iterator, Sequence
import dataclasses
import json
import pathlib
from typing import Any

from absl import flags
import grain
import jax
import ml_collections
import numpy as np
from PIL import Image

from capi_jax.data import pipeline
from capi_jax.data import sources

Batch = dict[str, np.ndarray]
Transform = Callable[[Image.Image, np.random.Generator], np.ndarray]


@dataclasses.dataclass(frozen=True)
class ClassifSet:
  """A classification dataset: `source[i]` records, optional targets and class map.

  Attributes:
    name: the name results carry.
    source: random-access records {'image', 'label', 'name'}.
    targets: (n, A) int32 valid labels per image padded with -1, or None (the source's label).
    class_map: (C',) int32 logit columns scored, or None.
  """
  name: str
  source: Any
  targets: np.ndarray | None = None
  class_map: np.ndarray | None = None

  def __len__(self) -> int:
    return len(self.source)

  @property
  def target_width(self) -> int:
    return 1 if self.targets is None else self.targets.shape[1]


def read_targets(path: str, n: int) -> np.ndarray:
  """A JSON list of n labels or label lists -> (n, A) int32 padded with -1."""
  entries = json.loads(pathlib.Path(path).read_text())
  if len(entries) != n:
    raise ValueError(f'{path} has {len(entries)} label entries for a dataset of {n} images: give '
                     'one entry (an int or a list of ints) per image, in the dataset order.')
  lists = [e if isinstance(e, list) else [e] for e in entries]
  out = -np.ones((n, max(1, max(map(len, lists), default=1))), np.int32)
  for i, labels in enumerate(lists):
    out[i, :len(labels)] = labels
  return out


def classif_set(name: str, spec: ml_collections.ConfigDict, data_dir: str = '') -> ClassifSet:
  """The set described by `spec` (dataset, split, and optional labels / class_map files)."""
  source = sources.make_source(spec.dataset, spec.split, data_dir)
  labels, class_map = spec.get('labels', ''), spec.get('class_map', '')
  targets = read_targets(labels, len(source)) if labels else None
  mapping = np.asarray(json.loads(pathlib.Path(class_map).read_text()), np.int32) if class_map \
      else None
  return ClassifSet(name, source, targets, mapping)


class Rows(Sequence[int]):
  """This process's rows of the global batches of `positions`: a lazy random-access view."""

  def __init__(self, positions: np.ndarray, global_batch: int):
    if len(positions) % global_batch:
      raise ValueError(f'{len(positions)} positions do not fill global batches of {global_batch}.')
    self.positions = positions.reshape(-1, global_batch)
    per_host = global_batch // jax.process_count()
    self.columns = slice(jax.process_index() * per_host, (jax.process_index() + 1) * per_host)
    self.per_host = per_host

  def __len__(self) -> int:
    return self.positions.shape[0] * self.per_host

  def __getitem__(self, i: int) -> int:
    row, col = divmod(i, self.per_host)
    return int(self.positions[row, self.columns][col])


def pad_positions(positions: np.ndarray, global_batch: int) -> np.ndarray:
  """positions padded with -1 to whole global batches."""
  return np.concatenate([positions, -np.ones((-len(positions)) % global_batch, np.int64)])


@dataclasses.dataclass(frozen=True)
class _Load(grain.transforms.RandomMap):
  """Position -> {'images', 'targets' (A,), 'labels' ()}, transformed.

  Position -1 gives a blank unscored row; so does an undecodable image, unless `drop_bad`
  (training), where it is dropped and the next image takes its place.
  """
  dataset: ClassifSet
  transform: Transform
  size: int
  drop_bad: bool

  def random_map(self, position: int, rng: np.random.Generator) -> Batch | None:
    decoded = None if position < 0 else sources.decode(self.dataset.source[position])
    if decoded is None and position >= 0 and self.drop_bad:
      return None
    if decoded is None:
      targets = -np.ones(self.dataset.target_width, np.int32)
      return {'images': np.zeros((self.size, self.size, 3), np.float32), 'targets': targets,
              'labels': np.int32(0), 'index': np.int64(-1)}
    if self.dataset.targets is None:
      targets = np.full(1, decoded['label'], np.int32)
    else:
      targets = self.dataset.targets[position]
    return {'images': self.transform(decoded['image'], rng), 'targets': targets,
            'labels': np.int32(decoded['label']), 'index': np.int64(position)}


def stream(config: ml_collections.ConfigDict, dataset: ClassifSet, positions: np.ndarray,
           global_batch: int, transform: Transform, size: int, seed: int,
           training: bool = False) -> Iterator[Batch]:
  """This process's share of the global batches of `positions` (a multiple of global_batch).

  Yields {'images' (b, size, size, 3), 'targets' (b, A), 'labels' (b,), 'index' (b,) (-1 for
  padding and undecodable images)} with b = global_batch /
  process_count; transform(image, rng) gets a generator derived from (seed, process, row).
  `training` drops undecodable images (give spare positions) instead of scoring them as
  padding.
  """
  ds = grain.MapDataset.source(Rows(positions, global_batch))
  ds = ds.random_map(_Load(dataset, transform, size, training), seed=seed + jax.process_index())
  return batched(ds, global_batch // jax.process_count(), config.data.num_workers)


def batched(ds: grain.MapDataset, batch_size: int, num_workers: int) -> Iterator[Batch]:
  """Reads `ds` with READ_THREADS threads a few elements ahead, in batches of batch_size, in
  `num_workers` processes (0: this one).

  The read-ahead stays a few elements per thread: Grain scans its whole read-ahead buffer for
  every element it yields, so a buffer of whole batches costs more than the transforms.
  """
  threads = pipeline.READ_THREADS
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=threads,
                                            prefetch_buffer_size=4 * threads))
  ds = ds.batch(batch_size, drop_remainder=True)
  if num_workers > 0:
    # Grain's worker launcher reads absl flags, unparsed outside an absl app: take defaults.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers,
                                                     per_worker_buffer_size=2))
  return iter(ds)
