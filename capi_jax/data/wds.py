r"""WebDataset tar shards as a random-access source (`wds:PATTERN`).

PATTERN names the shards, local or gs://: brace ranges and lists as WebDataset writes them
(`DIR/train-{0000..0147}.tar`, `DIR/{a,b}.tar`), shell globs (`DIR/*.tar`, expanded in sorted
order), and `{split}` for the split's name (`DIR/{split}-{0000..0009}.tar`); a pattern without
`{split}` is the 'train' split. Several patterns joined by `::` are read one after the other.

A sample is the group of consecutive members sharing a key (the member's path up to the first
dot of its file name, WebDataset's rule): its image is the member with an image extension
(jpg, jpeg, png, webp), its label the integer in a `cls` / `label` member (-1 without one).
Each shard's member table is read once, when the source is made (headers only: the reader seeks
over the data), so records are read at random by offset: the Grain pipeline's guarantees hold
unchanged (per-record determinism, shuffling, exact resume, each host its slice). A shard cut
short keeps the samples before the cut (a warning names it); a sample without an image is
skipped with a count; an undecodable image is skipped by the decoder like any bad record.
"""

from collections.abc import Iterator
import dataclasses
import fnmatch
import glob
import io
import itertools
import logging
import re
import tarfile
from typing import Any

import numpy as np

from capi_jax.base import errors
from capi_jax.base import storage

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = ('jpg', 'jpeg', 'png', 'webp')
LABEL_SUFFIXES = ('cls', 'cls.txt', 'label', 'label.txt', 'label.cls')
_GLOB_CHARS = re.compile(r'[*?\[]')
_BRACE = re.compile(r'\{([^{}]*)\}')


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
  missing = [p for p in paths if not storage.path(p).is_file()]
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


def _samples(archive: tarfile.TarFile, shard: str, file_size: int) -> Iterator[_Sample]:
  """The shard's samples in order; stops (with a warning) where the archive is cut short: the
  sample whose data runs past the end is dropped with everything after it."""
  current, last_whole = None, None
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
        yield current
        last_whole = current.key
      logger.warning('Shard %s is damaged after %s (%s): its samples up to there are used.',
                     shard, last_whole or 'its start', e)
      return
    if not member.isfile():
      continue
    key, suffix = _key_and_suffix(member.name)
    if current is None or key != current.key:
      if current is not None:
        yield current
        last_whole = current.key
      current = _Sample(key)
    if suffix in IMAGE_SUFFIXES and current.image is None:
      current.image, current.image_name = (member.offset_data, member.size), member.name
    elif suffix in LABEL_SUFFIXES:
      current.label = _read_label(archive, member)
  if current is not None:
    yield current


def index_shard(shard: str) -> tuple[np.ndarray, np.ndarray, list[str], int]:
  """(offsets, sizes, labels) int64 arrays of the shard's image samples, their names, and how
  many samples had no image."""
  with storage.path(shard).open('rb') as f:
    file_size = f.seek(0, io.SEEK_END)
    f.seek(0)
    try:
      archive = tarfile.open(fileobj=f, mode='r:')
    except tarfile.TarError as e:
      raise ShardError(f'{shard} is not an uncompressed tar archive (WebDataset shard): '
                       f'{e}.') from e
    rows, names, without_image = [], [], 0
    for sample in _samples(archive, shard, file_size):
      if sample.image is None:
        without_image += 1
        continue
      rows.append((*sample.image, sample.label))
      names.append(sample.image_name)
  table = np.asarray(rows, np.int64).reshape(-1, 3)
  return table[:, :2], table[:, 2], names, without_image


class WebDatasetSource:
  """Samples of WebDataset tar shards, read at random by offset (see the module docstring)."""

  def __init__(self, spec: str, split: str):
    self.shards = shard_paths(spec, split)
    spans, labels, self._names, owners, without_image = [], [], [], [], 0
    for i, shard in enumerate(self.shards):
      shard_spans, shard_labels, names, missing = index_shard(shard)
      spans.append(shard_spans)
      labels.append(shard_labels)
      self._names += names
      owners.append(np.full(len(names), i, np.int32))
      without_image += missing
    self._spans = np.concatenate(spans)
    self._labels = np.concatenate(labels)
    self._owner = np.concatenate(owners)
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
