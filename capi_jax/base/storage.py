"""Paths that are local or gs://: the one layer every file of a run goes through.

Every path is an `etils.epath.Path` made by `path()`: local paths stay plain (absolute, on the
local file system), `gs://bucket/...` stays a GCS path (never `pathlib.Path(p).absolute()`, which
turns it into a local folder `./gs:/bucket/...`; epath's own `absolute()` / `resolve()` do the
same). Reads, writes, listings and deletions go through epath; what it does not give, or gives
differently on GCS, is here:

  - `write_atomic`: readers see the old or the new content, never a part. One GCS object upload
    already is that; locally: write aside, fsync, `os.replace`.
  - `create_exclusive`: create-if-absent, atomic among processes and hosts, and the file appears
    whole (locally: written aside, then hard-linked into place; GCS: `ifGenerationMatch=0`).
  - `read_versioned` / `replace_if_version` / `delete_if_version`: compare-and-swap on GCS
    object generations (the workdir lock's heartbeats and take-overs).
  - `AppendOnlyFile`: appends that keep what is there. epath's `open('a')` silently overwrites
    on GCS; here each append uploads only the new bytes and composes them onto the object on the
    server (one object, any reader; GCS documents compose as its way of appending).
  - `read_range`: part of a file, from several threads at once (one ranged request on GCS).
  - `open_read_ahead`: a file read front to back with forward seeks (a tar's headers) in large
    chunks on GCS, where epath's reader makes a request per read.
  - `list_files`: every file below a folder with its size and, on GCS, the server's CRC32C
    (one paged listing; epath's `walk()` yields roots without `gs://` there, and `rglob` /
    `glob('**')` are refused).
  - `stat`: a file's size and a version that changes whenever its content is rewritten (keys
    of caches derived from the file).
  - `upload_tree`, `staged_dir`, `staged_file`, `local_copy`: for writers and readers that only
    know local files (TFDS / ArrayRecord, matplotlib, PIL, torch, tensorboardX, jax.profiler):
    work on local disk, then upload (or download first).
  - `move_tree`, `makedirs`, `free_bytes`: what differs for folders (a GCS folder is a name
    prefix: `mkdir` creates nothing, a rename copies each object, there is no free space).

GCS needs the `gcs` extra (gcsfs, google-cloud-storage). On a Cloud TPU VM the clients use the
VM's service account; against an emulator, `STORAGE_EMULATOR_HOST` and the variables of
`tests/gcs_netns.py`.

Importing this module turns gcsfs's listing cache off (before the first gs:// access of the
process, which is why every path goes through here): with it, a process that listed a folder
answers `exists()` and reads of files that other processes (hosts) wrote or grew since from that
stale listing (False, FileNotFoundError, content cut at the old size).
"""

from collections.abc import Iterator
import contextlib
import dataclasses
import os
import pathlib
import shutil
import tempfile
import threading
from typing import BinaryIO
import uuid

from etils import epath
import fsspec

from capi_jax.base import errors

fsspec.config.conf.setdefault('gcs', {})['use_listings_cache'] = False

GCS_PREFIX = 'gs://'
CACHE_ENV = 'CAPI_JAX_CACHE'  # The root of capi_jax's caches (downloads, indexes).
PathLike = str | os.PathLike[str]
Path = epath.Path
_COPY_BUFFER = 8 * 2**20
_READ_AHEAD = 16 * 2**20  # open_read_ahead's chunk on GCS: a 1 GB tar shard in 64 requests.
_MAX_COMPONENTS = 1000  # Appends (composes) before an appended GCS object is rewritten whole.


class UnsupportedPathError(errors.UserError, ValueError):
  """A path on a storage system capi_jax does not write to (only local and gs://)."""


def is_gcs(p: PathLike) -> bool:
  return os.fspath(p).startswith(GCS_PREFIX)


def path(p: PathLike) -> epath.Path:
  """`p` as an epath Path: gs:// as is, a local path made absolute (symlinks kept)."""
  s = os.fspath(p)
  if is_gcs(s):
    return epath.Path(s)
  if '://' in s:
    raise UnsupportedPathError(f'{s}: capi_jax reads and writes local paths and gs:// only.')
  return epath.Path(pathlib.Path(s).absolute())


def _as_bytes(data: bytes | str) -> bytes:
  return data.encode() if isinstance(data, str) else data


# ------------------------------------------------------------------------------ GCS clients
_CLIENT = None
_CLIENT_LOCK = threading.Lock()


def _gcs():
  """(google.cloud.storage, google.api_core.exceptions), or a UserError naming the extra."""
  try:
    from google.api_core import exceptions  # pylint: disable=g-import-not-at-top
    from google.cloud import storage as gcs  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise errors.UserError('gs:// paths need the gcs extra: pip install "capi_jax[gcs]".') from e
  return gcs, exceptions


def _blob(p: PathLike):
  """A google-cloud-storage Blob for gs:// path `p` (one client per process)."""
  global _CLIENT
  gcs, _ = _gcs()
  with _CLIENT_LOCK:
    if _CLIENT is None:
      # A Cloud TPU VM: its service account (application-default credentials). Under
      # STORAGE_EMULATOR_HOST: the emulator, anonymously.
      _CLIENT = gcs.Client()
  bucket, _, name = os.fspath(p).removeprefix(GCS_PREFIX).partition('/')
  return _CLIENT.bucket(bucket).blob(name)


def _fs():
  """gcsfs's file system (listings, server-side copies)."""
  _gcs()  # The same message when the extra is missing.
  return fsspec.filesystem('gcs')


# ------------------------------------------------------------------------------ whole files
@contextlib.contextmanager
def _written_aside(p: PathLike, data: bytes) -> Iterator[str]:
  """A new local file next to `p` holding `data`, on disk (fsync); removed when the block ends,
  whatever happens (a full disk included), unless the block moved it."""
  aside = f'{os.fspath(p)}.{uuid.uuid4().hex[:8]}.tmp'
  try:
    with open(aside, 'wb') as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    yield aside
  finally:
    if os.path.exists(aside):
      os.remove(aside)


def write_atomic(p: PathLike, data: bytes | str) -> None:
  """Writes `data` to file `p` so that readers see the old or the new content, never a part."""
  data = _as_bytes(data)
  if is_gcs(p):
    path(p).write_bytes(data)  # One object upload: atomic on GCS.
    return
  with _written_aside(p, data) as aside:
    os.replace(aside, os.fspath(p))


def create_exclusive(p: PathLike, data: bytes | str) -> bool:
  """Creates file `p` holding `data` unless something is there; True if this call created it.

  Atomic among processes and hosts, and the file appears whole or not at all. Pass `data` that
  is unique to the caller (a token, a pid and a time): a retried request whose first attempt
  succeeded then finds its own content and still counts as the creator.
  """
  data = _as_bytes(data)
  if is_gcs(p):
    _, exceptions = _gcs()
    blob = _blob(p)
    try:
      # A multipart upload (small data): the precondition holds for the whole request.
      # fake-gcs-server enforces preconditions on this upload kind only.
      blob.upload_from_string(data, if_generation_match=0)
    except exceptions.PreconditionFailed:
      current = read_versioned(p)
      return current is not None and current.data == data
    return True
  with _written_aside(p, data) as aside:
    try:
      os.link(aside, os.fspath(p))  # Atomic, and fails if `p` exists.
      return True
    except FileExistsError:
      return False
    except OSError:  # A file system without hard links (some network mounts).
      pass
  try:
    fd = os.open(os.fspath(p), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
  except FileExistsError:
    return False
  with os.fdopen(fd, 'wb') as f:  # Readers may see it empty for a moment here.
    f.write(data)
    f.flush()
    os.fsync(f.fileno())
  return True


def read_range(p: PathLike, offset: int, size: int) -> bytes:
  """`size` bytes of file `p` from `offset`: one ranged request on GCS, `pread` locally; safe
  from several threads at once (a shared file object's seek + read is not)."""
  if size <= 0:
    return b''
  if is_gcs(p):
    return _blob(p).download_as_bytes(start=offset, end=offset + size - 1)
  fd = os.open(p, os.O_RDONLY)
  try:
    return os.pread(fd, size, offset)
  finally:
    os.close(fd)


def open_read_ahead(p: PathLike, chunk_bytes: int = _READ_AHEAD) -> BinaryIO:
  """File `p` for reading front to back, forward seeks included: locally a buffered file (a seek
  costs nothing); on GCS a reader that downloads `chunk_bytes` at a time. (epath's gcsfs reader
  fetches at each read after a seek there: a tar's member table cost a request per member.)"""
  if is_gcs(p):
    return _blob(p).open('rb', chunk_size=chunk_bytes)
  return path(p).open('rb')


# --------------------------------------------------------------------------- compare-and-swap (GCS)
@dataclasses.dataclass(frozen=True)
class Versioned:
  """A GCS object's content with its generation and the server's time of that generation."""
  data: bytes
  version: int
  updated: float  # POSIX seconds, the server's clock.


def read_versioned(p: PathLike) -> Versioned | None:
  """gs:// object `p` read consistently (the content is that generation's); None if absent."""
  _, exceptions = _gcs()
  blob = _blob(p)
  for _ in range(5):  # Replaced between the metadata read and the download: read again.
    try:
      blob.reload()
      data = blob.download_as_bytes(if_generation_match=blob.generation)
    except exceptions.NotFound:
      return None
    except exceptions.PreconditionFailed:
      continue
    return Versioned(data, blob.generation, blob.updated.timestamp())
  raise RuntimeError(f'{p} keeps changing while being read.')


def replace_if_version(p: PathLike, data: bytes | str, version: int) -> int | None:
  """Replaces gs:// object `p` with `data` if its generation is still `version`.

  Returns: the new generation, or None if `p` changed (or vanished) since `version`. As for
  `create_exclusive`, `data` unique to the caller makes a retried request safe.
  """
  _, exceptions = _gcs()
  data = _as_bytes(data)
  blob = _blob(p)
  try:
    blob.upload_from_string(data, if_generation_match=version)  # Multipart: enforced.
  except exceptions.PreconditionFailed:
    current = read_versioned(p)
    return current.version if current is not None and current.data == data else None
  return blob.generation


def delete_if_version(p: PathLike, version: int) -> bool:
  """Deletes gs:// object `p` if its generation is still `version`; False if it changed.

  fake-gcs-server 1.54 ignores this precondition (it deletes anyway); GCS honours it.
  """
  _, exceptions = _gcs()
  try:
    _blob(p).delete(if_generation_match=version)
  except exceptions.PreconditionFailed:
    return False
  except exceptions.NotFound:  # Gone already (also: a retried request that succeeded).
    pass
  return True


# ------------------------------------------------------------------------------ appending
class AppendOnlyFile:
  """A file that only grows, local or gs://: nothing appended is ever rewritten or lost.

  Locally an `open('ab')` file, flushed to the OS at each `append`. On GCS each `append` uploads
  the new bytes as a temporary object next to the file, composes [file, new bytes] into the file
  on the server (conditional on the file's generation: a second writer fails loudly instead of
  interleaving) and deletes the temporary object: three requests, whatever the file's size.
  GCS allows about one update per second of one object: callers batch their appends. A composed
  object counts its components (documented up to 1024): after `_MAX_COMPONENTS` appends it is
  rewritten whole once (one download and upload), which resets the count.
  """

  def __init__(self, p: PathLike):
    self.path = path(p)
    self._file = None
    self._generation: int | None = None  # GCS: the file's generation and size as last written.
    self._size = 0
    self._components = 0  # GCS: the server's component count, or appends counted here.
    if not is_gcs(self.path):
      self._file = open(self.path, 'ab')

  def append(self, data: bytes | str) -> None:
    data = _as_bytes(data)
    if not data:
      return
    if self._file is not None:
      self._file.write(data)
      self._file.flush()
      return
    _, exceptions = _gcs()
    blob = _blob(self.path)
    if self._generation is None:
      try:
        blob.reload()
      except exceptions.NotFound:
        if not create_exclusive(self.path, data):
          raise RuntimeError(f'{self.path} appeared while this process created it: is another '
                             'process writing it?') from None
        blob.reload()
        self._generation, self._size, self._components = blob.generation, blob.size, 1
        return
      self._generation, self._size = blob.generation, blob.size
      self._components = blob.component_count or 1
    # Not named like the file: readers that pick files by name (TensorBoard reads any
    # '*tfevents*') never see a piece.
    piece = _blob(self.path.parent / f'.append-{uuid.uuid4().hex[:12]}.tmp')
    piece.upload_from_string(data)
    try:
      try:
        blob.compose([blob, piece], if_generation_match=self._generation)
      except exceptions.PreconditionFailed:
        # A retried compose whose first attempt succeeded lands here too: accept it only if
        # the file is exactly what it was plus `data`.
        blob.reload()
        if (blob.size != self._size + len(data) or
            blob.download_as_bytes(start=self._size) != data):
          raise RuntimeError(f'{self.path} was changed by another writer.') from None
      self._generation, self._size = blob.generation, self._size + len(data)
      self._components = max(blob.component_count or 0, self._components + 1)
    finally:
      try:
        piece.delete()
      except exceptions.NotFound:
        pass
    if self._components >= _MAX_COMPONENTS:
      whole = blob.download_as_bytes(if_generation_match=self._generation)
      blob.upload_from_string(whole, if_generation_match=self._generation)
      self._generation, self._components = blob.generation, 1

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
      self._file = None


# ------------------------------------------------------------------------------ folders
@dataclasses.dataclass(frozen=True)
class FileInfo:
  """A file's size and, on GCS, the server's CRC32C of its content (base64, as GCS gives it)."""
  size: int
  crc32c: str | None = None


def list_files(top: PathLike) -> dict[str, FileInfo]:
  """Every file below folder `top`: {'/'-separated path relative to it: FileInfo}, sorted.

  {} if `top` holds nothing (or does not exist). On GCS one paged listing gives sizes and
  checksums; locally `os.walk` (symlinks to folders not followed).
  """
  top = path(top)
  if is_gcs(top):
    prefix = os.fspath(top).removeprefix(GCS_PREFIX).rstrip('/') + '/'
    found = _fs().find(prefix, detail=True)
    return {name.removeprefix(prefix): FileInfo(int(info['size']), info.get('crc32c'))
            for name, info in sorted(found.items())
            if not name.endswith('/') and info.get('type') != 'directory'}
  out = {}
  for root, _, names in os.walk(top):
    relative = os.path.relpath(root, top)
    for name in names:
      rel = name if relative == '.' else f'{relative.replace(os.sep, "/")}/{name}'
      out[rel] = FileInfo(os.stat(os.path.join(root, name)).st_size)
  return dict(sorted(out.items()))


@dataclasses.dataclass(frozen=True)
class Stat:
  """A file's size and version: the GCS object's generation (any upload makes a new one);
  locally its inode and modification time in ns (a rewrite or an `os.replace` changes them)."""
  size: int
  version: str


def stat(p: PathLike) -> Stat:
  """File `p`'s size and version (one metadata request on GCS); FileNotFoundError if absent."""
  if is_gcs(p):
    _, exceptions = _gcs()
    blob = _blob(p)
    try:
      blob.reload()
    except exceptions.NotFound as e:
      raise FileNotFoundError(os.fspath(p)) from e
    return Stat(blob.size, str(blob.generation))
  info = os.stat(path(p))
  return Stat(info.st_size, f'{info.st_ino}-{info.st_mtime_ns}')


def cache_dir(kind: str) -> Path:
  """capi_jax's cache folder for `kind` ('releases', 'wds_index'): $CAPI_JAX_CACHE/kind (gs://
  allowed where the kind's user writes through this module), default ~/.cache/capi_jax/kind."""
  return path(os.environ.get(CACHE_ENV) or os.path.expanduser('~/.cache/capi_jax')) / kind


def crc32c(p: PathLike) -> str:
  """The CRC32C of file `p`'s content, base64 as GCS gives it (gs://: the server's, no read)."""
  p = path(p)
  if is_gcs(p):
    blob = _blob(p)
    blob.reload()
    return blob.crc32c
  try:
    import google_crc32c  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise errors.UserError(f'Checking {p} needs google-crc32c (pip install "capi_jax[gcs]"): '
                           'its checksums were taken on GCS.') from e
  import base64  # pylint: disable=g-import-not-at-top
  checksum = google_crc32c.Checksum()
  with open(p, 'rb') as f:
    while chunk := f.read(_COPY_BUFFER):
      checksum.update(chunk)
  return base64.b64encode(checksum.digest()).decode()


def makedirs(p: PathLike) -> epath.Path:
  """Creates local folder `p` (and parents); on GCS nothing (a folder is a name prefix)."""
  p = path(p)
  if not is_gcs(p):
    p.mkdir(parents=True, exist_ok=True)
  return p


def free_bytes(p: PathLike) -> int | None:
  """Free space of the local file system holding `p`; None on GCS (no such limit)."""
  return None if is_gcs(p) else shutil.disk_usage(os.fspath(p)).free


def copy_file(src: PathLike, dst: PathLike) -> None:
  """Copies one file between any two places (GCS to GCS: a copy on the server)."""
  src, dst = path(src), path(dst)
  if is_gcs(src) and is_gcs(dst):
    _fs().copy(os.fspath(src), os.fspath(dst))
    return
  if not is_gcs(dst):
    dst.parent.mkdir(parents=True, exist_ok=True)
  with src.open('rb') as fin, dst.open('wb') as fout:
    shutil.copyfileobj(fin, fout, _COPY_BUFFER)


def upload_tree(local_dir: PathLike, dst: PathLike, *, last: tuple[str, ...] = ()) -> int:
  """Copies every file below `local_dir` into folder `dst` (any backend); returns the count.

  Each file appears whole; the files named in `last` (relative paths) are copied after all
  others, so that a reader that waits for them finds everything else in place.
  """
  files = list(list_files(local_dir))
  files = [f for f in files if f not in last] + [f for f in last if f in files]
  for rel in files:
    copy_file(path(local_dir) / rel, path(dst) / rel)
  return len(files)


def move_tree(src: PathLike, dst: PathLike, *, first: tuple[str, ...] = ()) -> None:
  """Moves folder `src` to `dst` (which must not exist).

  Locally one atomic rename. On GCS each object is copied on the server, then the sources are
  deleted, those named in `first` (relative paths) before the others: not atomic, O(objects).
  """
  src, dst = path(src), path(dst)
  if not is_gcs(src) and not is_gcs(dst):
    dst.parent.mkdir(parents=True, exist_ok=True)
    os.rename(src, dst)
    return
  files = list(list_files(src))
  for rel in files:
    copy_file(src / rel, dst / rel)
  for rel in [f for f in first if f in files] + [f for f in files if f not in first]:
    (src / rel).unlink(missing_ok=True)


def remove_tree(p: PathLike) -> None:
  """Deletes folder `p` and everything below it (nothing if it does not exist)."""
  p = path(p)
  if is_gcs(p):
    for rel in list_files(p):
      (p / rel).unlink(missing_ok=True)
  elif p.exists():
    shutil.rmtree(p)


# ------------------------------------------------------------------------------ local staging
@contextlib.contextmanager
def staged_dir(dst: PathLike, *, last: tuple[str, ...] = ()) -> Iterator[epath.Path]:
  """A local folder to write `dst`'s files into: `dst` itself when it is local; otherwise a
  temporary folder uploaded to `dst` (`upload_tree`, `last` last) when the block ends without
  an error, and removed either way."""
  dst = path(dst)
  if not is_gcs(dst):
    yield makedirs(dst)
    return
  local = tempfile.mkdtemp(prefix='capi_jax_stage_')
  try:
    yield path(local)
    upload_tree(local, dst, last=last)
  finally:
    shutil.rmtree(local, ignore_errors=True)


@contextlib.contextmanager
def staged_file(dst: PathLike) -> Iterator[epath.Path]:
  """A local file path to write `dst` at: `dst` itself when local; otherwise a temporary file
  uploaded to `dst` (one upload: it appears whole) when the block ends without an error."""
  dst = path(dst)
  if not is_gcs(dst):
    yield dst
    return
  with staged_dir(dst.parent) as local:
    yield local / dst.name


@contextlib.contextmanager
def local_copy(p: PathLike) -> Iterator[epath.Path]:
  """A local path holding file `p`'s content: `p` itself when local; otherwise a temporary
  download, removed when the block ends."""
  p = path(p)
  if not is_gcs(p):
    yield p
    return
  local = tempfile.mkdtemp(prefix='capi_jax_download_')
  try:
    copy_file(p, path(local) / p.name)
    yield path(local) / p.name
  finally:
    shutil.rmtree(local, ignore_errors=True)
