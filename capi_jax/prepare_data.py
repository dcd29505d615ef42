r"""Converts an image folder or a TFDS split into a resized ArrayRecord dataset.

  python -m capi_jax.prepare_data --input=folder:/data/imagenet --split=train,val \
      --output=/data/tfds --name=imagenet_256 --resize=256

writes the TFDS dataset DIR/NAME/1.0.0/ (dataset_info.json, features.json, label.labels.txt,
NAME-SPLIT.array_record-0000i-of-0000n, metadata.json) that training reads fast, without
TensorFlow, with config.data.dataset='tfds:NAME' and config.data.data_dir=DIR (evaluation sets
with dataset='tfds:NAME', e.g. config.evals.classif.train).

Input: any `capi_jax.data.sources` string (`folder:PATH`, `tfds:NAME` with --input_data_dir,
`fashion_mnist`), one or more splits. Images are decoded as training decodes them
(`sources.decode`): undecodable files are skipped, logged and counted (metadata.json `skipped`).

Features: `image` (encoded bytes, decoded by `sources.decode` when read), `label` (a ClassLabel
with the input's class names, e.g. a folder's class sub-folders; absent for unlabelled inputs)
and `file_name` (the input record's name, for tracing a record back to its file).

Images: with --resize > 0 every image becomes an RGB JPEG (--quality) whose shorter side is
--resize (bicubic, PIL, torchvision's Resize rounding); images whose shorter side is already at
most --resize keep their size (re-encoded): upscaling would add bytes, not information, and the
training crop is resized anyway. --resize=0 keeps the input's encoded bytes as they are (PNG
stays PNG; pixel-array inputs such as Fashion-MNIST become PNG).

Atomic: TFDS writes into DIR/NAME/incomplete.XXXXXX_1.0.0/ and renames it to 1.0.0 only after
every split is written, so a killed conversion leaves nothing that TFDS or the trainer opens
(delete the incomplete.* folder). An existing DIR/NAME/1.0.0 is never overwritten.

DIR may be gs://: TFDS's ArrayRecord writer writes local files only, so the dataset is prepared
in a local temporary folder (room for the whole output is needed there) and uploaded when
complete, `dataset_info.json` last: TFDS counts a version folder only once that file is in it.
"""

from collections.abc import Callable, Iterator, Sequence
import contextlib
import dataclasses
import functools
import io
import logging
import multiprocessing
import os
import re
import tempfile
import time
from typing import Any

from absl import app
from absl import flags

from capi_jax.base import cli
from capi_jax.base import errors
from capi_jax.base import storage
from capi_jax.data import sources
from capi_jax.data import transforms

logger = logging.getLogger(__name__)

VERSION = '1.0.0'
_LOG_EVERY = 10_000  # Images between progress lines.


@dataclasses.dataclass(frozen=True)
class Encoding:
  """How each image is written: `resize` (0 = original bytes) and JPEG `quality`."""
  resize: int
  quality: int


def encode(record: sources.Record, encoding: Encoding) -> dict[str, Any] | None:
  """One input record -> the output example `{'image': bytes, 'label', 'file_name'}`, or None
  when the record cannot be decoded (counted and logged by `sources.decode`)."""
  decoded = sources.decode(record)
  if decoded is None:
    return None
  image = decoded['image']
  if encoding.resize:
    if min(image.size) > encoding.resize:
      image = transforms.resize_shorter_side(image, encoding.resize)
    buffer = io.BytesIO()
    image.save(buffer, format='JPEG', quality=encoding.quality)
    data = buffer.getvalue()
  elif isinstance(record['image'], bytes):
    data = record['image']
  else:  # Pixel arrays (Fashion-MNIST) have no bytes to keep: lossless PNG.
    buffer = io.BytesIO()
    image.save(buffer, format='PNG')
    data = buffer.getvalue()
  return {'image': data, 'label': int(decoded['label']), 'file_name': _printable(record['name'])}


def _printable(name: str) -> str:
  """`name` as valid UTF-8 text: a file name that is not UTF-8 (Python keeps its bytes as
  surrogates) gets its odd bytes as backslash escapes, instead of failing the whole conversion
  with a UnicodeEncodeError."""
  return name.encode('utf-8', 'surrogateescape').decode('utf-8', 'backslashreplace')


class PrepareError(errors.UserError, ValueError):
  """The command's arguments are invalid (the dataset name, --resize, --quality)."""


class OutputExistsError(errors.UserError, FileExistsError):
  """The output dataset exists already (it is never overwritten)."""


# Each worker process's source and encoding, set once by `_init_worker`.
_worker: dict[str, Any] = {}


def _init_worker(source, encoding: Encoding) -> None:
  _worker.update(source=source, encoding=encoding)


def _encode_index(index: int) -> dict[str, Any] | None:
  return encode(_worker['source'][index], _worker['encoding'])


@contextlib.contextmanager
def _ordered_map(source, encoding: Encoding, workers: int) -> Iterator[Callable]:
  """A lazy, ordered map of `_encode_index` over `workers` processes (this one if <= 1).

  Processes rather than threads: the per-image Python work would serialise threads on the GIL.
  'spawn', not fork: workers start clean, whatever threads and locks the parent holds.
  """
  if workers <= 1:
    _init_worker(source, encoding)
    try:
      yield map
    finally:
      _worker.clear()
    return
  with multiprocessing.get_context('spawn').Pool(
      workers, initializer=_init_worker, initargs=(source, encoding)) as pool:
    yield functools.partial(pool.imap, chunksize=16)


def _examples(source, encoding: Encoding, workers: int, keys: Sequence[str], split: str,
              skipped: dict[str, int]) -> Iterator[tuple[int, dict[str, Any]]]:
  """(input index, example with `keys`) of every decodable record of `source`, in order;
  `skipped[split]` counts the others."""
  skipped[split] = 0
  start = time.perf_counter()
  with _ordered_map(source, encoding, workers) as map_fn:
    for index, example in enumerate(map_fn(_encode_index, range(len(source)))):
      if example is None:
        skipped[split] += 1
      else:
        yield index, {k: example[k] for k in keys}
      if (index + 1) % _LOG_EVERY == 0 or index + 1 == len(source):
        logger.info('%s: %d / %d images, %d skipped, %.0f images/s', split, index + 1,
                    len(source), skipped[split], (index + 1) / (time.perf_counter() - start))


def _class_names(split_sources: dict[str, Any]) -> list[str]:
  """The class names all splits share ([] if unlabelled); an error if they differ."""
  names = {split: list(source.class_names) for split, source in split_sources.items()}
  first, *others = names.values()
  if any(other != first for other in others):
    raise ValueError(f'The splits have different classes, so one label would mean different '
                     f'classes: {names}. Give every split the same class sub-folders.')
  return first


def _builder(name: str, output_dir: str, input_dataset: str, split_sources: dict[str, Any],
             encoding: Encoding, workers: int):
  """A TFDS builder (not registered) that writes `split_sources` as DIR/NAME/VERSION."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  class_names = _class_names(split_sources)
  features = {
      'image': tfds.features.Image(shape=(None, None, 3),
                                   encoding_format='jpeg' if encoding.resize else None),
      'file_name': tfds.features.Text(),
  }
  if class_names:
    features['label'] = tfds.features.ClassLabel(names=class_names)
  dataset_name = name
  description = (f'{input_dataset} converted by capi_jax.prepare_data: '
                 + (f'shorter side at most {encoding.resize} px, JPEG quality {encoding.quality}.'
                    if encoding.resize else 'original encoded images.'))

  class PreparedImages(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """The converted images; `metadata.json` records the input and the skipped records."""
    name = dataset_name
    VERSION = tfds.core.Version(VERSION)
    # No code folder, hence no download checksums to look up there (TFDS 4.9.10's look-up of a
    # package's folder also imports `importlib_resources`, which it installs for Python < 3.9).
    code_path = None

    def _info(self):
      return tfds.core.DatasetInfo(
          builder=self, description=description,
          features=tfds.features.FeaturesDict(features),
          # Input order: record i is the i-th decodable input image, whatever the run.
          disable_shuffling=True,
          metadata=tfds.core.MetadataDict(input=input_dataset, skipped={},
                                          **dataclasses.asdict(encoding)))

    def _split_generators(self, dl_manager):
      del dl_manager  # Nothing to download.
      return {split: self._generate_examples(split) for split in split_sources}

    def _generate_examples(self, split):
      return _examples(split_sources[split], encoding, workers, list(features), split,
                       self.info.metadata['skipped'])

  return PreparedImages(data_dir=output_dir, file_format='array_record')


def prepare(input_dataset: str, splits: Sequence[str], output_dir: str, name: str,
            encoding: Encoding, *, input_data_dir: str = '', shards: int = 0,
            workers: int = 1) -> dict[str, Any]:
  """Converts `splits` of `input_dataset` into the TFDS ArrayRecord dataset DIR/NAME/VERSION.

  Args:
    input_dataset: a `sources.make_source` string (folder:PATH, tfds:NAME, fashion_mnist).
    splits: the input splits to convert; each keeps its name.
    output_dir: the TFDS data_dir to write into (training's config.data.data_dir).
    name: the dataset's name (training's config.data.dataset = 'tfds:NAME').
    encoding: resize and JPEG quality.
    input_data_dir: the input's data_dir (for tfds:NAME inputs).
    shards: ArrayRecord files per split; 0 lets TFDS choose (files of 64 MiB to 1 GiB).
    workers: encoding processes.

  Returns:
    {'path': the dataset folder, 'num_examples': {split: n}, 'skipped': {split: n}}.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  if not re.fullmatch(r'[a-z][a-z0-9_]*', name):
    raise PrepareError(f'--name={name!r} is not a TFDS dataset name: use lower-case letters, digits '
                     'and underscores, starting with a letter (e.g. imagenet_256).')
  if encoding.resize < 0 or not 1 <= encoding.quality <= 100:
    raise PrepareError(f'--resize={encoding.resize} must be >= 0 (0 keeps the original images) and '
                     f'--quality={encoding.quality} in 1..100.')
  path = storage.path(output_dir) / name / VERSION
  if path.exists():
    raise OutputExistsError(f'{path} already exists; delete it to convert again, or choose another '
                          '--name or --output.')
  for stale in path.parent.glob(f'incomplete.*_{VERSION}'):
    logger.warning('%s was left by an interrupted conversion; it is not a dataset, delete it.',
                   stale)
  split_sources = {split: sources.make_source(input_dataset, split, input_data_dir)
                   for split in splits}
  for split, source in split_sources.items():
    logger.info('Converting %s as %s split %r', source.description, name, split)
  # TFDS makes a downloads/ folder even with nothing to download: keep it out of output_dir.
  with tempfile.TemporaryDirectory(prefix='capi_jax_prepare_') as scratch:
    build_dir = os.path.join(scratch, 'data') if storage.is_gcs(path) else os.fspath(output_dir)
    builder = _builder(name, build_dir, input_dataset, split_sources, encoding, workers)
    builder.download_and_prepare(
        download_dir=os.path.join(scratch, 'downloads'),
        download_config=tfds.download.DownloadConfig(num_shards=shards or None))
    if storage.is_gcs(path):
      logger.info('Uploading the dataset to %s', path)
      storage.upload_tree(os.path.join(build_dir, name, VERSION), path,
                          last=('dataset_info.json',))
  return {'path': str(path),
          'num_examples': {s: builder.info.splits[s].num_examples for s in split_sources},
          'skipped': dict(builder.info.metadata['skipped'])}


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  logging.getLogger('capi_jax').setLevel(logging.INFO)
  fl = flags.FLAGS
  result = prepare(fl.input, fl.split, fl.output, fl.name,
                   Encoding(resize=fl.resize, quality=fl.quality),
                   input_data_dir=fl.input_data_dir, shards=fl.shards, workers=fl.workers)
  print(f"Wrote {result['path']}: {result['num_examples']} images per split, "
        f"{result['skipped']} undecodable input images skipped.\n"
        f"Train with --config.data.dataset=tfds:{fl.name} --config.data.data_dir={fl.output}")


if __name__ == '__main__':
  flags.DEFINE_string('input', None, 'Input dataset: folder:PATH, tfds:NAME or fashion_mnist.')
  flags.DEFINE_string('input_data_dir', '', 'data_dir of a tfds:NAME input.')
  flags.DEFINE_list('split', ['train'], 'Input splits to convert (comma-separated).')
  flags.DEFINE_string('output', None, 'Output TFDS data_dir (training\'s config.data.data_dir).')
  flags.DEFINE_string('name', None, 'Output dataset name (training reads tfds:NAME).')
  flags.DEFINE_integer('resize', 256, 'Shorter side at most this many pixels; 0 keeps the '
                       'original encoded images.')
  flags.DEFINE_integer('quality', 90, 'JPEG quality of resized images (1..100).')
  flags.DEFINE_integer('shards', 0, 'ArrayRecord files per split; 0: TFDS chooses by size.')
  flags.DEFINE_integer('workers', os.cpu_count() or 1, 'Encoding processes.')
  flags.mark_flags_as_required(['input', 'output', 'name'])
  cli.run(main)
