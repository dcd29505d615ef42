"""Training metrics to stdout, `WORKDIR/metrics.jsonl` and TensorBoard (tensorboardX, no TF).

Only process 0 writes; other processes get a writer that does nothing. A run resumed at step
S (from a checkpoint older than the last rows written, or after a crash) first drops the rows
of steps >= S from metrics.jsonl and hides TensorBoard's events of those steps, so that no
step ever appears twice.
"""

import json
import logging
import pathlib
from typing import Any

import numpy as np
import tensorboardX
import tqdm

logger = logging.getLogger(__name__)
METRICS_FILE = 'metrics.jsonl'


def _to_python(value: Any) -> Any:
  if isinstance(value, (np.ndarray, np.generic)) or hasattr(value, '__array__'):
    value = np.asarray(value)
    return value.item() if value.size == 1 else value.tolist()
  return value


def truncate_jsonl(path: pathlib.Path, start_step: int) -> None:
  """Keeps the rows of `path` with step < start_step (and drops a line cut short by a kill)."""
  if not path.exists():
    return
  lines = path.read_text().splitlines()
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
    tmp = path.with_name(path.name + '.tmp')
    tmp.write_text(''.join(l + '\n' for l in kept))
    tmp.replace(path)


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
  """One JSON object per line in metrics.jsonl, one log line, one TensorBoard scalar per key."""

  def __init__(self, workdir: str | pathlib.Path, *, enabled: bool = True, start_step: int = 0,
               total_steps: int | None = None):
    """A writer for a run (segment) that begins at `start_step` (steps already done) of
    `total_steps` (shown in each line)."""
    self.enabled = enabled
    self.total_steps = total_steps
    self.workdir = pathlib.Path(workdir)
    self._jsonl = None
    self._tb = None
    if enabled:
      self.workdir.mkdir(parents=True, exist_ok=True)
      path = self.workdir / METRICS_FILE
      # Appending keeps the rows of earlier (pre-emption) segments of the same run; rows past
      # the resumed step are from a segment whose work was lost, and are written again.
      truncate_jsonl(path, start_step)
      self._jsonl = open(path, 'a')
      self._tb = tensorboardX.SummaryWriter(str(self.workdir / 'tensorboard'),
                                            purge_step=start_step)

  def write(self, step: int, metrics: dict[str, Any]) -> None:
    """Training scalars for `step`: a metrics.jsonl line, a stdout line, TensorBoard."""
    if not self.enabled:
      return
    values = {k: _to_python(v) for k, v in metrics.items()}
    self._jsonl.write(json.dumps({'step': int(step), **values}) + '\n')
    self._jsonl.flush()
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
        self._tb.add_scalar(prefix + k, v, step)
    self._tb.flush()

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._tb.close()
