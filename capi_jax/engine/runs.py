"""One run per workdir, and a record of every start that is never overwritten.

Lock: `WORKDIR/lock.json`, created atomically if absent (`storage.create_exclusive`: a hard link,
atomic on local file systems and NFSv3+; on GCS a generation precondition), holds the holder's
host, pid, start time, command line and a random token. While the run lives, a daemon thread
renews its heartbeat every `HEARTBEAT_S` (locally the file's mtime; on GCS the object is
rewritten, if still this run's generation, and its update time is the server's). A second start
on the same workdir refuses with a message naming the holder, unless the lock is stale:
  - same host and the holder's pid is gone (a crash, `kill -9`): taken over at once;
  - any host, no heartbeat for `STALE_AFTER_S` (a crashed host; also a reused pid on the same
    host): taken over too.
Both take-overs are logged; of several starts taking over one stale lock at once, one wins
(locally an atomic rename aside, on GCS a replace conditional on the generation judged stale).
The holder removes the file when it ends. In a multi-process run
only process 0 takes the lock and the others follow its outcome, so the processes of one run
never lock each other out.

Run records: `WORKDIR/runs/<UTC start to the microsecond>_<host>_<pid>.json`, one per start
that got as far as training: the full config, the command line, the step it resumed from, and
what reproducing it needs (`provenance`: git commit and dirty flag, library versions, XLA_FLAGS /
LIBTPU_INIT_ARGS and the like, device kind and count, mesh shape, process count). A rerun with
another config (refused or not) never touches an earlier record.
"""

import dataclasses
import datetime
import json
import logging
import os
import socket
import sys
import threading
import time
from typing import Any
import uuid

from etils import epath
import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np

from capi_jax.base import errors
from capi_jax.base import storage
from capi_jax.engine import provenance

logger = logging.getLogger(__name__)

LOCK_NAME = 'lock.json'
RUNS_DIR = 'runs'
HEARTBEAT_S = 60.0
# Far above HEARTBEAT_S, and above the clock differences of hosts sharing a file system.
STALE_AFTER_S = 600.0
_TAKEOVER_ATTEMPTS = 5


class WorkdirBusyError(errors.UserError):
  """Another live run holds the workdir's lock."""


class WorkdirUnusableError(errors.UserError):
  """The workdir cannot be created or written (a file is in the way, a read-only disk)."""


def make_workdir(workdir: str | os.PathLike[str]) -> epath.Path:
  """Creates `workdir` (gs://: nothing to create) and checks that a file can be written in it.

  Raises:
    WorkdirUnusableError: one line naming the cause, instead of the OSError's traceback.
  """
  try:
    path = storage.makedirs(workdir)
    if not storage.is_gcs(path):
      probe = path / f'.capi_jax_write_test.{os.getpid()}'
      probe.write_bytes(b'')
      probe.unlink()
  except OSError as e:
    where = f' ({e.filename})' if e.filename and os.fspath(e.filename) != os.fspath(workdir) else ''
    if isinstance(e, (FileExistsError, NotADirectoryError)):
      why = 'it, or a folder above it, is a file'
    else:
      why = e.strerror or str(e)
    raise WorkdirUnusableError(
        f'--workdir={workdir} cannot be used: {why}{where}. Give a --workdir in a writable '
        'folder.') from None
  return path


def _utc_now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%dT%H:%M:%SZ')


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # Alive, owned by another user.
    return True
  return True


@dataclasses.dataclass(frozen=True)
class Holder:
  """Who holds a lock, as written in the lock file."""
  host: str
  pid: int
  started: str
  token: str
  command: str

  @classmethod
  def me(cls) -> 'Holder':
    return cls(host=socket.gethostname(), pid=os.getpid(), started=_utc_now(),
               token=uuid.uuid4().hex, command=' '.join(sys.argv))

  def describe(self) -> str:
    return f'pid {self.pid} on host {self.host}, started {self.started} ({self.command})'


def _parse_holder(data: bytes | str) -> Holder | None:
  """The holder a lock file names; None if it is unreadable (being written, or damaged)."""
  try:
    return Holder(**json.loads(data))
  except (ValueError, TypeError):
    return None


def _stale_reason(holder: Holder | None, silent_s: float) -> str | None:
  """Why a lock silent for `silent_s` may be taken over, or None while its holder may live."""
  if holder is not None and holder.host == socket.gethostname() and not _pid_alive(holder.pid):
    return f'its process {holder.pid} on this host is gone'
  if silent_s > STALE_AFTER_S:
    return f'no heartbeat for {silent_s / 60:.0f} min'
  return None


class _LocalLockFile:
  """The lock file on a local or network file system: created exclusively (atomic on local file
  systems and NFSv3+), its mtime the heartbeat, taken over by an atomic rename aside."""

  def __init__(self, path: epath.Path, holder: Holder):
    self.path, self.holder = path, holder
    self._data = json.dumps(dataclasses.asdict(holder))

  def create(self) -> bool:
    try:
      return storage.create_exclusive(self.path, self._data)
    except OSError as e:
      raise errors.UserError(f'Cannot create the lock file {self.path} ({e}): the workdir must '
                             'be writable.') from e

  def read(self) -> tuple[Holder | None, float] | None:
    """(holder, seconds since its last heartbeat); None if there is no lock file."""
    try:
      holder = _parse_holder(self.path.read_text())
      return holder, time.time() - os.stat(self.path).st_mtime
    except FileNotFoundError:
      return None

  def take_over(self, judged: Holder | None) -> bool:
    """Replaces the stale lock judged from `judged` by this run's; False if another start
    replaced it first.

    The lock is renamed aside (atomic) and checked: if what was renamed is not the judged lock
    but a fresh one written meanwhile, it is linked back (link fails if yet another exists).
    """
    aside = self.path.with_name(f'{LOCK_NAME}.stale-{self.holder.token}')
    try:
      os.rename(self.path, aside)
    except FileNotFoundError:
      return self.create()
    try:
      if _parse_holder(aside.read_text()) != judged:
        try:
          os.link(aside, self.path)
        except FileExistsError:
          pass
        return False
    finally:
      aside.unlink()
    return self.create()

  def beat(self) -> bool:
    """Refreshes the heartbeat; False if the lock is no longer this run's."""
    try:
      if _parse_holder(self.path.read_text()) != self.holder:
        return False
      os.utime(self.path)
    except OSError:
      return False
    return True

  def release(self) -> None:
    try:
      if _parse_holder(self.path.read_text()) == self.holder:
        self.path.unlink()
    except FileNotFoundError:
      pass


class _GcsLockFile:
  """The lock object on GCS: created with `ifGenerationMatch=0`, rewritten as the heartbeat (its
  server-side update time) and taken over only if its generation is still the one judged stale,
  so that of several simultaneous take-overs exactly one wins; removed only if still this run's
  generation (a precondition fake-gcs-server does not enforce; GCS does)."""

  def __init__(self, path: epath.Path, holder: Holder):
    self.path, self.holder = path, holder
    self._data = json.dumps(dataclasses.asdict(holder)).encode()
    self._seen: int | None = None  # The generation `read` returned.
    self._mine: int | None = None  # This run's generation of the lock.

  def create(self) -> bool:
    if not storage.create_exclusive(self.path, self._data):
      return False
    current = storage.read_versioned(self.path)
    if current is None or current.data != self._data:
      return False  # Taken over already (this run had stalled): it is not this run's.
    self._mine = current.version
    return True

  def read(self) -> tuple[Holder | None, float] | None:
    current = storage.read_versioned(self.path)
    if current is None:
      return None
    self._seen = current.version
    return _parse_holder(current.data), time.time() - current.updated

  def take_over(self, judged: Holder | None) -> bool:
    del judged  # The generation read with it identifies it.
    self._mine = storage.replace_if_version(self.path, self._data, self._seen)
    return self._mine is not None

  def beat(self) -> bool:
    self._mine = storage.replace_if_version(self.path, self._data, self._mine)
    return self._mine is not None

  def release(self) -> None:
    if self._mine is not None:
      storage.delete_if_version(self.path, self._mine)
      self._mine = None


class WorkdirLock:
  """The advisory lock of one workdir (see the module docstring); a context manager."""

  def __init__(self, workdir: str | os.PathLike[str]):
    self.path = storage.path(workdir) / LOCK_NAME
    self.holder = Holder.me()
    kind = _GcsLockFile if storage.is_gcs(self.path) else _LocalLockFile
    self._file = kind(self.path, self.holder)
    self._stop = threading.Event()
    self._heartbeat: threading.Thread | None = None

  def acquire(self) -> None:
    """Takes the lock, or raises WorkdirBusyError naming its live holder."""
    storage.makedirs(self.path.parent)
    for _ in range(_TAKEOVER_ATTEMPTS):
      if self._file.create():
        self._start_heartbeat()
        return
      seen = self._file.read()
      if seen is None:  # Released meanwhile.
        continue
      holder, silent_s = seen
      reason = _stale_reason(holder, silent_s)
      if reason is None:
        who = holder.describe() if holder else 'a run that is starting right now'
        raise WorkdirBusyError(
            f'{self.path.parent} is in use by another run: {who}. Wait for it to end, stop '
            'it, or pass another --workdir. (If that run is gone without a trace, e.g. its host '
            f'crashed, its lock counts as stale {STALE_AFTER_S / 60:.0f} min after its last '
            f'heartbeat; deleting {self.path} takes over at once.)')
      if self._file.take_over(holder):
        logger.warning('Took over the stale lock of %s (%s): %s.', self.path.parent,
                       holder.describe() if holder else 'unreadable lock file', reason)
        self._start_heartbeat()
        return
    raise WorkdirBusyError(f'Could not lock {self.path.parent}: other starts keep taking it.')

  def _start_heartbeat(self) -> None:
    def beat():
      while not self._stop.wait(HEARTBEAT_S):
        try:
          ours = self._file.beat()
        except Exception as e:  # pylint: disable=broad-except  (a network error: try again)
          logger.warning('Heartbeat of the lock %s failed (%s); retrying.', self.path, e)
          continue
        if not ours:
          logger.error('The lock %s is no longer this run\'s: another run may be writing to '
                       'this workdir.', self.path)
          return

    self._heartbeat = threading.Thread(target=beat, name='workdir-lock-heartbeat', daemon=True)
    self._heartbeat.start()

  def release(self) -> None:
    """Removes the lock file if it is still this run's."""
    self._stop.set()
    if self._heartbeat is not None:
      self._heartbeat.join()
      self._heartbeat = None
    self._file.release()

  def __enter__(self) -> 'WorkdirLock':
    self.acquire()
    return self

  def __exit__(self, *exc_info) -> None:
    self.release()


def lock_workdir(workdir: str | os.PathLike[str]) -> WorkdirLock | None:
  """Process 0 takes the workdir's lock (returned); the others get None, or the same error."""
  lock, error = None, None
  if jax.process_index() == 0:
    lock = WorkdirLock(workdir)
    try:
      lock.acquire()
    except errors.UserError as e:
      error = e
  if jax.process_count() > 1:
    busy = multihost_utils.broadcast_one_to_all(np.int32(error is not None))
    if busy and error is None:
      error = WorkdirBusyError(f'Process 0 could not lock {workdir}: see its message.')
  if error is not None:
    raise error
  return lock


# The data keys of configs/common.py (the source); a method's own data keys are in its section.
_SOURCE_DATA_KEYS = ('dataset', 'split', 'data_dir', 'image_size', 'num_workers',
                     'prefetch_buffer_size')


def upgrade_config(config: dict[str, Any]) -> dict[str, Any]:
  """A recorded config in today's layout (configs/common.py + the method's section).

  Records written before configs were composed hold the method's model and optimiser at the
  top (`model`, `optim` with the training lengths `total_iters` and `global_batch_size`) and
  its augmentation keys in `data`: they move to `<method>.model`, `<method>.optim`,
  `train.*` and `<method>.data`, so that such a run can still be restored (evaluated, converted,
  started from). A record in today's layout is returned as it is.
  """
  if 'model' not in config and 'optim' not in config:
    return config
  config, method = dict(config), config['method']
  section, train = dict(config.get(method, {})), dict(config.get('train', {}))
  if 'model' in config:
    section['model'] = config.pop('model')
  if 'optim' in config:
    optim = dict(config.pop('optim'))
    train.update({k: optim.pop(k) for k in ('total_iters', 'global_batch_size') if k in optim})
    section['optim'] = optim
  data = dict(config.get('data', {}))
  augment = {k: data.pop(k) for k in list(data) if k not in _SOURCE_DATA_KEYS}
  if augment:
    section['data'] = augment
  config.update({'train': train, 'data': data, method: section})
  config.setdefault('init', {'checkpoint': ''})
  return config


def latest_config(workdir: str | os.PathLike[str]) -> ml_collections.ConfigDict | None:
  """The config of the newest start recorded in WORKDIR/runs/ (None if there is none), in
  today's layout (`upgrade_config`)."""
  for record in sorted((storage.path(workdir) / RUNS_DIR).glob('*.json'), reverse=True):
    try:
      return ml_collections.ConfigDict(upgrade_config(json.loads(record.read_text())['config']))
    except (OSError, ValueError, KeyError) as e:  # Cut short by an older version's crash.
      logger.warning('Skipping unreadable run record %s (%s).', record, e)
  return None


def write_record(workdir: str | os.PathLike[str], config: ml_collections.ConfigDict,
                 resumed_from: int | None, mesh: jax.sharding.Mesh | None = None
                 ) -> epath.Path | None:
  """Writes this start's record into WORKDIR/runs/ (process 0 only); returns its path.

  The file name is unique to this start and created exclusively, so no record is ever replaced;
  the record appears whole or not at all (`storage.create_exclusive`), so a run killed while
  writing it leaves no partial JSON behind.
  """
  if jax.process_index() != 0:
    return None
  record: dict[str, Any] = {
      'started': _utc_now(), 'host': socket.gethostname(), 'pid': os.getpid(),
      'command': sys.argv, 'resumed_from_step': resumed_from,
      'process_count': jax.process_count(), 'device_count': jax.device_count(),
      'platform': jax.devices()[0].platform, 'jax_version': jax.__version__,
      'config': json.loads(config.to_json_best_effort()),
      **provenance.describe(mesh),  # git, library versions, XLA_FLAGS..., device kind, mesh.
  }
  runs = storage.makedirs(storage.path(workdir) / RUNS_DIR)
  text = json.dumps(record, indent=2) + '\n'
  while True:  # One process may start twice within a clock tick (tests, notebooks).
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime('%Y%m%dT%H%M%S.%fZ')
    path = runs / f'{stamp}_{record["host"]}_{record["pid"]}.json'
    if storage.create_exclusive(path, text):
      return path
