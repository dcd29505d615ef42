"""One run per workdir, and a record of every start that is never overwritten.

Lock: `WORKDIR/lock.json`, created atomically (`O_CREAT | O_EXCL`, atomic on local file systems
and NFSv3+), holds the holder's host, pid, start time, command line and a random token. While
the run lives, a daemon thread refreshes the file's mtime every `HEARTBEAT_S`. A second start on
the same workdir refuses with a message naming the holder, unless the lock is stale:
  - same host and the holder's pid is gone (a crash, `kill -9`): taken over at once;
  - any host, no heartbeat for `STALE_AFTER_S` (a crashed host; also a reused pid on the same
    host): taken over too.
Both take-overs are logged. The holder removes the file when it ends. In a multi-process run
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
import pathlib
import socket
import sys
import threading
import time
from typing import Any
import uuid

import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np

from capi_jax.base import errors
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


def _read_holder(path: pathlib.Path) -> Holder | None:
  """The lock file's holder; None if the file is unreadable (being written, or damaged)."""
  try:
    return Holder(**json.loads(path.read_text()))
  except (OSError, ValueError, TypeError):
    return None


def _stale_reason(path: pathlib.Path, holder: Holder | None) -> str | None:
  """Why the lock at `path` may be taken over, or None while its holder may be alive."""
  try:
    silent_s = time.time() - path.stat().st_mtime
  except FileNotFoundError:
    return 'it was just released'
  if holder is not None and holder.host == socket.gethostname() and not _pid_alive(holder.pid):
    return f'its process {holder.pid} on this host is gone'
  if silent_s > STALE_AFTER_S:
    return f'no heartbeat for {silent_s / 60:.0f} min'
  return None


class WorkdirLock:
  """The advisory lock of one workdir (see the module docstring); a context manager."""

  def __init__(self, workdir: str | pathlib.Path):
    self.path = pathlib.Path(workdir).absolute() / LOCK_NAME
    self.holder = Holder.me()
    self._stop = threading.Event()
    self._heartbeat: threading.Thread | None = None

  def _create(self) -> bool:
    """Creates the lock file holding `self.holder`; False if it exists."""
    try:
      fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      return False
    except OSError as e:
      raise errors.UserError(f'Cannot create the lock file {self.path} ({e}): the workdir must be '
                          'writable.') from e
    with os.fdopen(fd, 'w') as f:
      json.dump(dataclasses.asdict(self.holder), f)
      f.flush()
      os.fsync(f.fileno())
    return True

  def _take_over(self, judged: Holder | None) -> bool:
    """Removes the stale lock judged from `judged`; False if another start replaced it first.

    The lock is renamed aside (atomic) and checked: if what was renamed is not the judged lock
    but a fresh one written meanwhile, it is linked back (link fails if yet another exists).
    """
    aside = self.path.with_name(f'{LOCK_NAME}.stale-{self.holder.token}')
    try:
      os.rename(self.path, aside)
    except FileNotFoundError:
      return True
    if _read_holder(aside) != judged:
      try:
        os.link(aside, self.path)
      except FileExistsError:
        pass
      aside.unlink()
      return False
    aside.unlink()
    return True

  def acquire(self) -> None:
    """Takes the lock, or raises WorkdirBusyError naming its live holder."""
    self.path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(_TAKEOVER_ATTEMPTS):
      if self._create():
        self._start_heartbeat()
        return
      holder = _read_holder(self.path)
      reason = _stale_reason(self.path, holder)
      if reason is None:
        who = holder.describe() if holder else 'a run that is starting right now'
        raise WorkdirBusyError(
            f'{self.path.parent} is in use by another run: {who}. Wait for it to end, stop '
            'it, or pass another --workdir. (If that run is gone without a trace, e.g. its host '
            f'crashed, its lock counts as stale {STALE_AFTER_S / 60:.0f} min after its last '
            f'heartbeat; deleting {self.path} takes over at once.)')
      if self._take_over(holder):
        logger.warning('Took over the stale lock of %s (%s): %s.', self.path.parent,
                       holder.describe() if holder else 'unreadable lock file', reason)
    raise WorkdirBusyError(f'Could not lock {self.path.parent}: other starts keep taking it.')

  def _start_heartbeat(self) -> None:
    def beat():
      while not self._stop.wait(HEARTBEAT_S):
        try:
          if _read_holder(self.path) != self.holder:
            raise FileNotFoundError(self.path)
          os.utime(self.path)
        except OSError:
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
    if _read_holder(self.path) == self.holder:
      self.path.unlink()

  def __enter__(self) -> 'WorkdirLock':
    self.acquire()
    return self

  def __exit__(self, *exc_info) -> None:
    self.release()


def lock_workdir(workdir: pathlib.Path) -> WorkdirLock | None:
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


def latest_config(workdir: pathlib.Path) -> ml_collections.ConfigDict | None:
  """The config of the newest start recorded in WORKDIR/runs/ (None if there is none)."""
  for record in sorted((pathlib.Path(workdir) / RUNS_DIR).glob('*.json'), reverse=True):
    try:
      return ml_collections.ConfigDict(json.loads(record.read_text())['config'])
    except (OSError, ValueError, KeyError) as e:  # Cut short by an older version's crash.
      logger.warning('Skipping unreadable run record %s (%s).', record, e)
  return None


def write_record(workdir: pathlib.Path, config: ml_collections.ConfigDict,
                     resumed_from: int | None, mesh: jax.sharding.Mesh | None = None
                     ) -> pathlib.Path | None:
  """Writes this start's record into WORKDIR/runs/ (process 0 only); returns its path.

  The file name is unique to this start and created exclusively, so no record is ever replaced;
  the record appears whole or not at all (written aside, then hard-linked into place), so a run
  killed while writing it leaves no partial JSON behind.
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
  runs = workdir / RUNS_DIR
  runs.mkdir(parents=True, exist_ok=True)
  aside = runs / f'.{uuid.uuid4().hex}.tmp'
  try:  # The file aside goes away whatever happens, a full disk included.
    with open(aside, 'w') as f:
      json.dump(record, f, indent=2)
      f.write('\n')
      f.flush()
      os.fsync(f.fileno())
    while True:  # One process may start twice within a clock tick (tests, notebooks).
      stamp = datetime.datetime.now(datetime.timezone.utc).strftime('%Y%m%dT%H%M%S.%fZ')
      path = runs / f'{stamp}_{record["host"]}_{record["pid"]}.json'
      try:
        os.link(aside, path)  # Atomic, and fails if the name exists.
        return path
      except FileExistsError:
        continue
      except OSError:  # A filesystem without hard links (some network mounts): rename instead.
        if not path.exists():
          os.replace(aside, path)
          return path
  finally:
    aside.unlink(missing_ok=True)
