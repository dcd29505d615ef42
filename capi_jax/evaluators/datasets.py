"""Classification datasets of the evaluations, and the streams of batches that feed the devices.

A `ClassifSet` is a random-access image source (`sources.make_source`: fashion_mnist, tfds:NAME,
folder:PATH, synthetic) with what scoring needs:
- targets: the source's labels, or a JSON `labels` file with one entry per image in the
  source's order, an int or a list of valid ints (ImageNet-ReaL's `real.json`, ObjectNet's
  class lists; an empty list means the image is not scored);
- class_map: a JSON list of logit columns kept before the argmax (ImageNet-A / -R: their 200
  ImageNet-1k classes), labels then index that list.

`stream` (any image set: `batches`) turns positions of a set into this process's share of
fixed-size global batches, read and transformed by Grain (`pipeline.batched`: threads,
`num_workers` processes): each process reads only its rows of each global batch. Every position
is read exactly once, in order, whatever the numbers of processes, hosts and images:
- the last global batch is padded with position -1 (a blank image), never dropped, and rows
  carry 'index' (the position, -1 for padding) and 'valid' (an image to use: not padding, and
  decoded; an undecodable image is logged by `sources.decode` and marked invalid);
- each reader process makes whole batches (batch j by process j % n, the batches interleaved
  back in order); blank batches that only even out the processes' shares are never yielded;
- once the stream is exhausted, `Batches` checks that this host read each of its positions
  exactly once and raises `CountError` otherwise (a protocol never reports a number computed on
  fewer or more images than its set holds).
"""

from collections.abc import Callable, Iterator, Sequence
import dataclasses
import json
from typing import Any

import grain
import jax
import ml_collections
import numpy as np
from PIL import Image

from capi_jax.base import problems as problems_lib
from capi_jax.base import storage
from capi_jax.data import pipeline
from capi_jax.data import sources
from capi_jax.evaluators import protocol
from capi_jax.evaluators import transforms

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


DATASET_KINDS = ('fashion_mnist', 'tfds', 'folder', 'synthetic')
SET_KEYS = ('dataset', 'split', 'labels', 'class_map')  # 'labels', 'class_map' optional.


def check_set(p: problems_lib.Problems, key: str, spec: Any) -> None:
  """Records the problems of an image set section {dataset, split[, labels, class_map]}."""
  if not protocol.check_keys(p, key, spec, SET_KEYS, optional=('labels', 'class_map')):
    return
  kind, _, rest = str(spec.dataset).partition(':')
  p.check(kind in DATASET_KINDS and (kind in ('fashion_mnist', 'synthetic') or rest),
          f'{key}.dataset={spec.dataset!r} must be fashion_mnist[:DIR], tfds:NAME, folder:PATH '
          'or synthetic.')
  p.check(isinstance(spec.split, str) and spec.split, f'{key}.split={spec.split!r} must name a '
          'split.')
  for file_key in ('labels', 'class_map'):
    path = spec.get(file_key, '')
    p.check(not path or storage.path(path).is_file(),
            f'{key}.{file_key}={path!r} is not a file (a JSON list, or "" for none).')


def read_targets(path: str, n: int) -> np.ndarray:
  """A JSON list of n labels or label lists -> (n, A) int32 padded with -1."""
  entries = json.loads(storage.path(path).read_text())
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
  mapping = np.asarray(json.loads(storage.path(class_map).read_text()), np.int32) if class_map \
      else None
  return ClassifSet(name, source, targets, mapping)


@dataclasses.dataclass(frozen=True)
class ClassifTransform:
  """The official classification transform as readers call it: (image, rng) -> (size, size, 3).

  `train`: RandomResizedCrop + flip (`transforms.classif_train`); else the deterministic
  evaluation transform (`transforms.classif_eval`, rng unused).
  """
  size: int
  train: bool = False

  def __call__(self, image: Image.Image, rng: np.random.Generator) -> np.ndarray:
    if self.train:
      return transforms.classif_train(image, self.size, rng)
    return transforms.classif_eval(image, self.size)


class CountError(RuntimeError):
  """An evaluation read another number of images than it was given (a pipeline bug)."""


class Rows(Sequence[int]):
  """One host's rows of the global batches of `positions`: a lazy random-access view.

  The positions are cut into global batches, the last one and then whole blank batches padded
  with -1 up to a multiple of `rounds` global batches (reader processes get equal shares);
  host h of H reads columns [h b, (h + 1) b) of each, b = global_batch / H.
  """

  def __init__(self, positions: np.ndarray, global_batch: int, process_index: int,
               process_count: int, rounds: int = 1):
    if global_batch % process_count:
      raise ValueError(f'The global batch {global_batch} does not split over {process_count} '
                       'hosts.')
    self.positions = np.asarray(positions)
    self.global_batch = global_batch
    self.per_host = global_batch // process_count
    self.offset = process_index * self.per_host
    self.num_batches = -(-len(self.positions) // global_batch)  # Global batches with an image.
    self.padded_batches = -(-self.num_batches // rounds) * rounds

  def __len__(self) -> int:
    return self.padded_batches * self.per_host

  def __getitem__(self, i: int) -> int:
    row, column = divmod(i, self.per_host)
    flat = row * self.global_batch + self.offset + column
    return int(self.positions[flat]) if flat < len(self.positions) else -1

  def host_positions(self) -> np.ndarray:
    """The positions this host reads (padding excluded), in reading order."""
    flat = np.arange(len(self.positions))
    mine = (flat % self.global_batch - self.offset) // self.per_host == 0
    return self.positions[mine]


class Batches(Iterator[Batch]):
  """This host's batches of a `Rows` view: the global batches holding an image, in order.

  After the last one, the blank batches that only evened out the reader processes' shares are
  read and dropped (so the processes end and free their shared memory), and (`check`) every
  row read is compared with the host's positions: each exactly once, or `CountError`.
  """

  def __init__(self, name: str, iterator: Iterator[Batch], rows: Rows, check: bool = True):
    self.name, self.rows, self.check = name, rows, check
    self._iterator = iterator
    self._yielded = 0
    self._finished = False
    self._seen: list[np.ndarray] = []

  def __len__(self) -> int:
    return self.rows.num_batches

  def __iter__(self) -> 'Batches':
    return self

  def __next__(self) -> Batch:
    if self._yielded == len(self):
      self._finish()
      raise StopIteration
    try:
      batch = next(self._iterator)
    except StopIteration:
      self.close()
      raise CountError(f'{self.name}: the reader stopped after {self._yielded} of '
                       f'{len(self)} batches.') from None
    self._yielded += 1
    if self.check:
      self._seen.append(np.asarray(batch['index']).copy())
    return batch

  def _finish(self) -> None:
    if self._finished:
      return
    self._finished = True
    if self.check:
      for blank in self._iterator:
        self._seen.append(np.asarray(blank['index']).copy())
    self.close()
    if self.check:
      self._check(np.concatenate(self._seen) if self._seen else np.zeros(0, np.int64))

  def _check(self, seen: np.ndarray) -> None:
    seen = np.sort(seen[seen >= 0])
    expected = np.sort(self.rows.host_positions())
    if not np.array_equal(seen, expected):
      raise CountError(
          f'{self.name}: {len(seen)} images were read where the set gives {len(expected)} '
          f'(to this host), each exactly once expected: '
          f'{len(np.setdiff1d(expected, seen))} missing, {len(np.setdiff1d(seen, expected))} '
          'unexpected. No number is reported from an incomplete evaluation; please report this.')

  def close(self) -> None:
    if hasattr(self._iterator, 'close'):
      self._iterator.close()


def batches(name: str, positions: np.ndarray, global_batch: int,
            load: grain.transforms.RandomMap | Callable[[int], Batch | None], *,
            num_workers: int, seed: int = 0, check: bool = True,
            process_index: int | None = None, process_count: int | None = None) -> Batches:
  """This process's share of the global batches of `positions`, read by `load`.

  Args:
    name: the set's name (errors name it).
    positions: (n,) positions in the set, any n.
    global_batch: rows per global batch (over every host).
    load: position (-1: padding) -> a dict of arrays with 'index' and 'valid', or None to skip
      it (training only: the next position takes its place); a grain RandomMap gets a
      generator derived from (seed, host, row).
    num_workers: Grain reader processes (0: this one).
    seed: for a RandomMap `load`.
    check: check the positions read at the end (see `Batches`); off for training streams,
      which are not read to the end.
    process_index, process_count: this host and the number of hosts (default: jax's).
  """
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  rows = Rows(positions, global_batch, process_index, process_count, max(num_workers, 1))
  ds = grain.MapDataset.source(rows)
  if isinstance(load, grain.transforms.RandomMap):
    ds = ds.random_map(load, seed=seed + process_index)
  else:
    ds = ds.map(load)
  # A few elements per reader thread: Grain scans its whole read-ahead buffer for every element
  # it yields, so a buffer of whole batches costs more than the transforms.
  reader = pipeline.batched(ds, rows.per_host, num_workers=num_workers,
                            read_ahead=4 * pipeline.READ_THREADS, worker_buffer=2,
                            drop_remainder=not check, whole_batches=True)
  return Batches(name, iter(reader), rows, check)


@dataclasses.dataclass(frozen=True)
class _Load(grain.transforms.RandomMap):
  """Position -> {'images', 'targets' (A,), 'labels' (), 'index' (), 'valid' ()}, transformed.

  Position -1 gives a blank invalid row; so does an undecodable image (with its index), unless
  `drop_bad` (training), where it is dropped and the next image takes its place.
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
              'labels': np.int32(0), 'index': np.int64(position), 'valid': np.bool_(False)}
    if self.dataset.targets is None:
      targets = np.full(1, decoded['label'], np.int32)
    else:
      targets = self.dataset.targets[position]
    return {'images': self.transform(decoded['image'], rng), 'targets': targets,
            'labels': np.int32(decoded['label']), 'index': np.int64(position),
            'valid': np.bool_(True)}


def stream(dataset: ClassifSet, positions: np.ndarray, global_batch: int, transform: Transform,
           size: int, *, seed: int, num_workers: int, training: bool = False,
           process_index: int | None = None, process_count: int | None = None) -> Batches:
  """This process's share of the global batches of `positions` of `dataset` (see `batches`).

  Yields {'images' (b, size, size, 3), 'targets' (b, A) (-1 for padding and undecodable
  images), 'labels' (b,), 'index' (b,) (-1 for padding), 'valid' (b,)} with b = global_batch /
  process_count; transform(image, rng) gets a generator derived from (seed, process, row).
  `training` drops undecodable images (give spare positions) instead of marking them invalid,
  and does not check the count (training reads only as many batches as it needs).
  """
  return batches(dataset.name, positions, global_batch, _Load(dataset, transform, size, training),
                 num_workers=num_workers, seed=seed, check=not training,
                 process_index=process_index, process_count=process_count)
