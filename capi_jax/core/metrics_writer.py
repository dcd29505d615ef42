"""Training metrics to stdout, `WORKDIR/metrics.jsonl` and TensorBoard (tensorboardX, no TF).

Only process 0 writes; other processes get a writer that does nothing.
"""

import json
import pathlib
from typing import Any

import numpy as np
import tensorboardX
import tqdm


def _to_python(value: Any) -> Any:
  if isinstance(value, (np.ndarray, np.generic)) or hasattr(value, '__array__'):
    value = np.asarray(value)
    return value.item() if value.size == 1 else value.tolist()
  return value


class MetricsWriter:
  """One JSON object per line in metrics.jsonl, one log line, one TensorBoard scalar per key."""

  def __init__(self, workdir: str | pathlib.Path, *, enabled: bool = True):
    self.enabled = enabled
    self.workdir = pathlib.Path(workdir)
    self._jsonl = None
    self._tb = None
    if enabled:
      self.workdir.mkdir(parents=True, exist_ok=True)
      # Appending keeps the lines of earlier (pre-emption) segments of the same run.
      self._jsonl = open(self.workdir / 'metrics.jsonl', 'a')
      self._tb = tensorboardX.SummaryWriter(str(self.workdir / 'tensorboard'))

  def write(self, step: int, metrics: dict[str, Any]) -> None:
    """Training scalars for `step`: a metrics.jsonl line, a stdout line, TensorBoard."""
    if not self.enabled:
      return
    values = {k: _to_python(v) for k, v in metrics.items()}
    self._jsonl.write(json.dumps({'step': int(step), **values}) + '\n')
    self._jsonl.flush()
    # tqdm.write keeps a progress bar (if any) intact below the line.
    tqdm.tqdm.write(f'[step {step}] ' + ', '.join(
        f'{k}={v:.6g}' if isinstance(v, float) else f'{k}={v}' for k, v in values.items()))
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
