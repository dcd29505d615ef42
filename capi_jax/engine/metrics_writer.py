"""Training metrics to stdout, `WORKDIR/metrics.jsonl` and TensorBoard (tensorboardX, no TF).

Only process 0 writes; other processes get a writer that does nothing. A run resumed at step
S (from a checkpoint older than the last rows written, or after a crash) first drops the rows
of steps >= S from metrics.jsonl and hides TensorBoard's events of those steps, so that no
step ever appears twice.
"""

import json
import logging
import os
import shutil
import tempfile
import time
from typing import Any
import uuid

from etils import epath
import numpy as np
import tensorboardX
import tqdm

from capi_jax.base import storage

logger = logging.getLogger(__name__)
METRICS_FILE = 'metrics.jsonl'
GCS_FLUSH_S = 10.0  # On GCS: the most seconds between two writes of metrics.jsonl / events.


def _to_python(value: Any) -> Any:
  if isinstance(value, (np.ndarray, np.generic)) or hasattr(value, '__array__'):
    value = np.asarray(value)
    return value.item() if value.size == 1 else value.tolist()
  return value


def truncate_jsonl(path: str | os.PathLike[str], start_step: int) -> None:
  """Keeps the rows of `path` with step < start_step (and drops a line cut short by a kill)."""
  path = storage.path(path)
  if not path.exists():
    return
  text = path.read_text()
  lines = text.splitlines()
  kept = []
  for line in lines:
    try:
      row = json.loads(line)
    except ValueError:
      continue
    if isinstance(row, dict) and isinstance(row.get('step'), int) and row['step'] < start_step:
      kept.append(line)
  if len(kept) < len(lines):
    logger.info('%s: dropped %d rows of steps >= %d (written after the checkpoint this run '
                'resumes from).', path, len(lines) - len(kept), start_step)
  if len(kept) < len(lines) or (text and not text.endswith('\n')):
    # A last row written whole but without its newline (a kill between the two) would glue
    # the next row appended onto it: every kept row gets its newline back.
    storage.write_atomic(path, ''.join(l + '\n' for l in kept))


class _TensorBoard:
  """tensorboardX's writer into `directory`.

  tensorboardX's own gs:// writer keeps each event file in memory and uploads it whole at every
  flush (and again at interpreter exit). On GCS this one writes to a local folder instead and
  `flush` appends what its event files gained since the last flush to their copies in
  `directory` (`storage.AppendOnlyFile`: the new bytes only). Event files there get a random
  suffix: a later run's file never replaces an earlier one (names have 1 s resolution).
  """

  def __init__(self, directory: epath.Path, start_step: int):
    self.directory = directory
    self._local = None
    self._uploaded: dict[str, tuple[storage.AppendOnlyFile, int]] = {}
    suffix = ''
    if storage.is_gcs(directory):
      self._local = tempfile.mkdtemp(prefix='capi_jax_tensorboard_')
      suffix = f'.{uuid.uuid4().hex[:8]}'
    self.writer = tensorboardX.SummaryWriter(
        self._local or os.fspath(directory), purge_step=start_step, filename_suffix=suffix)

  def flush(self) -> None:
    self.writer.flush()
    if self._local is None:
      return
    for name, info in storage.list_files(self._local).items():
      target, done = self._uploaded.get(name) or (
          storage.AppendOnlyFile(self.directory / name), 0)
      if info.size > done:
        with open(os.path.join(self._local, name), 'rb') as f:
          f.seek(done)
          target.append(f.read(info.size - done))
      self._uploaded[name] = (target, info.size)

  def close(self) -> None:
    self.writer.close()
    if self._local is not None:
      self.flush()
      shutil.rmtree(self._local, ignore_errors=True)


def log_line(step: int, values: dict[str, Any], total_steps: int | None = None) -> str:
  """'[step 499/2000] loss=0.123, ..., eta=0:05:12': one line per logging step, also the
  progress report of runs whose stderr is not a terminal (no progress bar there)."""
  def one(key: str, value: Any) -> str:
    if key == 'eta_s' and isinstance(value, float):
      seconds = int(round(value))
      return f'eta={seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}'
    return f'{key}={value:.6g}' if isinstance(value, float) else f'{key}={value}'

  where = f'{step}/{total_steps}' if total_steps else f'{step}'
  return f'[step {where}] ' + ', '.join(one(k, v) for k, v in values.items())


class MetricsWriter:
  """One JSON object per line in metrics.jsonl, one log line, one TensorBoard scalar per key.

  Locally every row is written at once. On GCS (an object accepts about one update per second)
  rows and events are sent at most every `GCS_FLUSH_S`, at `flush()` (the training loop calls
  it before each checkpoint, so that the rows of the steps a checkpoint covers are stored before
  it) and at `close()`.
  """

  def __init__(self, workdir: str | os.PathLike[str], *, enabled: bool = True,
               start_step: int = 0, total_steps: int | None = None):
    """A writer for a run (segment) that begins at `start_step` (steps already done) of
    `total_steps` (shown in each line)."""
    self.enabled = enabled
    self.total_steps = total_steps
    self.workdir = storage.path(workdir)
    self._flush_every_s = GCS_FLUSH_S if storage.is_gcs(self.workdir) else 0.0
    self._last_flush = time.monotonic()
    self._pending: list[str] = []
    self._jsonl = None
    self._tb = None
    if enabled:
      storage.makedirs(self.workdir)
      path = self.workdir / METRICS_FILE
      # Appending keeps the rows of earlier (pre-emption) segments of the same run; rows past
      # the resumed step are from a segment whose work was lost, and are written again.
      truncate_jsonl(path, start_step)
      self._jsonl = storage.AppendOnlyFile(path)
      self._tb = _TensorBoard(self.workdir / 'tensorboard', start_step)

  def write(self, step: int, metrics: dict[str, Any]) -> None:
    """Training scalars for `step`: a metrics.jsonl line, a stdout line, TensorBoard."""
    if not self.enabled:
      return
    values = {k: _to_python(v) for k, v in metrics.items()}
    self._pending.append(json.dumps({'step': int(step), **values}) + '\n')
    # tqdm.write keeps a progress bar (if any) intact below the line.
    tqdm.tqdm.write(log_line(step, values, self.total_steps))
    self.write_tensorboard(step, values)

  def write_tensorboard(self, step: int, metrics: dict[str, Any], prefix: str = '') -> None:
    """Scalars to TensorBoard only, tags prefixed (e.g. 'eval/': evaluations have their own
    results.json and table)."""
    if not self.enabled:
      return
    for k, v in metrics.items():
      v = _to_python(v)
      if isinstance(v, (int, float)) and not isinstance(v, bool):
        self._tb.writer.add_scalar(prefix + k, v, step)
    if time.monotonic() - self._last_flush >= self._flush_every_s:
      self.flush()

  def flush(self) -> None:
    """Stores every row and event written so far."""
    if not self.enabled:
      return
    if self._pending:
      self._jsonl.append(''.join(self._pending))
      self._pending = []
    self._tb.flush()
    self._last_flush = time.monotonic()

  def close(self) -> None:
    if self.enabled:
      self.flush()
      self._jsonl.close()
      self._tb.close()
