"""Orbax checkpoints of the whole TrainState plus the Grain iterator state, checked on restore.

Layout: `WORKDIR/checkpoints/<step>/{state, data_iter, config, checksums.json}`.
  - `state`: the TrainState, each process writing its shards (restored straight into the target
    shardings, so a resumed model is born sharded too);
  - `data_iter`: each process's Grain iterator state, so a resumed run reads exactly the batches
    an uninterrupted one would (also after a change of `data.num_workers`, see
    `pipeline.adapt_iterator_state`);
  - `config`: the architecture-relevant part of the config (`architecture`), checked on restore;
  - `checksums.json`: size and SHA-256 of every file (on GCS: size and the server's CRC32C of
    each object, read from one listing instead of downloading the checkpoint again), written by
    process 0 once every process has written its part and before Orbax commits the checkpoint,
    so it appears with the checkpoint; verified before every restore.
Saves are asynchronous (the device-to-host copy blocks, the writes do not) and atomic, so
`latest_step` never sees a checkpoint cut short by a kill: locally Orbax writes into a temporary
directory and renames it when complete; on GCS (where a rename copies every object) it writes
`<step>/` in place and commits it by writing `<step>/commit_success.txt` last. Leftovers are
removed on the next start. A save that would not fit on the local disk is refused before it
starts (GCS has no such limit), and a failed write is reported when it fails.

Resuming (`Checkpointer.restore_latest`) takes the newest checkpoint that is intact: a damaged
one (a file truncated, deleted or changed since it was written; without checksums, one Orbax
cannot read) is moved to `WORKDIR/checkpoints_damaged/` with a warning naming the damage, and
the previous one is tried.

A checkpoint written with the other block-stack layout (`efficiency.scan_layers`: stacked or
per-block parameters, `models.stack`) is restored in its own layout, then converted.

`find_checkpoint` resolves what a user may pass as a checkpoint (a step folder, a copy of one,
a checkpoints folder, a workdir, a `capi_jax.convert` output); `restore_step_dir` reads a step
folder wherever it lies.
"""

import dataclasses
import hashlib
import json
import logging
import os
import re
from typing import Any

from etils import epath
import grain
import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from capi_jax import methods
from capi_jax.base import errors
from capi_jax.base import storage
from capi_jax.data import pipeline
from capi_jax.models import stack

PyTree = Any
logger = logging.getLogger(__name__)

_STATE, _DATA, _CONFIG = 'state', 'data_iter', 'config'
CHECKSUMS = 'checksums.json'
# Orbax's own bookkeeping at the top of a step folder, rewritten when it commits the checkpoint
# (after the checksums are taken): not covered by them.
_COMMIT_MARKER = 'commit_success.txt'  # Orbax's, on GCS: the step folder is complete.
_ORBAX_COMMIT_FILES = frozenset({'_CHECKPOINT_METADATA', _COMMIT_MARKER})
# Free disk space wanted beyond the size of one checkpoint, for the file systems' own overhead.
_SPACE_MARGIN = 1.1
DAMAGED_SUFFIX = '_damaged'


class IncompatibleCheckpointError(errors.UserError, ValueError):
  """A checkpoint was written with a different architecture than the config's."""


class DamagedCheckpointError(errors.UserError):
  """A checkpoint's files differ from when it was written, or cannot be read."""


class CheckpointWriteError(errors.UserError):
  """A checkpoint could not be written (no disk space, a failed write)."""


class CheckpointNotFoundError(errors.UserError, FileNotFoundError):
  """A path names no checkpoint."""


def architecture(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """What decides the TrainState's structure and shapes (JSON-normalised): the method's
  signature (`Method.architecture`) plus the method's name and the parameters' dtype."""
  arch = {'method': config.method, **methods.from_config(config).architecture(),
          'efficiency.param_dtype': config.efficiency.param_dtype}
  return json.loads(json.dumps(arch))


def _differences(saved: dict[str, Any], current: dict[str, Any], prefix: str = '') -> list[str]:
  diffs = []
  for key in sorted(set(saved) | set(current)):
    a, b = saved.get(key, '<missing>'), current.get(key, '<missing>')
    if isinstance(a, dict) and isinstance(b, dict):
      diffs += _differences(a, b, f'{prefix}{key}.')
    elif a != b:
      diffs.append(f'{prefix}{key}: checkpoint {a!r} vs config {b!r}')
  return diffs


# ---------------------------------------------------------------------------- integrity
def _sha256(path: epath.Path) -> str:
  with path.open('rb') as f:
    return hashlib.file_digest(f, 'sha256').hexdigest()


def _checked_files(step_dir: epath.Path) -> dict[str, storage.FileInfo]:
  """Every file of a step folder that the checksums cover: {relative path: FileInfo}, sorted."""
  return {name: info for name, info in storage.list_files(step_dir).items()
          if name not in _ORBAX_COMMIT_FILES and name != CHECKSUMS}


def write_checksums(step_dir: str | os.PathLike[str]) -> None:
  """Writes `step_dir/checksums.json`: {'files': {relative path: {'bytes', 'sha256'}}}; on GCS
  {'bytes', 'crc32c'}: the server's checksum of each object, from the listing."""
  step_dir = storage.path(step_dir)
  files = {}
  for name, info in _checked_files(step_dir).items():
    digest = ({'crc32c': info.crc32c} if storage.is_gcs(step_dir) else
              {'sha256': _sha256(step_dir / name)})
    files[name] = {'bytes': info.size, **digest}
  storage.write_atomic(step_dir / CHECKSUMS, json.dumps({'files': files}, indent=1))


def damage(step_dir: str | os.PathLike[str]) -> str | None:
  """What differs in `step_dir` from when it was written; None if nothing does.

  A checkpoint without checksums (written before they existed) cannot be verified: it counts as
  intact here and is only judged by whether it restores.
  """
  step_dir = storage.path(step_dir)
  path = step_dir / CHECKSUMS
  if not path.exists():
    logger.warning('%s has no %s: restoring it unverified.', step_dir, CHECKSUMS)
    return None
  try:
    recorded = json.loads(path.read_text())['files']
  except (OSError, ValueError, KeyError, TypeError) as e:
    return f'its {CHECKSUMS} is unreadable ({e})'
  present = storage.list_files(step_dir)
  for name, expected in sorted(recorded.items()):
    if name not in present:
      return f'{name} is missing'
    size = present[name].size
    if size != expected['bytes']:
      return f'{name} has {size} bytes, {expected["bytes"]} when written'
    if 'sha256' in expected:
      changed = _sha256(step_dir / name) != expected['sha256']
    else:  # Taken on GCS; here the server's CRC32C (or, for a local copy, one computed).
      changed = (present[name].crc32c or storage.crc32c(step_dir / name)) != expected['crc32c']
    if changed:
      return f'{name} has changed since it was written (checksum mismatch)'
  return None


def _on_process_0(value: int) -> int:
  """Process 0's `value` on every process (decisions all processes must share)."""
  if jax.process_count() == 1:
    return value
  return int(multihost_utils.broadcast_one_to_all(np.int64(value)))


def _damage_agreed(step_dir: epath.Path) -> str | None:
  """`damage(step_dir)` as process 0 sees it (only it reads the files), on every process."""
  found = damage(step_dir) if jax.process_index() == 0 else None
  if _on_process_0(found is not None) and found is None:
    found = 'a file differs from when it was written (process 0 logs which)'
  return found


# ---------------------------------------------------------------------------- reading
class _IteratorStateAdapter:
  """What Grain's checkpoint handler restores into: adapts the saved iterator state to the
  live iterator (another `data.num_workers`); the handler hands non-Grain items JSON bytes."""

  def __init__(self, iterator: grain.DatasetIterator):
    self.iterator = iterator

  def set_state(self, state: bytes) -> None:
    self.iterator.set_state(
        pipeline.adapt_iterator_state(json.loads(state), self.iterator.get_state()))

  def start_prefetch(self) -> None:
    self.iterator.start_prefetch()


def _reader() -> ocp.Checkpointer:
  """Reads the items of one step folder, whatever its name or place."""
  return ocp.Checkpointer(ocp.CompositeCheckpointHandler(**{
      _STATE: ocp.StandardCheckpointHandler(),
      _DATA: grain.checkpoint.CheckpointHandler(),
      _CONFIG: ocp.JsonCheckpointHandler(),
  }))


def _first_line(error: BaseException) -> str:
  return f'{type(error).__name__}: {(str(error).strip().splitlines() or [""])[0]}'


def _read(step_dir: epath.Path, items: dict[str, Any]) -> dict[str, Any]:
  """Orbax's restore of `items` from `step_dir`.

  A failure counts as damage only for a checkpoint without checksums: files verified as
  written that Orbax cannot read point to a bug or a version mismatch, raised as is.
  """
  try:
    with _reader() as reader:
      return reader.restore(step_dir, args=ocp.args.Composite(**items))
  except errors.UserError:
    raise
  except Exception as e:  # pylint: disable=broad-except  (TensorStore, JSON, missing files)
    if (step_dir / CHECKSUMS).exists():
      raise
    raise DamagedCheckpointError(f'{step_dir} cannot be read: {_first_line(e)}.') from e


def check_architecture(step_dir: epath.Path, config: ml_collections.ConfigDict) -> None:
  """Raises IncompatibleCheckpointError if `step_dir` holds another architecture than `config`."""
  saved = _read(step_dir, {_CONFIG: ocp.args.JsonRestore()})[_CONFIG]
  diffs = _differences(saved, architecture(config))
  if diffs:
    raise IncompatibleCheckpointError(
        f'The checkpoint {step_dir} was written with another model config:\n  '
        + '\n  '.join(diffs) + '\nPass the config it was trained with (a training workdir '
        'keeps the config of every start in WORKDIR/runs/).')


def restore_step_dir(step_dir: str | os.PathLike[str], config: ml_collections.ConfigDict,
                     abstract_state: PyTree, data_iter: Any | None = None) -> PyTree:
  """The TrainState saved in `step_dir` (a step folder under any name), verified first.

  Args:
    step_dir: a step folder (`WORKDIR/checkpoints/<step>` or a copy of one).
    config: the config; the checkpoint's architecture must match it.
    abstract_state: ShapeDtypeStructs with shardings (`restore_target`) to restore into.
    data_iter: if given, moved to the saved position in place (a Grain iterator, or any object
      with `get_state` / `set_state` speaking JSON bytes).

  Raises:
    DamagedCheckpointError: a file differs from when it was written, or (without checksums)
      cannot be read.
    IncompatibleCheckpointError: the checkpoint has another architecture.
  """
  step_dir = storage.path(step_dir)
  problem = _damage_agreed(step_dir)
  if problem:
    raise DamagedCheckpointError(f'{step_dir} is damaged: {problem}.')
  check_architecture(step_dir, config)
  saved = _read_metadata(step_dir)
  target = stack.to_layout_of(abstract_state, saved)
  items = {_STATE: ocp.args.StandardRestore(target)}
  if data_iter is not None:
    check_process_count(step_dir, jax.process_count())
    adapted = (_IteratorStateAdapter(data_iter) if isinstance(data_iter, grain.DatasetIterator)
               else data_iter)
    items[_DATA] = grain.checkpoint.CheckpointRestore(adapted)
  restored = _read(step_dir, items)[_STATE]
  if target is not abstract_state:
    logger.info('Converting checkpoint %s to the %s block layout.', step_dir,
                'scanned' if stack.is_scanned(abstract_state) else 'per-block')
    restored = jax.device_put(stack.to_layout_of(restored, abstract_state),
                              jax.tree.map(lambda a: a.sharding, abstract_state))
  logger.info('Restored checkpoint %s.', step_dir)
  return restored


def check_process_count(step_dir: epath.Path, process_count: int) -> None:
  """Raises IncompatibleCheckpointError unless `step_dir`'s data iterator positions were
  written by `process_count` processes (one file per process: each reads its own slice of the
  data, so another count cannot continue the same batches)."""
  data = step_dir / _DATA
  names = [p.name for p in data.iterdir()] if data.is_dir() else []
  counts = sorted({int(m.group(1)) for n in names
                   if (m := re.fullmatch(r'process_\d+-of-(\d+)\.json', n))})
  if counts and process_count not in counts:
    raise IncompatibleCheckpointError(
        f'{step_dir} was written by {counts[0]} process(es) and this run has {process_count}: '
        f'resume with {counts[0]} process(es) (the data position is saved per process), or '
        'evaluate / convert this checkpoint, which works with any number.')


def _read_metadata(step_dir: epath.Path) -> PyTree:
  """The saved TrainState's tree of array metadata (nested dicts), read without the arrays."""
  try:
    with _reader() as reader:
      return reader.metadata(step_dir).item_metadata[_STATE].tree
  except Exception as e:  # pylint: disable=broad-except  (as `_read`)
    if (step_dir / CHECKSUMS).exists():
      raise
    raise DamagedCheckpointError(f'{step_dir} cannot be read: {_first_line(e)}.') from e


@dataclasses.dataclass(frozen=True)
class CheckpointPath:
  """A checkpoint found by `find_checkpoint`.

  Attributes:
    kind: 'training' (a step folder of a training run) or 'params' (parameters written by
      `python -m capi_jax.convert --to=capi_jax`).
    path: the step folder, or the params folder.
    step: the step a training checkpoint's folder is named after; None for a copy under another
      name (the restored state's `step` holds it) and for params.
  """
  kind: str
  path: epath.Path
  step: int | None


def _is_step_dir(path: epath.Path) -> bool:
  """A complete step folder (on GCS one that Orbax committed, or a copy with checksums: an
  interrupted save leaves `<step>/state/` there without either)."""
  if not (path / _STATE).is_dir():
    return False
  return (not storage.is_gcs(path) or (path / _COMMIT_MARKER).exists()
          or (path / CHECKSUMS).exists())


def _is_params_dir(path: epath.Path) -> bool:
  return (path / '_METADATA').is_file() and not _is_step_dir(path)


def _steps_in(directory: epath.Path) -> list[int]:
  if not directory.is_dir():
    return []
  return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit() and _is_step_dir(p))


def find_checkpoint(path: str | os.PathLike[str]) -> CheckpointPath:
  """The checkpoint `path` names; nothing is created or written.

  `path` may be a step folder (`WORKDIR/checkpoints/<step>`, or a copy of one under any name),
  a checkpoints folder or a workdir (their newest step), or the output folder of
  `capi_jax.convert --to=capi_jax` (OUT or OUT/params).

  Raises:
    CheckpointNotFoundError: `path` is not a directory, or holds none of these.
  """
  path = storage.path(path)
  usage = ('pass a workdir, its checkpoints folder, one step folder (WORKDIR/checkpoints/<step>, '
           'or a copy of one), or the output folder of `python -m capi_jax.convert '
           '--to=capi_jax`')
  if not path.is_dir():
    what = 'does not exist' if not path.exists() else 'is a file'
    raise CheckpointNotFoundError(f'{path} is not a directory (it {what}): {usage}.')
  if _is_step_dir(path):
    return CheckpointPath('training', path, int(path.name) if path.name.isdigit() else None)
  for params in (path / 'params', path):
    if _is_params_dir(params):
      return CheckpointPath('params', params, None)
  for directory in (path / 'checkpoints', path):
    steps = _steps_in(directory)
    if steps:
      return CheckpointPath('training', directory / str(steps[-1]), steps[-1])
  raise CheckpointNotFoundError(f'No checkpoint in {path}: train first, or {usage}.')


# ---------------------------------------------------------------------------- training runs
def _tree_bytes(tree: PyTree) -> int:
  return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def _dir_bytes(directory: epath.Path) -> int:
  return sum(info.size for info in storage.list_files(directory).values())


def _bytes(n: float) -> str:
  return f'{n / 2**30:.2f} GiB' if n >= 2**30 else f'{n / 2**20:.1f} MiB'


class Checkpointer:
  """Periodic, async, atomic, checksummed checkpoints of (TrainState, Grain iterator)."""

  def __init__(self, directory: str | os.PathLike[str], config: ml_collections.ConfigDict):
    ckpt_cfg = config.train.checkpointing
    self.directory = storage.path(directory)
    self._config = config
    self._architecture = architecture(config)
    self._async = ckpt_cfg.async_save
    self._saving: int | None = None
    self._space_note_logged = False
    options = ocp.CheckpointManagerOptions(
        max_to_keep=ckpt_cfg.max_to_keep,
        # Always Orbax's async path (a synchronous save waits for it): only it runs
        # `_write_checksums` inside the commit.
        enable_async_checkpointing=True,
        async_options=ocp.AsyncOptions(post_finalization_callback=self._write_checksums),
        # Interrupted saves leave temporary directories; they are never restored, only removed.
        cleanup_tmp_directories=True,
    )
    self.manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={
            _STATE: ocp.StandardCheckpointHandler(),
            _DATA: grain.checkpoint.CheckpointHandler(),
            _CONFIG: ocp.JsonCheckpointHandler(),
        })

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def _write_checksums(self) -> None:
    """Orbax's post-finalisation hook: on process 0, after every process wrote its part of
    checkpoint `self._saving` and before Orbax commits it (locally: renames its temporary
    folder into place; on GCS: writes `<step>/commit_success.txt` into the step folder)."""
    if storage.is_gcs(self.directory):
      write_checksums(self.directory / str(self._saving))
      return
    tmp = sorted(self.directory.glob(f'{self._saving}.orbax-checkpoint-tmp*'))
    if len(tmp) != 1:
      raise RuntimeError(f'Expected one temporary folder of checkpoint {self._saving} in '
                         f'{self.directory}, found {[p.name for p in tmp]}: Orbax changed its '
                         'layout; update capi_jax.engine.checkpointing.')
    write_checksums(tmp[0])

  def check_space(self, state: PyTree) -> None:
    """Raises CheckpointWriteError if a checkpoint of `state` would not fit on the disk.

    The size is the newest checkpoint's on disk, else the state's; process 0 decides for all.
    Not checked on GCS (no space limit; logged once).
    """
    if storage.is_gcs(self.directory):
      if not self._space_note_logged:
        logger.info('Checkpoints go to GCS (%s): no free-space check.', self.directory)
        self._space_note_logged = True
      return
    steps = self.all_steps()
    need = (_dir_bytes(self.directory / str(steps[-1])) if steps else _tree_bytes(state))
    free = storage.free_bytes(self.directory)
    if _on_process_0(free < need * _SPACE_MARGIN):
      resume = (f'resumes from step {steps[-1]}' if steps else 'starts from scratch')
      raise CheckpointWriteError(
          f'Not enough disk space for a checkpoint in {self.directory}: {_bytes(free)} free, '
          f'about {_bytes(need * _SPACE_MARGIN)} needed. Free some space (or lower '
          f'train.checkpointing.max_to_keep) and rerun with the same --workdir: it {resume}.')

  def save(self, step: int, state: PyTree, data_iter: Any) -> None:
    """Starts an async save of `state` and the iterator position at `step` (steps done).

    Raises:
      CheckpointWriteError: not enough disk space, or the previous save failed.
    """
    # A save at a step that already has a checkpoint (e.g. final == periodic) is a no-op.
    if step in self.manager.all_steps():
      return
    self.wait()  # `_write_checksums` reads `_saving`: the previous save must be done.
    self.check_space(state)
    self._saving = step
    self.manager.save(step, args=ocp.args.Composite(**{
        _STATE: ocp.args.StandardSave(state),
        _DATA: grain.checkpoint.CheckpointSave(data_iter),
        _CONFIG: ocp.args.JsonSave(self._architecture),
    }), force=True)
    if not self._async:
      self.wait()

  def restore(self, step: int, abstract_state: PyTree, data_iter: Any | None) -> PyTree:
    """The TrainState at `step`, placed like `abstract_state` (see `restore_step_dir`)."""
    try:
      return restore_step_dir(self.directory / str(step), self._config, abstract_state, data_iter)
    except IncompatibleCheckpointError as e:
      raise IncompatibleCheckpointError(
          f'{e} Or train this config in a new --workdir.') from None

  def _set_aside(self, step: int) -> epath.Path:
    """Moves checkpoint `step` out of the way into `<directory>_damaged/` (process 0).

    On GCS the move copies each object; the commit marker goes first, so that Orbax stops
    listing the step at once (a move cut short leaves an uncommitted step folder, which Orbax
    removes at the next start).
    """
    aside = self.damaged_directory / str(step)
    n = 1
    while aside.exists():
      aside, n = aside.with_name(f'{step}.{n}'), n + 1
    if jax.process_index() == 0:
      storage.move_tree(self.directory / str(step), aside, first=(_COMMIT_MARKER,))
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f'capi_jax set aside checkpoint {step}')
    self.manager.reload()
    return aside

  @property
  def damaged_directory(self) -> epath.Path:
    """Where damaged checkpoints are set aside: `<directory>_damaged/<step>`."""
    return self.directory.with_name(self.directory.name + DAMAGED_SUFFIX)

  def restore_latest(self, abstract_state: PyTree, data_iter: Any | None
                     ) -> tuple[PyTree, int] | None:
    """(state, step) of the newest intact checkpoint; None if there are no checkpoints.

    Damaged newer ones are moved to `<directory>_damaged/`, each with a warning.

    Raises:
      DamagedCheckpointError: every checkpoint is damaged (they are all set aside), now or at
        an earlier start (a rerun must not silently start from step 0 over the run's history).
      IncompatibleCheckpointError: the newest intact one has another architecture.
    """
    aside = self.damaged_directory
    if not self.all_steps() and aside.is_dir() and any(aside.iterdir()):
      raise DamagedCheckpointError(
          f'{self.directory} holds no checkpoint: an earlier start set every one aside as '
          f'damaged in {aside}/. Restore a backup of the checkpoints into {self.directory}/, or '
          f'start again in a new --workdir (or delete {aside}/ to train from step 0 in this one, '
          'replacing its metrics history).')
    problems = []
    for step in reversed(self.all_steps()):
      try:
        state = self.restore(step, abstract_state, data_iter)
      except DamagedCheckpointError as e:
        aside = self._set_aside(step)
        problems.append(str(e))
        logger.warning('%s Moved it to %s; trying the previous checkpoint.', e, aside)
        continue
      if problems:
        logger.warning('Resuming from step %d, the newest intact checkpoint.', step)
      return state, step
    if problems:
      raise DamagedCheckpointError(
          'No intact checkpoint to resume from (all were moved to '
          f'{self.directory.name + DAMAGED_SUFFIX}/):\n  ' + '\n  '.join(problems) +
          '\nRestore a backup of the checkpoints, or start again in a new --workdir.')
    return None

  def raise_if_save_failed(self) -> None:
    """Reports a finished but failed async save now rather than at the next save."""
    if not self.manager.is_saving_in_progress():
      self.wait()

  def wait(self) -> None:
    """Blocks until the pending async save is complete on disk.

    Raises:
      CheckpointWriteError: it failed (e.g. the disk filled up while writing).
    """
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except  (Orbax re-raises the writer's error)
      quiet_unretrieved_futures()
      raise CheckpointWriteError(
          f'Writing checkpoint {self._saving} to {self.directory} failed: {_first_line(e)}. '
          'Fix the cause (e.g. free disk space) and rerun with the same --workdir: it resumes '
          f'from the newest complete checkpoint.') from e

  def close(self) -> None:
    """Waits for the pending save and releases Orbax's resources; a failed save is only logged
    here (`wait` raises it), so that closing never hides the error that ended a run."""
    try:
      self.manager.close()
    except Exception as e:  # pylint: disable=broad-except
      logger.error('Writing checkpoint %s to %s failed: %s', self._saving, self.directory,
                   _first_line(e))


class _UnretrievedFutures(logging.Filter):
  """Drops asyncio's 'Future/Task exception was never retrieved' records: after a failed
  write, each of Orbax's parallel file writes reports the same error again when collected
  (~600 lines after a full disk), burying the one line that says what happened."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not str(record.msg).partition('\n')[0].endswith('exception was never retrieved')


_QUIET = _UnretrievedFutures()


def quiet_unretrieved_futures() -> None:
  """Installs `_UnretrievedFutures` on asyncio's logger (once; after a write failed)."""
  asyncio_logger = logging.getLogger('asyncio')
  if _QUIET not in asyncio_logger.filters:
    asyncio_logger.addFilter(_QUIET)


def restore_target(abstract_state: PyTree, shardings: PyTree | jax.sharding.Sharding) -> PyTree:
  """Orbax's restore target: `abstract_state`'s shapes and dtypes placed by `shardings`.

  `shardings` is a tree shaped like the state, or one Sharding for every leaf.
  """
  if isinstance(shardings, jax.sharding.Sharding):
    shardings = jax.tree.map(lambda _: shardings, abstract_state)
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract_state, shardings)
