r"""Features of a dataset, written to disk in shards: any encoder, any source, resumable.

  python -m capi_jax.extract --checkpoint=/tmp/capi_tiny --dataset=fashion_mnist --split=test \
      --output=/tmp/capi_tiny_features
  python -m capi_jax.extract --checkpoint=capi_vitl14_lvd --dataset='wds:/data/in1k/{0000..0146}.tar' \
      --resolution=224 --outputs=global_repr --output=gs://bucket/in1k_capi

`--checkpoint` is anything `capi_jax.load` reads (a run of any method, a convert output or an
official file with `--config`, a release name); `--dataset` any source of `data/sources.py`
(fashion_mnist, folder:, tfds:, wds:, hf:, synthetic). Each image is resized (shorter side to
`--resolution`, bicubic) and centre-cropped, then encoded (float32 by default).

Output (local or gs://): `features-<k>-of-<n>.npz`, shard k holding the dataset's records
[k * shard_size, (k + 1) * shard_size): the chosen outputs (float32, `--outputs`), 'index' (the
record's position) and 'label' of every decodable record (undecodable ones are skipped and
counted), and `manifest.json` (what was extracted, counts) written last. A shard appears whole or
not at all; a rerun with the same flags skips the shards already there (resume after a kill).
A progress line per shard: images done, images/s, time left.

Several processes (a TPU pod's hosts, SLURM tasks, `launch/local_multiprocess.py`; launched as
for training): each encodes with its own devices and writes shards k = its index mod the process
count; process 0 writes the manifest once every process is done. Any process count resumes any
earlier extraction. Threads read and decode the next batch's images while one batch is encoded,
and every forward holds `--batch_size` images (padded with blank ones): one compile.
"""

from collections.abc import Iterable, Iterator, Sequence
import concurrent.futures
import io
import itertools
import json
import time
from typing import Any

from absl import flags
from absl import logging as absl_logging
import jax
from jax.experimental import multihost_utils
import numpy as np

from capi_jax import api
from capi_jax.base import cli
from capi_jax.base import storage
from capi_jax.data import sources
from capi_jax.data import transforms
from capi_jax.engine import distributed

READ_THREADS = 8


def shard_name(k: int, n: int) -> str:
  return f'features-{k:05d}-of-{n:05d}.npz'


def _pixels(source, index: int, resolution: int) -> tuple[np.ndarray | None, int]:
  """(uint8 (resolution, resolution, 3) or None when undecodable, label) of record `index`."""
  decoded = sources.decode(source[index])
  if decoded is None:
    return None, -1
  image = transforms.resize_shorter_side(decoded['image'], resolution)
  return np.asarray(transforms.center_crop(image, resolution)), int(decoded['label'])


def _write_npz(path, arrays: dict[str, np.ndarray]) -> None:
  buffer = io.BytesIO()
  np.savez(buffer, **arrays)
  storage.write_atomic(path, buffer.getvalue())


def shard_count(n_records: int, shard_size: int) -> int:
  return -(-n_records // shard_size)


def shard_records(k: int, n_records: int, shard_size: int) -> range:
  """The records of output shard `k`."""
  return range(k * shard_size, min((k + 1) * shard_size, n_records))


def _read_ahead(pool: concurrent.futures.Executor, source, resolution: int,
                work: Iterable[tuple[int, range]]) -> Iterator[tuple[int, range, list]]:
  """(shard, chunk, [(pixels or None, label)]) for each (shard, chunk) of `work`, the next
  chunk's images already being read and decoded while the caller encodes this one."""
  pending = None
  for k, chunk in work:
    submitted = k, chunk, pool.map(lambda i: _pixels(source, i, resolution), chunk)
    if pending is not None:
      yield pending[0], pending[1], list(pending[2])
    pending = submitted
  if pending is not None:
    yield pending[0], pending[1], list(pending[2])


def extract(encoder: api.Encoder, source, output: str, *, resolution: int,
            outputs: Sequence[str] = api.OUTPUTS, shard_size: int = 10_000,
            batch_size: int = 256, process_index: int = 0, process_count: int = 1,
            log=print) -> int:
  """Writes this process's shards of `output` (see the module docstring): shard k when
  k % process_count == process_index, skipping those already written.

  Every forward sees `batch_size` images (the last ones of a shard, or a batch with skipped
  records, padded with blank images): one compile for the whole extraction.

  Returns:
    The number of shards written.
  """
  out = storage.path(output)
  storage.makedirs(out)
  n_records = len(source)
  n_shards = shard_count(n_records, shard_size)
  todo = [k for k in range(process_index, n_shards, process_count)
          if not (out / shard_name(k, n_shards)).exists()]  # Others were written whole before.
  work = ((k, chunk) for k in todo
          for chunk in _chunks(shard_records(k, n_records, shard_size), batch_size))
  start, done = time.perf_counter(), 0
  with concurrent.futures.ThreadPoolExecutor(READ_THREADS) as pool:
    read = _read_ahead(pool, source, resolution, work)
    for written, (k, chunks) in enumerate(itertools.groupby(read, key=lambda r: r[0]), 1):
      parts: dict[str, list[np.ndarray]] = {}
      kept_index, kept_label = [], []
      for _, chunk, pixels in chunks:
        good = [(i, p, l) for i, (p, l) in zip(chunk, pixels) if p is not None]
        if not good:
          continue
        batch = np.zeros((batch_size, resolution, resolution, 3), np.uint8)
        batch[:len(good)] = [p for _, p, _ in good]
        for name, value in encoder(batch, outputs).items():
          parts.setdefault(name, []).append(value[:len(good)])
        kept_index += [i for i, _, _ in good]
        kept_label += [l for _, _, l in good]
      arrays = {name: np.concatenate(v) for name, v in parts.items()}
      arrays.update(index=np.asarray(kept_index, np.int64),
                    label=np.asarray(kept_label, np.int64))
      _write_npz(out / shard_name(k, n_shards), arrays)
      done += len(shard_records(k, n_records, shard_size))
      rate = done / (time.perf_counter() - start)
      left = sum(len(shard_records(j, n_records, shard_size)) for j in todo[written:])
      log(f'[extract] shard {k + 1}/{n_shards} written ({len(kept_index)} images); '
          f'{rate:.1f} images/s, about {left / max(rate, 1e-9):.0f} s left')
  return len(todo)


def _chunks(records: range, size: int) -> list[range]:
  return [records[b:b + size] for b in range(0, len(records), size)]


def write_manifest(source, output: str, *, resolution: int, outputs: Sequence[str],
                   shard_size: int) -> dict[str, Any]:
  """Counts the images of every shard of `output` (reading only their 'index' arrays) and
  writes `manifest.json`, last.

  Returns:
    The manifest: num_images (written), skipped (undecodable), shards, outputs, resolution.
  """
  out = storage.path(output)
  n_records = len(source)
  n_shards = shard_count(n_records, shard_size)
  total = 0
  for k in range(n_shards):
    with storage.path(out / shard_name(k, n_shards)).open('rb') as f:
      total += len(np.load(f)['index'])  # An .npz member is read alone, not the features.
  manifest = {'source': source.description, 'num_records': n_records, 'num_images': total,
              'skipped': n_records - total, 'shards': n_shards, 'shard_size': shard_size,
              'outputs': list(outputs), 'resolution': resolution}
  storage.write_atomic(out / 'manifest.json', json.dumps(manifest, indent=2))
  return manifest


def main(argv: Sequence[str]) -> None:
  del argv
  # capi_jax's own lines; libraries (Orbax logs every restore step) at WARNING.
  absl_logging.set_verbosity(absl_logging.WARNING)
  fl = flags.FLAGS
  distributed.initialize()  # Several processes (launch/): each writes its share of the shards.
  try:
    manifest = _extract_and_count(fl)
  except BaseException as e:
    distributed.finished(e)
    raise
  distributed.finished(None)
  if manifest is not None:
    print(f'[extract] {manifest["num_images"]} images of {manifest["source"]} in '
          f'{manifest["shards"]} shards at {fl.output} ({manifest["skipped"]} skipped)')


def _extract_and_count(fl) -> dict[str, Any] | None:
  """This process's shards; then, once every process is done, process 0 writes the manifest
  and returns it (None elsewhere)."""
  encoder = api.load(fl.checkpoint, fl.config or None, which=fl.model,
                     compute_dtype=fl.compute_dtype)
  resolution = fl.resolution or encoder.config.data.image_size
  source = sources.make_source(fl.dataset, fl.split, fl.data_dir, resolution)
  outputs = tuple(o.strip() for o in fl.outputs.split(',') if o.strip())
  extract(encoder, source, fl.output, resolution=resolution, outputs=outputs,
          shard_size=fl.shard_size, batch_size=fl.batch_size,
          process_index=jax.process_index(), process_count=jax.process_count())
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices('capi_jax extract: every shard written')
  if jax.process_index():
    return None
  return write_manifest(source, fl.output, resolution=resolution, outputs=outputs,
                        shard_size=fl.shard_size)


if __name__ == '__main__':
  flags.DEFINE_string('checkpoint', None, 'What capi_jax.load reads: a run, a convert output, '
                      'an official file (with --config) or a release name.')
  flags.DEFINE_string('config', '', 'Config file describing the architecture (official files, '
                      'convert outputs); a run\'s own config by default.')
  flags.DEFINE_string('dataset', None, 'A data source string (fashion_mnist, folder:, tfds:, '
                      'wds:, hf:, synthetic).')
  flags.DEFINE_string('split', 'train', 'The split.')
  flags.DEFINE_string('data_dir', '', 'data_dir for tfds: / fashion_mnist.')
  flags.DEFINE_string('output', None, 'Output folder (local or gs://).')
  flags.DEFINE_string('outputs', ','.join(api.OUTPUTS), 'Comma-separated outputs to keep.')
  flags.DEFINE_integer('resolution', 0, 'Image side; default the config\'s data.image_size.')
  flags.DEFINE_integer('shard_size', 10_000, 'Records per output shard.')
  flags.DEFINE_integer('batch_size', 256, 'Images per forward.')
  flags.DEFINE_enum('model', 'ema', ['ema', 'student'], 'Which encoder of a training run.')
  flags.DEFINE_string('compute_dtype', 'float32', 'The model\'s compute dtype.')
  flags.mark_flags_as_required(['checkpoint', 'dataset', 'output'])
  cli.run(main)
