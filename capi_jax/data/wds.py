r"""WebDataset tar shards as a random-access source (`wds:PATTERN`).

PATTERN names the shards, local or gs://: brace ranges and lists as WebDataset writes them
(`DIR/train-{0000..0147}.tar`, `DIR/{a,b}.tar`), shell globs (`DIR/*.tar`, expanded in sorted
order), and `{split}` for the split's name (`DIR/{split}-{0000..0009}.tar`); a pattern without
`{split}` is the 'train' split. Several patterns joined by `::` are read one after the other.

A sample is the group of consecutive members sharing a key (the member's path up to the first
dot of its file name, WebDataset's rule): its image is the member with an image extension
(jpg, jpeg, png, webp), its label the integer in a `cls` / `label` member (-1 without one).
Each shard's member table (its index: the image members' offsets, sizes, names and labels) is
read when the source is made, so records are read at random by offset: the Grain pipeline's
guarantees hold unchanged (per-record determinism, shuffling, exact resume, each host its
slice). A shard cut short keeps the samples before the cut (a warning names it, at every start);
a sample without an image is skipped with a count; an undecodable image is skipped by the
decoder like any bad record.

Indexing reads a shard's headers: locally by seeking over the data, on gs:// by downloading the
shard in chunks of 16 MiB (`storage.open_read_ahead`: a request per member, gcsfs's way, costs a
round trip each). So each shard's index is cached, as a small .npz file made once:
  - where: `DIR/.wds_index/SHARD.npz` beside the shard, the place every host of a pod reads;
    where that cannot be written (read-only data), `$CAPI_JAX_CACHE/wds_index/` (default
    ~/.cache/capi_jax/wds_index/; a gs:// folder there is shared by the hosts, a local one is
    each host's own), named by a hash of the shard's path.
  - validity: the file records the shard's path, size and version (GCS generation; locally
    inode and modification time) and is used only while they match, so a shard rewritten is
    indexed again; a damaged or cut file (zip CRCs) is ignored with a warning and rewritten.
    Writes are atomic.
  - building: INDEX_THREADS shards at a time. When all processes of a run make the source
    together (training: `IndexShare`), process p indexes shards i with i % count == p, all wait
    at a barrier, then each reads the others' indexes from the cache; one it cannot find there
    (a cache that is not shared) it indexes itself: correct, only slower.
A long indexing logs its progress every 10 s.
"""

import collections
from collections.abc import Callable
import concurrent.futures
import dataclasses
import fnmatch
import glob
import hashlib
import io
import itertools
import json
import logging
import os
import re
import tarfile
import time
from typing import Any

import numpy as np

from capi_jax.base import errors
from capi_jax.base import storage

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = ('jpg', 'jpeg', 'png', 'webp')
LABEL_SUFFIXES = ('cls', 'cls.txt', 'label', 'label.txt', 'label.cls')
_GLOB_CHARS = re.compile(r'[*?\[]')
_BRACE = re.compile(r'\{([^{}]*)\}')
INDEX_FOLDER = '.wds_index'
_INDEX_FORMAT = 1  # One more when what an index file holds changes: older files are rebuilt.
# Shards indexed at once: on gs:// each waits for its reads (the GIL is free meanwhile).
INDEX_THREADS = 16
_PROGRESS_S = 10.0  # A long indexing logs its progress this often.


class ShardsNotFoundError(errors.UserError, FileNotFoundError):
  """A `wds:` pattern names shards that do not exist."""


class ShardError(errors.UserError, ValueError):
  """A `wds:` pattern or shard is unusable."""


def expand_braces(pattern: str) -> list[str]:
  """WebDataset's brace expansion: '{000..002}' (zero-padded as written) and '{a,b}'."""
  match = _BRACE.search(pattern)
  if match is None:
    return [pattern]
  body = match.group(1)
  ranged = re.fullmatch(r'(\d+)\.\.(\d+)', body)
  if ranged:
    start, end = ranged.groups()
    if int(end) < int(start):
      raise ShardError(f'Brace range {{{body}}} in {pattern!r} runs backwards.')
    width = len(start) if start.startswith('0') else 0
    choices = [str(i).zfill(width) for i in range(int(start), int(end) + 1)]
  elif ',' in body:
    choices = body.split(',')
  else:
    raise ShardError(f'Cannot expand {{{body}}} in {pattern!r}: use {{000..009}} or {{a,b}}.')
  head, tail = pattern[:match.start()], pattern[match.end():]
  return [p for c in choices for p in expand_braces(head + c + tail)]


def _glob(pattern: str) -> list[str]:
  """Files matching a shell glob in the last path components, sorted; local or gs://."""
  if storage.is_gcs(pattern):
    prefix = pattern[:_GLOB_CHARS.search(pattern).start()].rsplit('/', 1)[0]
    names = storage.list_files(prefix)
    return sorted(f'{prefix}/{n}' for n in names if fnmatch.fnmatchcase(f'{prefix}/{n}', pattern))
  return sorted(glob.glob(pattern))


def shard_paths(spec: str, split: str) -> list[str]:
  """The shards `spec` (the text after 'wds:') names for `split`, in reading order."""
  paths = []
  for pattern in spec.split('::'):
    if '{split}' in pattern:
      pattern = pattern.replace('{split}', split)
    elif split != 'train':
      raise ShardsNotFoundError(
          f'wds:{spec} has no {{split}} in its pattern, so it is the train split only, not '
          f'{split!r}: write the split\'s name as {{split}} (e.g. '
          'DIR/{split}-{0000..0009}.tar) or give the split its own wds: pattern.')
    for expanded in expand_braces(pattern):
      found = _glob(expanded) if _GLOB_CHARS.search(expanded) else [expanded]
      if not found:
        raise ShardsNotFoundError(f'No shard matches {expanded!r} (from wds:{spec}).')
      paths += found
  with concurrent.futures.ThreadPoolExecutor(INDEX_THREADS) as pool:  # A request each on GCS.
    exist = list(pool.map(lambda p: storage.path(p).is_file(), paths))
  missing = [p for p, there in zip(paths, exist) if not there]
  if missing:
    raise ShardsNotFoundError(f'{len(missing)} of the {len(paths)} shards of wds:{spec} do not '
                              f'exist, e.g. {missing[0]}.')
  return paths


def _key_and_suffix(name: str) -> tuple[str, str]:
  """'dir/n01.jpg' -> ('dir/n01', 'jpg'); 'dir/a.b.cls' -> ('dir/a', 'b.cls'): WebDataset's
  key is the path up to the first dot of the file name."""
  folder, _, base = name.rpartition('/')
  stem, _, suffix = base.partition('.')
  return (f'{folder}/{stem}' if folder else stem), suffix.lower()


@dataclasses.dataclass
class _Sample:
  key: str
  image: tuple[int, int] | None = None  # (offset, size) of the image member's data.
  image_name: str = ''
  label: int = -1


def _read_label(archive: tarfile.TarFile, member: tarfile.TarInfo) -> int:
  data = archive.extractfile(member).read()
  try:
    return int(data.decode().strip())
  except ValueError:
    return -1


def _samples(archive: tarfile.TarFile, file_size: int) -> tuple[list[_Sample], str]:
  """The shard's samples in order, and '' or what damage ended the reading: where the archive
  is cut short, the sample whose data runs past the end is dropped with everything after it."""
  samples, current = [], None
  members = iter(archive)
  while True:
    member = None
    try:
      member = next(members)
      if member.offset_data + member.size > file_size:
        raise EOFError(f'{member.name} ends past the end of the file')
    except StopIteration:
      break
    except (tarfile.TarError, OSError, EOFError) as e:
      # The sample being read is whole only if the damage is in the next sample's members.
      next_key = None if member is None else _key_and_suffix(member.name)[0]
      if current is not None and next_key not in (None, current.key):
        samples.append(current)
      return samples, f'damaged after {samples[-1].key if samples else "its start"} ({e})'
    if not member.isfile():
      continue
    key, suffix = _key_and_suffix(member.name)
    if current is None or key != current.key:
      if current is not None:
        samples.append(current)
      current = _Sample(key)
    if suffix in IMAGE_SUFFIXES and current.image is None:
      current.image, current.image_name = (member.offset_data, member.size), member.name
    elif suffix in LABEL_SUFFIXES:
      current.label = _read_label(archive, member)
  if current is not None:
    samples.append(current)
  return samples, ''


@dataclasses.dataclass(frozen=True)
class ShardIndex:
  """What a shard holds: its image samples' data spans and labels, and a count of the rest."""
  spans: np.ndarray  # (n, 2) int64: offset and size of each image member's data.
  labels: np.ndarray  # (n,) int64, -1 without a label.
  names: list[str]  # The n image members' names.
  without_image: int  # Samples skipped for having no image.
  damage: str = ''  # Why reading stopped before the end ('damaged after KEY (error)'), or ''.


def index_shard(shard: str) -> ShardIndex:
  """The shard's member table, read from its headers."""
  with storage.open_read_ahead(shard) as f:
    file_size = f.seek(0, io.SEEK_END)
    f.seek(0)
    try:
      archive = tarfile.open(fileobj=f, mode='r:')
    except tarfile.TarError as e:
      raise ShardError(f'{shard} is not an uncompressed tar archive (WebDataset shard): '
                       f'{e}.') from e
    samples, damage = _samples(archive, file_size)
    rows, names, without_image = [], [], 0
    for sample in samples:
      if sample.image is None:
        without_image += 1
        continue
      rows.append((*sample.image, sample.label))
      names.append(sample.image_name)
  table = np.asarray(rows, np.int64).reshape(-1, 3)
  return ShardIndex(table[:, :2], table[:, 2], names, without_image, damage)


# ------------------------------------------------------------------------------ the index cache
def cache_dir() -> storage.Path:
  """Where indexes go when the shards' folder is not writable: `$CAPI_JAX_CACHE/wds_index`
  (gs:// allowed, then shared by the hosts), default ~/.cache/capi_jax/wds_index."""
  return storage.cache_dir('wds_index')


def index_files(shard: str) -> tuple[storage.Path, storage.Path]:
  """The places of `shard`'s cached index, in the order they are tried: beside the shard (the
  place every host of a pod reads, where the data is), then `cache_dir()`, named by a hash of
  the shard's path (one folder for every dataset)."""
  shard = storage.path(shard)
  digest = hashlib.sha256(os.fspath(shard).encode()).hexdigest()[:16]
  return (shard.parent / INDEX_FOLDER / f'{shard.name}.npz',
          cache_dir() / f'{digest}-{shard.name}.npz')


def _identity(shard: str) -> dict[str, Any]:
  """What a cached index must have been made from: this shard path, size and version. Taken
  before the shard is read: a shard rewritten while it is indexed is indexed again next time."""
  stat = storage.stat(shard)
  return {'format': _INDEX_FORMAT, 'shard': os.fspath(storage.path(shard)), 'size': stat.size,
          'version': stat.version}


def _encode(index: ShardIndex, identity: dict[str, Any]) -> bytes:
  out = io.BytesIO()
  np.savez_compressed(out, identity=json.dumps(identity, sort_keys=True), spans=index.spans,
                      labels=index.labels, names=np.asarray(index.names, dtype=str),
                      without_image=index.without_image, damage=index.damage)
  return out.getvalue()


def _decode(data: bytes, identity: dict[str, Any]) -> ShardIndex | None:
  """The index in `data` if it was made from `identity`, else None; raises if `data` is damaged
  (zip's CRCs catch a changed byte, a cut file has no directory)."""
  with np.load(io.BytesIO(data), allow_pickle=False) as saved:
    if json.loads(str(saved['identity'])) != identity:
      return None
    return ShardIndex(saved['spans'], saved['labels'], saved['names'].tolist(),
                      int(saved['without_image']), str(saved['damage']))


def _load_cached(shard: str, identity: dict[str, Any]) -> ShardIndex | None:
  for place in index_files(shard):
    try:
      data = place.read_bytes()
    except FileNotFoundError:
      continue
    except Exception as e:  # pylint: disable=broad-except  (unreadable: as good as absent)
      logger.debug('Cannot read %s: %s', place, e)
      continue
    try:
      index = _decode(data, identity)
    except Exception as e:  # pylint: disable=broad-except
      logger.warning('Index %s of %s is damaged (%s): ignored, the shard is indexed again.',
                     place, shard, e)
      continue
    if index is not None:
      return index
  return None


def _store(shard: str, data: bytes) -> bool:
  """Writes a shard's encoded index at the first of its places that takes it; False if none."""
  for place in index_files(shard):
    try:
      storage.makedirs(place.parent)
      storage.write_atomic(place, data)
      return True
    except Exception as e:  # pylint: disable=broad-except  (read-only data, a full disk, ...)
      logger.debug('Cannot write %s: %s', place, e)
  return False


def _cached_or_built(shard: str) -> tuple[ShardIndex, str]:
  """The shard's index and where it came from: 'cache', 'built' or 'not stored'."""
  identity = _identity(shard)
  index = _load_cached(shard, identity)
  if index is not None:
    return index, 'cache'
  index = index_shard(shard)
  return index, 'built' if _store(shard, _encode(index, identity)) else 'not stored'


@dataclasses.dataclass(frozen=True)
class IndexShare:
  """This process's part in indexing the shards when several processes (hosts) start together:
  it indexes shards i with i % count == index and caches them, calls `wait` (which returns once
  every process has called it), then reads the other shards' indexes from the cache, indexing
  any it does not find there itself (a cache that is not shared: correct, just slower)."""
  index: int = 0
  count: int = 1
  wait: Callable[[], None] = lambda: None


class _Progress:
  """Counts indexed shards by origin; logs them every _PROGRESS_S while indexing takes long."""

  def __init__(self, spec: str, total: int):
    self.spec, self.total = spec, total
    self.origins = collections.Counter()
    self._next_report = time.monotonic() + _PROGRESS_S

  def tick(self, origin: str) -> None:
    self.origins[origin] += 1
    if time.monotonic() >= self._next_report:
      self._next_report = time.monotonic() + _PROGRESS_S
      logger.info('Indexing wds:%s: %d of %d shards (%d from the index cache).', self.spec,
                  sum(self.origins.values()), self.total, self.origins['cache'])


def index_shards(shards: list[str], spec: str, share: IndexShare = IndexShare()
                 ) -> list[ShardIndex]:
  """Every shard's index, from the cache or read from the shard, INDEX_THREADS at a time."""
  progress = _Progress(spec, len(shards))
  found = {}

  def index_all(numbers: list[int]) -> None:
    with concurrent.futures.ThreadPoolExecutor(INDEX_THREADS) as pool:
      for i, (index, origin) in zip(numbers, pool.map(_cached_or_built,
                                                      [shards[i] for i in numbers])):
        found[i] = index
        progress.tick(origin)

  index_all([i for i in range(len(shards)) if i % share.count == share.index])
  share.wait()
  index_all([i for i in range(len(shards)) if i % share.count != share.index])
  indexes = [found[i] for i in range(len(shards))]
  for shard, index in zip(shards, indexes):
    if index.damage:
      logger.warning('Shard %s is %s: its samples up to there are used.', shard, index.damage)
  if progress.origins['not stored']:
    logger.warning('wds:%s: the indexes of %d shards could not be written beside them nor in '
                   '%s: every start reads them again.', spec, progress.origins['not stored'],
                   cache_dir())
  return indexes


class WebDatasetSource:
  """Samples of WebDataset tar shards, read at random by offset (see the module docstring)."""

  def __init__(self, spec: str, split: str, share: IndexShare = IndexShare()):
    self.shards = shard_paths(spec, split)
    indexes = index_shards(self.shards, spec, share)
    self._spans = np.concatenate([index.spans for index in indexes])
    self._labels = np.concatenate([index.labels for index in indexes])
    self._names = [name for index in indexes for name in index.names]
    self._owner = np.concatenate([np.full(len(index.names), i, np.int32)
                                  for i, index in enumerate(indexes)])
    without_image = sum(index.without_image for index in indexes)
    if without_image:
      logger.warning('wds:%s: %d samples without an image (%s) are skipped.', spec,
                     without_image, ', '.join(IMAGE_SUFFIXES))
    if not len(self._names):
      raise ShardError(f'wds:{spec} ({len(self.shards)} shards) holds no sample with an image '
                       f'({", ".join(IMAGE_SUFFIXES)}).')
    present = sorted(set(int(l) for l in self._labels) - {-1})
    self.num_classes = present[-1] + 1 if present else 0
    self.class_names = [str(i) for i in range(self.num_classes)]
    self.skipped_without_image = without_image
    self.description = (f'wds:{spec} split {split!r} ({len(self)} images in '
                        f'{len(self.shards)} shards)')

  def __len__(self) -> int:
    return len(self._names)

  def __getitem__(self, index: int) -> dict[str, Any]:
    shard = int(self._owner[index])
    offset, size = (int(x) for x in self._spans[index])
    name = f'{self.shards[shard]}:{self._names[index]}'
    try:  # Reader threads read at once: no shared file object (its seek + read would race).
      data = storage.read_range(self.shards[shard], offset, size)
      if len(data) != size:
        raise EOFError(f'{len(data)} of {size} bytes: the shard shrank since it was indexed')
    except Exception as e:  # pylint: disable=broad-except
      data = e  # A vanished or unreadable shard is a bad record (skipped, counted), not a crash.
    return {'image': data, 'label': int(self._labels[index]), 'name': name}


def write_shards(samples: list[tuple[bytes, str, int]], pattern: str, per_shard: int) -> list[str]:
  """Writes (image bytes, image suffix, label) samples as WebDataset shards `pattern % i` (the
  tests' and `prepare_data`'s writer): members `<key>.<suffix>` and `<key>.cls`."""
  paths = []
  for shard, start in enumerate(range(0, len(samples), per_shard)):
    path = pattern % shard
    with storage.staged_file(path) as local, tarfile.open(local, 'w') as archive:
      for i, (data, suffix, label) in enumerate(itertools.islice(samples, start,
                                                                 start + per_shard)):
        key = f'{start + i:08d}'
        for member, payload in ((f'{key}.{suffix}', data), (f'{key}.cls', str(label).encode())):
          info = tarfile.TarInfo(member)
          info.size = len(payload)
          archive.addfile(info, io.BytesIO(payload))
    paths.append(path)
  return paths
