"""Random-access image sources selected by one string, and robust decoding to RGB.

`make_source(dataset, split, data_dir)` understands:
- `fashion_mnist` / `fashion_mnist:DIR`: Fashion-MNIST IDX files (`.gz` or raw) in DIR, default
  `data_dir` or /usr/share/datasets/fashion-mnist (Debian's `dataset-fashion-mnist`).
  Splits 'train' (60k) and 'test' (10k); grey 28x28 images, labels 0..9.
- `tfds:NAME`: a TFDS dataset prepared in ArrayRecord format (`tfds build NAME
  --file_format=array_record`), read with `tfds.data_source` (no TensorFlow needed). Any TFDS
  split string works ('train', 'validation', 'train[:10%]'). The first `Image` feature is the
  image; a `label` feature, if any, is the label. Images are decoded here, not by TFDS, so that a
  corrupt record is skipped rather than fatal.
- `folder:PATH`: JPEG / PNG / WebP files. If PATH has a sub-folder named like the split
  (`PATH/train/`, `PATH/val/`, ...), that is the split; otherwise PATH itself is the 'train'
  split and other splits are an error. Inside the split folder, first-level sub-folders are
  classes (label = index in sorted order, like torchvision's ImageFolder; files are found
  recursively below them); a folder with no sub-folders is one unlabelled set (label -1).
  Hidden files and folders (names starting with ".") are ignored; symbolic links are followed,
  but each real folder and file is read once (a link loop is skipped with a warning).
- `synthetic`: random pixels (1M records, deterministic per index), for benchmarks.
Every DIR / PATH / data_dir may be gs:// (a TFDS ArrayRecord dataset there is read with random
access; a folder there costs one request per image: prepare it with `capi_jax.prepare_data`).

Problems with a dataset (missing files, an unknown name, damaged data) raise
`DatasetNotFoundError` / `DatasetError`, user errors whose message names the fix.

WebDataset tar shards: `wds:PATTERN` (brace ranges / lists, globs, `{split}`, local or gs://;
`data/wds.py`), read at random by offset like the others. Hugging Face datasets: `hf:NAME_OR_PATH`
or the official `hf://ORG/NAME?split=...&img_field=...` (`data/hf.py`, the `datasets` library).
Weighted mixtures of any of these: `mix:0.7*wds:A/{0000..0009}.tar|0.3*folder:B`
(`data/mixture.py`).

Every source has `description`, `num_classes` and `class_names` (label -> name; [] when
unlabelled) and returns records `{'image': bytes | uint8 array, 'label': int, 'name': str}`;
`decode(record)` turns one into `{'image': PIL RGB image, 'label': int32}` or None when the
record cannot be decoded (logged with its name and counted in `skipped_records()`).
"""

import gzip
import io
import logging
import os
import struct
import threading
import time
from typing import Any

from etils import epath
import numpy as np
from PIL import Image

from capi_jax.base import errors
from capi_jax.base import storage
from capi_jax.data import hf
from capi_jax.data import mixture
from capi_jax.data import wds

logger = logging.getLogger(__name__)

FASHION_MNIST_DIR = '/usr/share/datasets/fashion-mnist'
FASHION_MNIST_CLASSES = ('T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal',
                         'Shirt', 'Sneaker', 'Bag', 'Ankle boot')
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.webp')
SYNTHETIC_SIZE = 1_000_000
# After this many undecodable records in a row, a process stops with an error instead of
# looping forever over an unreadable dataset (scattered bad files in a shuffled stream never
# come close).
_MAX_CONSECUTIVE_SKIPS = 100

Record = dict[str, Any]


class DatasetNotFoundError(errors.UserError, FileNotFoundError):
  """The dataset named in the config is not where it should be."""


class DatasetError(errors.UserError, ValueError):
  """The dataset's name or data is unusable (unknown kind, split, damaged files)."""


class FashionMnistSource:
  """Fashion-MNIST from local IDX files: records with a (28, 28) uint8 image and a label."""

  _PREFIX = {'train': 'train', 'test': 't10k'}

  def __init__(self, root: str, split: str):
    if split not in self._PREFIX:
      raise DatasetError(f'Fashion-MNIST has splits {sorted(self._PREFIX)}, not {split!r}.')
    prefix = self._PREFIX[split]
    self.images = _read_idx(_find_idx(root, f'{prefix}-images-idx3-ubyte'), ndim=3)
    self.labels = _read_idx(_find_idx(root, f'{prefix}-labels-idx1-ubyte'), ndim=1)
    if len(self.images) != len(self.labels):
      raise DatasetError(f'Fashion-MNIST in {root}: {len(self.images)} images but '
                       f'{len(self.labels)} labels for split {split!r}; the files are damaged.')
    self.class_names = list(FASHION_MNIST_CLASSES)
    self.num_classes = len(self.class_names)
    self.description = f'fashion_mnist:{root} split {split!r} ({len(self)} images)'

  def __len__(self) -> int:
    return len(self.images)

  def __getitem__(self, index: int) -> Record:
    return {'image': self.images[index], 'label': int(self.labels[index]),
            'name': f'fashion_mnist[{index}]'}


def _find_idx(root: str, stem: str) -> epath.Path:
  for name in (f'{stem}.gz', stem):
    if (path := storage.path(root) / name).is_file():
      return path
  raise DatasetNotFoundError(
      f'Fashion-MNIST file {stem}[.gz] not found in {root!r}. Install Debian\'s '
      f'`dataset-fashion-mnist` package (files in {FASHION_MNIST_DIR}) or give the folder '
      'holding the four IDX files as `fashion_mnist:DIR`.')


def _read_idx(path: epath.Path, ndim: int) -> np.ndarray:
  """Reads an unsigned-byte IDX file (the MNIST format): (n, ...) uint8."""
  try:
    data = path.read_bytes()
    if path.suffix == '.gz':
      data = gzip.decompress(data)
    zero, dtype_code, dims = struct.unpack('>HBB', data[:4])
    shape = struct.unpack(f'>{dims}I', data[4:4 + 4 * dims])
    if zero != 0 or dtype_code != 0x08 or dims != ndim:
      raise ValueError(f'header says dtype 0x{dtype_code:02x}, {dims} dims; expected uint8 with '
                       f'{ndim} dims')
    array = np.frombuffer(data, np.uint8, count=int(np.prod(shape)), offset=4 + 4 * dims)
  except (OSError, EOFError, ValueError, struct.error) as e:
    raise DatasetError(f'Cannot read IDX file {path}: {e}. Re-download or reinstall it.') from e
  return array.reshape(shape)


class FolderSource:
  """Image files below a folder; records carry the encoded bytes, read lazily."""

  def __init__(self, root: str, split: str):
    split_dir = _folder_split_dir(root, split)
    self.paths, self.labels, self.class_names = _scan_images(split_dir)
    self.num_classes = len(self.class_names)
    self.description = (f'folder:{split_dir} ({len(self.paths)} images, '
                        f'{self.num_classes or "no"} classes)')

  def __len__(self) -> int:
    return len(self.paths)

  def __getitem__(self, index: int) -> Record:
    path = self.paths[index]
    try:
      if storage.is_gcs(path):
        data = storage.path(path).read_bytes()
      else:
        with open(path, 'rb') as f:
          data = f.read()
    except OSError as e:  # A vanished or unreadable file is a bad record, not a crash.
      data = e
    return {'image': data, 'label': self.labels[index], 'name': path}


def _folder_split_dir(root: str, split: str) -> epath.Path:
  path = storage.path(root)
  if not path.is_dir():
    raise DatasetNotFoundError(f'Image folder {root!r} does not exist; check the path in '
                               "`folder:PATH` (config.data.dataset, or an evaluation set's "
                               '`dataset`).')
  if (path / split).is_dir():
    return path / split
  if split == 'train':
    return path
  raise DatasetNotFoundError(
      f'Image folder {root!r} has no sub-folder {split!r} for split {split!r}. Put that split\'s '
      f'images in {path / split}/ (optionally in class sub-folders), or choose an existing split.')


def _walk_order(relative: str) -> tuple[tuple[int, str], ...]:
  """Sort key of a '/'-separated path: sorted `os.walk` order (a folder's files before its
  sub-folders, each by name), so that a folder and its gs:// copy give the same order."""
  *folders, name = relative.split('/')
  return tuple((1, f) for f in folders) + ((0, name),)


_LAYOUT_RULE = ('A folder with sub-folders is read as one class per sub-folder (images directly '
                'in it are ignored); a folder without sub-folders is one unlabelled set. Names '
                "starting with '.' are ignored.")
_SCAN_PROGRESS_S = 10.0  # A long scan (a big local folder, a slow file system) logs this often.


def _hidden(name: str) -> bool:
  """Hidden files and folders ('.thumbs/', macOS' '._x.jpg') are never images of the set."""
  return name.startswith('.')


class _ScanProgress:
  """Counts a scan's folders and images, logs them every _SCAN_PROGRESS_S, collects skipped
  symbolic links (loops and second paths to folders already read)."""

  def __init__(self, top: epath.Path):
    self.top, self.folders, self.images = top, 0, 0
    self.skipped_links: list[str] = []
    self.duplicate_files = 0
    self._next_report = time.monotonic() + _SCAN_PROGRESS_S

  def skip_link(self, path: str) -> None:
    self.skipped_links.append(
        f'{path} -> {os.readlink(path)}' if os.path.islink(path) else path)

  def tick(self, folders: int, images: int) -> None:
    self.folders += folders
    self.images += images
    if time.monotonic() >= self._next_report:
      self._next_report = time.monotonic() + _SCAN_PROGRESS_S
      logger.info('Scanning %s: %d folders, %d images so far.', self.top, self.folders,
                  self.images)


def _encloses(folder: str, path: str) -> bool:
  """Whether real path `folder` is `path` or one of its parents."""
  return (path + os.sep).startswith(folder.rstrip(os.sep) + os.sep)


def _local_images(directory: str, progress: _ScanProgress, seen_dirs: set[str],
                  seen_files: set[str]) -> list[str]:
  """Image files below `directory` in sorted walk order (a folder's files before its
  sub-folders, each by name), following symbolic links but reading each real folder and file
  once: a link to a folder that encloses it (`again -> .`, `up -> ..`) or to one already read
  is skipped, so the scan ends."""
  found = []
  stack = [(directory, os.path.realpath(directory), False)]
  seen_dirs.add(stack[0][1])
  while stack:
    path, real, via_link = stack.pop()
    try:
      entries = sorted((e for e in os.scandir(path) if not _hidden(e.name)), key=lambda e: e.name)
    except OSError as e:
      logger.warning('Cannot list %s (%s); its images are left out.', path, e)
      continue
    folders = []
    for entry in entries:
      linked = via_link or entry.is_symlink()
      # Real paths cost system calls: only paths that pass through a link need them.
      entry_real = os.path.realpath(entry.path) if linked else os.path.join(real, entry.name)
      try:
        is_dir = entry.is_dir()
      except OSError:
        is_dir = False
      if is_dir:
        if entry_real in seen_dirs or _encloses(entry_real, real):
          progress.skip_link(entry.path)
          continue
        seen_dirs.add(entry_real)
        folders.append((entry.path, entry_real, linked))
      elif entry.name.lower().endswith(IMAGE_EXTENSIONS):
        if entry_real in seen_files:
          progress.duplicate_files += 1
          continue
        seen_files.add(entry_real)
        found.append(entry.path)
    progress.tick(1, len(found))
    stack += reversed(folders)
  return found


def _scan_images(split_dir: epath.Path) -> tuple[list[str], list[int], list[str]]:
  """(paths, labels, class_names), sorted so that every host sees the same order."""
  progress = _ScanProgress(split_dir)
  seen_dirs, seen_files = set(), set()

  def images_below(directory: epath.Path) -> list[str]:
    if storage.is_gcs(directory):  # One paged listing, in the order os.walk gives below.
      names = sorted((n for n in storage.list_files(directory)
                      if not any(_hidden(part) for part in n.split('/'))), key=_walk_order)
      found = [os.fspath(directory / n) for n in names if n.lower().endswith(IMAGE_EXTENSIONS)]
      progress.tick(0, len(found))
      return found
    return _local_images(os.fspath(directory), progress, seen_dirs, seen_files)

  visible = [d for d in split_dir.iterdir() if not _hidden(d.name)]
  class_dirs = sorted(d for d in visible if d.is_dir())
  if not storage.is_gcs(split_dir):  # A link to the folder or above is a loop, not a class.
    top = os.path.realpath(split_dir)
    for loop in [d for d in class_dirs if _encloses(os.path.realpath(d), top)]:
      progress.skip_link(os.fspath(loop))
      class_dirs.remove(loop)
  if class_dirs:
    loose = [f for f in visible if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS]
    if loose:
      logger.warning('%s: %d images directly in the folder are ignored because it has class '
                      'sub-folders (e.g. %s). %s', split_dir, len(loose), loose[0].name,
                      _LAYOUT_RULE)
    if not storage.is_gcs(split_dir):  # A link from one class into another is not followed.
      seen_dirs.update(os.path.realpath(d) for d in class_dirs)
    paths, labels = [], []
    for label, class_dir in enumerate(class_dirs):
      found = images_below(class_dir)
      paths += found
      labels += [label] * len(found)
    class_names = [d.name for d in class_dirs]
  else:
    paths = images_below(split_dir)
    labels, class_names = [-1] * len(paths), []
  if progress.skipped_links or progress.duplicate_files:
    logger.warning(
        '%s: skipped %d symbolic links to folders already read or enclosing them (e.g. %s) and '
        '%d second paths to image files already read; each real file is read once.', split_dir,
        len(progress.skipped_links), (progress.skipped_links or ['none'])[0],
        progress.duplicate_files)
  if not paths:
    raise DatasetNotFoundError(
        f'No images ({", ".join(IMAGE_EXTENSIONS)}) found in {split_dir}. Put the images there, '
        f'optionally in one sub-folder per class. {_LAYOUT_RULE}')
  return paths, labels, class_names


class TfdsSource:
  """A TFDS ArrayRecord dataset through `tfds.data_source`, images left encoded.

  The TFDS source is opened lazily in each process (it holds file handles, which do not travel
  to Grain's worker processes).
  """

  def __init__(self, name: str, split: str, data_dir: str):
    self._args = (name, split, data_dir or None)
    source = self._open()  # Fail here, in the main process, with a readable message.
    self.image_key, self.label_key, self.class_names = _tfds_keys(source.dataset_info, name)
    self.num_classes = len(self.class_names)
    self._length = len(source)
    self.description = f'tfds:{name} split {split!r} ({self._length} images)'

  def _open(self):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    name, split, data_dir = self._args
    try:
      info = tfds.builder(name, data_dir=data_dir).info
      image_keys = [k for k, f in info.features.items() if isinstance(f, tfds.features.Image)]
      source = tfds.data_source(name, split=split, data_dir=data_dir, download=False,
                                decoders={k: tfds.decode.SkipDecoding() for k in image_keys})
    except tfds.core.registered.DatasetNotFoundError as e:
      # Its message lists the whole TFDS catalogue; keep only the suggestion, if any.
      hint = ''.join(f' ({l.strip()})' for l in str(e).splitlines() if l.startswith('Did you'))
      raise DatasetNotFoundError(
          f'TFDS knows no dataset named {name!r}{hint}: check the name in `tfds:NAME` '
          "(config.data.dataset, or an evaluation set's `dataset`).") from None
    except Exception as e:  # TFDS raises many types (registration, missing files, formats).
      reason = ' '.join(str(e).strip().splitlines()[:3])
      raise DatasetNotFoundError(
          f'Cannot open TFDS dataset {name!r} split {split!r} in data_dir {data_dir or "(default)"}'
          f': {type(e).__name__}: {reason}. Prepare it in ArrayRecord format, e.g. `tfds build '
          f'{name} --file_format=array_record --data_dir=DIR` (ImageNet needs its archives in '
          'DIR/downloads/manual), and set config.data.data_dir=DIR.') from e
    self._source = source
    return source

  def __getstate__(self):
    return {k: v for k, v in self.__dict__.items() if k != '_source'}

  def __len__(self) -> int:
    return self._length

  def __getitem__(self, index: int) -> Record:
    source = self.__dict__.get('_source') or self._open()
    example = source[index]
    label = int(example[self.label_key]) if self.label_key else -1
    return {'image': example[self.image_key], 'label': label,
            'name': f'tfds:{self._args[0]}/{self._args[1]}[{index}]'}


def _tfds_keys(info, name: str) -> tuple[str, str | None, list[str]]:
  """(image feature, label feature or None, class names or [])."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  features = info.features
  image_keys = [k for k, f in features.items() if isinstance(f, tfds.features.Image)]
  if not image_keys:
    raise DatasetError(f'TFDS dataset {name!r} has no Image feature (features: {list(features)}).')
  label = features['label'] if 'label' in features else None
  class_names = label.names if isinstance(label, tfds.features.ClassLabel) else []
  return image_keys[0], ('label' if label is not None else None), class_names


class SyntheticSource:
  """Random uint8 pixels, deterministic per index; for benchmarks."""

  def __init__(self, image_size: int):
    self.image_size = image_size
    self.num_classes, self.class_names = 0, []
    self.description = f'synthetic ({SYNTHETIC_SIZE} random {image_size}x{image_size} images)'

  def __len__(self) -> int:
    return SYNTHETIC_SIZE

  def __getitem__(self, index: int) -> Record:
    rng = np.random.default_rng(index)
    shape = (self.image_size, self.image_size, 3)
    return {'image': rng.integers(0, 256, shape, dtype=np.uint8), 'label': -1,
            'name': f'synthetic[{index}]'}


def make_source(dataset: str, split: str, data_dir: str = '', image_size: int = 224,
                index_share: wds.IndexShare = wds.IndexShare()):
  """The random-access source named by `dataset` (see the module docstring); `index_share`:
  this process's part in indexing `wds:` shards when all processes make the source together."""
  kind, _, arg = dataset.partition(':')
  if kind == 'fashion_mnist':
    return FashionMnistSource(arg or data_dir or FASHION_MNIST_DIR, split)
  if kind == 'tfds' and arg:
    return TfdsSource(arg, split, data_dir)
  if kind == 'folder' and arg:
    return FolderSource(arg, split)
  if kind == 'synthetic':
    return SyntheticSource(image_size)
  if kind == 'wds' and arg:
    return wds.WebDatasetSource(arg, split, index_share)
  if kind == 'hf' and arg:
    return hf.HfSource(arg, split)
  if kind == 'mix' and arg:
    return mixture.MixtureSource(
        [(w, make_source(d, split, data_dir, image_size, index_share))
         for w, d in mixture.parse(arg)], arg)
  raise DatasetError(f'Unknown dataset {dataset!r}. Use fashion_mnist, fashion_mnist:DIR, '
                   'tfds:NAME, folder:PATH, wds:PATTERN, hf:NAME, mix:W*A|W*B or synthetic.')


# Per-process decoding statistics (each Grain worker process counts its own records).
_stats_lock = threading.Lock()
_stats = {'decoded': 0, 'skipped': 0, 'skipped_in_a_row': 0}


def skipped_records() -> int:
  """How many records this process skipped as undecodable so far."""
  return _stats['skipped']


def _count(name: str, error: Exception | None) -> None:
  """Counts one decoded (error None) or skipped record; logs skips, stops a hopeless stream."""
  with _stats_lock:
    if error is None:
      _stats['decoded'] += 1
      _stats['skipped_in_a_row'] = 0
      return
    _stats['skipped'] += 1
    _stats['skipped_in_a_row'] += 1
    skipped, in_a_row = _stats['skipped'], _stats['skipped_in_a_row']
  logger.warning('Skipping unreadable record %s (%s: %s); %d skipped so far in this process.',
                  name, type(error).__name__, error, skipped)
  if in_a_row >= _MAX_CONSECUTIVE_SKIPS:
    raise DatasetError(
        f'{in_a_row} records in a row could not be decoded as images (latest: {name}: '
        f'{type(error).__name__}: {error}). The dataset is damaged or is not an image dataset; '
        'check the path and the files, or remove the bad ones.')


def to_rgb(image: Image.Image) -> Image.Image:
  """Converts any PIL mode to 8-bit RGB (alpha dropped, as torchvision's loader does)."""
  if image.mode in ('I;16', 'I;16L', 'I;16B', 'I;16N', 'I', 'F'):
    # 16/32-bit greyscale: convert('RGB') would clip to 255; rescale the 16-bit range instead.
    array = np.asarray(image, dtype=np.float32)
    if image.mode != 'F':
      array = array / 257.0
    image = Image.fromarray(np.clip(np.rint(array), 0, 255).astype(np.uint8), mode='L')
  elif image.mode == 'P' and 'transparency' in image.info:
    image = image.convert('RGBA')  # Pillow asks for this step for palette images with alpha.
  return image if image.mode == 'RGB' else image.convert('RGB')


def decode(record: Record) -> dict[str, Any] | None:
  """`{'image': PIL RGB image, 'label': int32}` (and the record's 'index' if it has one), or
  None if the record cannot be decoded."""
  data = record['image']
  try:
    if isinstance(data, Exception):
      raise data
    if isinstance(data, np.ndarray):
      image = Image.fromarray(data)
    else:
      image = Image.open(io.BytesIO(data))
      image.load()  # Decode now, so that a truncated file fails here and not later.
    image = to_rgb(image)
  except Image.UnidentifiedImageError:
    # Pillow's own message names an anonymous BytesIO; say what is wrong with the data instead.
    _count(record['name'], ValueError(f'not a recognised image format ({len(data)} bytes)'))
    return None
  except Exception as e:  # pylint: disable=broad-except
    # Any decoder failure (truncated, corrupt, unsupported mode, decompression bomb) makes this
    # one record unusable; the pipeline skips it instead of killing a worker.
    _count(record['name'], e)
    return None
  _count(record['name'], None)
  decoded = {'image': image, 'label': np.int32(record['label'])}
  if 'index' in record:
    decoded['index'] = np.int32(record['index'])
  return decoded
