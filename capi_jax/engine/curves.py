"""Training curves: one panel per metric of a run's metrics.jsonl, drawn beside its evaluations."""

from collections.abc import Sequence
import io
import json
import logging
import math
import pathlib

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

from capi_jax.base import storage  # pylint: disable=g-import-not-at-top,wrong-import-position

logger = logging.getLogger(__name__)


def read_metrics(path: str | pathlib.Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """metrics.jsonl -> {key: (steps, values)} for every numeric key."""
  series: dict[str, list[tuple[int, float]]] = {}
  bad = 0
  with open(path) as f:
    for line in f:
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except ValueError:  # A row cut short by a kill, or two glued by an older version.
        bad += 1
        continue
      if not isinstance(record, dict):
        bad += 1
        continue
      step = record.get('step')
      for key, value in record.items():
        if key != 'step' and isinstance(value, (int, float)) and not isinstance(value, bool):
          series.setdefault(key, []).append((step, value))
  if bad:
    logger.warning('%s: %d lines that are not one JSON row each are left out of the curves.',
                   path, bad)
  return {k: (np.array([s for s, _ in v]), np.array([x for _, x in v], np.float64))
          for k, v in series.items()}


def save_training_curves(metrics_path: str | pathlib.Path, path: str | pathlib.Path,
                         keys: Sequence[str] | None = None) -> list[str]:
  """One panel per metric of metrics.jsonl against the step; returns the keys plotted.

  Args:
    metrics_path: the training run's metrics.jsonl.
    path: PNG file to write.
    keys: metrics to plot, default all numeric ones (in first-seen order).
  """
  series = read_metrics(metrics_path)
  keys = [k for k in (keys or series) if k in series and len(series[k][0])]
  if not keys:
    raise ValueError(f'No numeric metric to plot in {metrics_path}.')
  cols = min(3, len(keys))
  rows = math.ceil(len(keys) / cols)
  fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 2.8 * rows), squeeze=False)
  for ax, key in zip(axes.ravel(), keys):
    steps, values = series[key]
    ax.plot(steps, values, marker='.' if len(steps) < 30 else None, linewidth=1)
    ax.set_title(key, fontsize=9)
    ax.set_xlabel('step', fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    # Rates spanning decades (lr warmup, losses falling fast) read better on a log axis.
    finite = values[np.isfinite(values)]
    if len(finite) and finite.min() > 0 and finite.max() / finite.min() > 100:
      ax.set_yscale('log')
  for ax in axes.ravel()[len(keys):]:
    ax.set_axis_off()
  fig.tight_layout()
  buffer = io.BytesIO()
  fig.savefig(buffer, format='png', dpi=100)
  plt.close(fig)
  storage.write_atomic(path, buffer.getvalue())  # Whole or not at all (a full disk).
  return keys
