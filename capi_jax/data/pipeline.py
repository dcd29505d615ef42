"""Grain input pipeline: resumable training loaders, batching in worker processes, global batches.

Training (`create_train_loader`), per host:
  source[process_index::process_count] -> shuffle (reshuffled every epoch) -> repeat forever
  -> decode (undecodable records become None and are dropped) -> random_map(the method's
  train transform: views, crops, masks) -> batch(global_batch / process_count) ->
  `num_workers` worker processes.
The random_map's generator is seeded from (seed, host) and the record's position in the
infinite shuffled stream, so augmentations and masks are reproducible, differ every epoch, and
a resumed iterator (`get_state` / `set_state`) yields exactly the batches an uninterrupted one
would. A skipped record shortens nothing: batching happens after the drop, so the next records
fill the batch, identically on every run.

Checkpointing the iterator with the model, in Orbax (grain 0.2.18):
  ocp.args.Composite(..., data_iter=grain.checkpoint.CheckpointSave(iterator))   # save
  ocp.args.Composite(..., data_iter=grain.checkpoint.CheckpointRestore(iterator))  # restore
with `grain.checkpoint.CheckpointHandler` registered for the 'data_iter' item
(`ocp.CheckpointManager(..., item_handlers={'data_iter': grain.checkpoint.CheckpointHandler()})`).
The handler writes one JSON file per process, so every host restores its own position.
A position saved with another `data.num_workers` is adapted by `adapt_iterator_state`.

Worker processes (`data.num_workers` > 0) ignore the signals a terminal or a scheduler sends to
the whole process group (the main process decides when to stop: it checkpoints first) and end
as soon as the main process is gone, even after a `kill -9` of it. The evaluations read through
the same `batched`, with every batch kept whole and in order (`whole_batches`).
"""

import logging
from multiprocessing import shared_memory
import os
import pathlib
import secrets
import signal
import threading
import time
from collections.abc import Mapping
from typing import Any

from absl import flags
import grain
import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np

from capi_jax.base import errors
from capi_jax.data import sources
from capi_jax.data import wds

logger = logging.getLogger(__name__)

# Threads per process that read and transform records (PIL releases the GIL while decoding
# and resizing, so threads overlap well even in a single process).
READ_THREADS = 8

Batch = dict[str, np.ndarray]


def _host_seeds(seed: int, process_index: int) -> tuple[int, int]:
  """(shuffle seed, augmentation seed), distinct per host so hosts' crops/masks are independent."""
  shuffle_seed, map_seed = np.random.SeedSequence([seed, process_index]).generate_state(2)
  return int(shuffle_seed), int(map_seed)


def _wait_for_all_processes() -> None:
  """Returns once every process of the run has called it (they all make the training source)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices('capi_jax: wds shards indexed')


def train_dataset(config: ml_collections.ConfigDict, transform: grain.transforms.RandomMap, *,
                  seed: int, process_index: int = 0, process_count: int = 1) -> grain.MapDataset:
  """This host's infinite stream of training examples made by `transform` (before batching).

  The transform receives decoded records `{'image', 'label', 'index'}`, 'index' being the
  image's position in the whole dataset (methods that must tell samples apart read it).
  """
  source = sources.make_source(
      config.data.dataset, config.data.split, config.data.data_dir, config.data.image_size,
      wds.IndexShare(process_index, process_count, _wait_for_all_processes))
  if len(source) < process_count:
    raise ValueError(f'{source.description} has fewer images than the {process_count} hosts.')
  shuffle_seed, map_seed = _host_seeds(seed, process_index)
  ds = grain.MapDataset.source(source).map_with_index(lambda i, record: {**record, 'index': i})
  ds = ds[process_index::process_count]
  logger.info('Training on %s: an epoch is %.1f steps of %d images; host %d of %d reads %d.',
              source.description, len(source) / config.train.global_batch_size,
              config.train.global_batch_size, process_index, process_count, len(ds))
  ds = ds.shuffle(seed=shuffle_seed).repeat(None)
  ds = ds.map(sources.decode)
  return ds.random_map(transform, seed=map_seed)


def batched(ds: grain.MapDataset, batch_size: int, *, num_workers: int, read_ahead: int,
            worker_buffer: int, drop_remainder: bool = True,
            whole_batches: bool = False) -> grain.IterDataset:
  """Reads `ds` with READ_THREADS threads, batches it, in `num_workers` processes (0: this one).

  Grain gives worker i of n the elements i::n of `ds` and interleaves the workers' batches
  (worker 0's first, worker 1's first, ...). By default each worker batches its own slice (the
  training stream, see `adapt_iterator_state`). With `whole_batches`, the output is instead
  `ds` cut into consecutive batches, in order, whatever the number of workers: batch j is made
  whole by worker j % n (`_WholeBatches`); len(ds) must be a multiple of batch_size * n.
  Workers ignore the signals sent to the process group and exit with the main process
  (`_init_worker`).

  Args:
    ds: the elements (dicts of arrays; None elements are dropped).
    batch_size: elements per batch.
    num_workers: reader processes.
    read_ahead: elements each process's reader threads work ahead of its batching.
    worker_buffer: batches each worker makes ahead of the consumer.
    drop_remainder: drop a last partial batch (per worker).
    whole_batches: keep `ds`'s batches whole and in order (see above).
  """
  if whole_batches and num_workers > 1:
    ds = _WholeBatches(ds, batch_size, num_workers)
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=READ_THREADS,
                                            prefetch_buffer_size=read_ahead))
  ds = ds.batch(batch_size, drop_remainder=drop_remainder)
  if num_workers <= 0:
    return ds
  # Grain's worker launcher reads its absl flags; outside an absl app (tests, notebooks,
  # benchmarks) they are unparsed, so take their defaults.
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  return ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers,
                                                     per_worker_buffer_size=worker_buffer),
                        worker_init_fn=_init_worker)


class _WholeBatches(grain.MapDataset):
  """`parent` reordered so that worker w of n, reading elements w::n, reads the parent's batches
  w, w + n, w + 2n, ... each whole and in order (element i of this dataset is the (i // n)-th
  element of worker i % n)."""

  def __init__(self, parent: grain.MapDataset, batch_size: int, num_workers: int):
    super().__init__(parent)
    if len(parent) % (batch_size * num_workers):
      raise ValueError(f'{len(parent)} elements do not make the same number of batches of '
                       f'{batch_size} for each of {num_workers} workers.')
    self._batch_size, self._num_workers = batch_size, num_workers

  def __len__(self) -> int:
    return len(self._parent)

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    local, worker = divmod(index, self._num_workers)
    batch, column = divmod(local, self._batch_size)
    return self._parent[(batch * self._num_workers + worker) * self._batch_size + column]

  def __str__(self) -> str:
    return f'_WholeBatches(batch_size={self._batch_size}, num_workers={self._num_workers})'


def _train_batches(ds: grain.MapDataset, config: ml_collections.ConfigDict,
                   batch_size: int) -> grain.IterDataset:
  """Training batches of `ds` in config.data.num_workers processes.

  config.data.prefetch_buffer_size counts batches in flight over all workers (a ViT-L host batch
  of 4096 float32 224x224 images is 2.5 GB, so it must not grow with the worker count). With no
  workers, this process's reader threads work that many batches ahead of the consumer.
  """
  workers, in_flight = config.data.num_workers, max(1, config.data.prefetch_buffer_size)
  return batched(ds, batch_size, num_workers=workers,
                 read_ahead=2 * READ_THREADS if workers > 0 else in_flight * batch_size,
                 worker_buffer=-(-in_flight // max(workers, 1)))


# How often a worker process checks that the main process is still alive.
_PARENT_CHECK_S = 0.5
# Where POSIX shared memory appears as files (Linux).
_SHM_DIR = pathlib.Path('/dev/shm')


def _shm_prefix(main_pid: int) -> str:
  """The name prefix of the shared-memory blocks made by the workers of process `main_pid`."""
  return f'capi_jax_{main_pid}_'


def _init_worker(worker_index: int, worker_count: int) -> None:
  """Runs first in every Grain worker process: signals go to the main process alone, the
  worker exits once the main process is gone (it would otherwise live on as an orphan), and
  its shared-memory blocks carry the main process's id (`release_worker_memory`)."""
  del worker_index, worker_count
  parent = os.getppid()
  # Grain's batches travel in blocks named by multiprocessing (psm_<random>): a worker killed
  # mid-batch leaves its blocks behind, and only this prefix tells the main process which are
  # its own.
  shared_memory._make_filename = (  # pylint: disable=protected-access
      lambda: f'/{_shm_prefix(parent)}{secrets.token_hex(6)}')
  # Ctrl-C reaches the whole foreground process group, SLURM signals every process of a job
  # step: only the main process acts on them (it checkpoints, then closes the workers).
  for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
    signal.signal(sig, signal.SIG_IGN)

  def exit_with_parent():
    while os.getppid() == parent:  # Re-parented (to init or a subreaper) once it died.
      time.sleep(_PARENT_CHECK_S)
    os._exit(1)  # pylint: disable=protected-access  (no cleanup: the consumer is gone)

  threading.Thread(target=exit_with_parent, name='exit-with-parent', daemon=True).start()


def worker_memory() -> list[str]:
  """The shared-memory blocks (names) that this process's data workers made and left."""
  if not _SHM_DIR.is_dir():
    return []
  return sorted(p.name for p in _SHM_DIR.glob(f'{_shm_prefix(os.getpid())}*'))


def release_worker_memory(loader: Any) -> int:
  """Closes `loader` (its workers stop) and removes the shared-memory blocks its workers left:
  a killed worker's batches in flight, which nothing else frees (Python's resource tracker
  removes them only when every process is gone, with a warning that they leaked). Returns how
  many were removed. For a loader that failed: blocks still in use by it become invalid."""
  close = getattr(loader, 'close', None)
  if close is not None:
    try:
      close()
    except Exception as e:  # pylint: disable=broad-except  (a broken pipeline: free what is left)
      logger.warning('Closing the input pipeline failed: %s', e)
  removed = 0
  for name in worker_memory():
    try:
      block = shared_memory.SharedMemory(name)
    except FileNotFoundError:
      continue  # Freed meanwhile.
    block.close()
    block.unlink()  # Also tells the resource tracker, which would warn at exit otherwise.
    removed += 1
  return removed


def create_train_loader(config: ml_collections.ConfigDict, transform: grain.transforms.RandomMap,
                        *, seed: int,
                        process_index: int | None = None,
                        process_count: int | None = None) -> grain.DatasetIterator:
  """Iterator over this host's training batches, of global_batch_size / process_count each.

  The iterator is infinite, supports `get_state()` / `set_state()` (JSON-serialisable dicts)
  and Grain's Orbax checkpoint handler (see the module docstring). With
  `config.data.num_workers` > 0, batches are built in that many worker processes; the stream
  depends on num_workers (0 and 1 give the same one), see `adapt_iterator_state`.
  """
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  global_batch = config.train.global_batch_size
  if global_batch % process_count:
    raise ValueError(f'config.train.global_batch_size={global_batch} is not divisible by the '
                     f'{process_count} hosts.')
  ds = train_dataset(config, transform, seed=seed, process_index=process_index,
                     process_count=process_count)
  return iter(_train_batches(ds, config, global_batch // process_count))


def _slice_positions(state: Mapping[str, Any]) -> list[int] | None:
  """Records read from each worker's slice of the host's record stream (one slice without
  workers), from a training iterator's state; None for a state of another form."""
  if set(state) == {'next_index'}:
    return [state['next_index']]
  workers = state.get('iterators_in_use_states')
  if (isinstance(workers, list) and workers
      and all(isinstance(w, dict) and set(w) == {'next_index'} for w in workers)):
    return [w['next_index'] for w in workers]
  return None


def adapt_iterator_state(saved: dict[str, Any], fresh: dict[str, Any]) -> dict[str, Any]:
  """`saved` (a `create_train_loader` iterator's state) for an iterator whose state is `fresh`.

  With n > 1 workers, worker i reads the slice i::n of the host's shuffled record stream and
  batches it; 0 and 1 workers read the stream in order. So:
    - same num_workers: `saved` as is (an exact resume);
    - 0 <-> 1 workers: the same stream in Grain's two state formats, converted exactly;
    - otherwise: the new workers start right after the furthest record read, so no record is
      read twice (fewer than n batches of records are skipped), but the batches differ from
      those of an uninterrupted run; a warning says which num_workers would resume exactly.

  Raises:
    errors.UserError: a state this version of capi_jax cannot convert (names the num_workers
      to use).
  """
  old, new = _slice_positions(saved), _slice_positions(fresh)
  saved_workers = len(saved.get('iterators_in_use_states', []))
  if old is None or new is None:
    if old is None and new is None and saved.keys() == fresh.keys():
      return saved  # A form this version does not know, saved with this pipeline's settings.
    raise errors.UserError('The data iterator position in the checkpoint was saved with '
                        f'data.num_workers={saved_workers} in a form capi_jax cannot convert: '
                        f'resume with --config.data.num_workers={saved_workers}.')
  if len(old) == len(new):
    if ('next_index' in saved) == ('next_index' in fresh):
      return saved  # The same num_workers.
    positions = old  # 0 <-> 1 worker: the same stream, Grain's two forms of state.
  else:
    n, m = len(old), len(new)
    read = max((n * (c - 1) + i + 1 for i, c in enumerate(old) if c > 0), default=0)
    positions = [max(0, -(-(read - j) // m)) for j in range(m)]
    logger.warning(
        'The data iterator was saved with data.num_workers=%d and resumes with %d: it goes on '
        'after record %d of the shuffled stream (none is read twice), but its batches differ '
        'from an uninterrupted run\'s; resume with --config.data.num_workers=%d for those.',
        saved_workers, len(fresh.get('iterators_in_use_states', [])), read, saved_workers)
  if 'next_index' in fresh:
    return {'next_index': positions[0]}
  return {**fresh, 'next_index_in_cycle': 0,
          'iterators_in_use_states': [{'next_index': p} for p in positions]}


def make_global_batch(local_batch: Mapping[str, np.ndarray], mesh: jax.sharding.Mesh,
                      batch_spec: jax.sharding.PartitionSpec) -> dict[str, jax.Array]:
  """This host's batch -> global `jax.Array`s whose leading axis is sharded by `batch_spec`."""
  sharding = jax.sharding.NamedSharding(mesh, batch_spec)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local_batch.items()}


def measure_throughput(config: ml_collections.ConfigDict, transform: grain.transforms.RandomMap,
                       num_batches: int = 20, warmup_batches: int = 2) -> dict[str, float]:
  """Host pipeline throughput of the training loader with `transform` (no accelerator work).

  Returns images_per_s; images_per_s_per_worker (per worker process; the main process counts
  as one worker when num_workers=0); with num_workers=0 also images_per_cpu_s (images per
  second of this process's CPU time over all its threads, i.e. per busy core); seconds,
  num_batches, batch_size, num_workers, image_size. Readers run up to
  config.data.prefetch_buffer_size batches ahead, so use num_batches well above that.
  """
  iterator = create_train_loader(config, transform, seed=config.train.seed)
  try:
    for _ in range(warmup_batches):  # Worker start-up and first file opens are not throughput.
      next(iterator)
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(num_batches):
      batch = next(iterator)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
  finally:
    if hasattr(iterator, 'close'):
      iterator.close()
  batch_size = len(next(iter(batch.values())))  # Images per batch, whatever the keys.
  images = num_batches * batch_size
  workers = config.data.num_workers
  result = {'images_per_s': images / seconds,
            'images_per_s_per_worker': images / seconds / max(workers, 1),
            'seconds': seconds, 'num_batches': num_batches, 'batch_size': batch_size,
            'num_workers': workers, 'image_size': config.data.image_size}
  if workers == 0:
    result['images_per_cpu_s'] = images / cpu_seconds
  return result
