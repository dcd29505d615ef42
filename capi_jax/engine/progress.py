"""Live training numbers (step time, throughput, MFU, input wait, ETA) and step profiles.

`LiveStats` turns wall-clock time between two logging steps into the numbers of every log
line, metrics.jsonl row and TensorBoard scalar:
  step_time_s               wall time per step over the interval (the host syncs with the
                            devices at logging steps, so dispatch runs ahead in between and the
                            interval's time is the devices' time, or the input pipeline's);
  images_per_s              global batch / step time;
  tflops_per_s_per_device   `Method.flops_per_step()['total']` / step time / device count;
  mfu                       that / the device kind's dense bf16 peak (`base.hardware`), only
                            where a peak is known (not on CPU, not for float32 compute);
  data_wait_fraction        the share of the interval the loop spent getting the next batch
                            (waiting for the input pipeline and assembling the global batch);
  eta_s                     steps left x the mean step time of this run segment.
Time spent outside training steps (evaluations, starting and writing a profile) is left out.

`StepProfiler` records a `jax.profiler` trace of the steps `config.train.profile_steps` =
(START, STOP) names, START <= step < STOP (0-based, as metrics.jsonl counts them), on process 0,
into WORKDIR/profile/plugins/profile/<time>/: `<host>.xplane.pb` for TensorBoard's profile
plugin (`tensorboard --logdir WORKDIR/profile`, with `tensorboard-plugin-profile` installed) and
`perfetto_trace.json.gz` for https://ui.perfetto.dev (open the file there). Steps are marked
with `StepTraceAnnotation('train', step_num=...)`.
"""

from collections.abc import Sequence
import contextlib
import logging
import os
import time
from typing import Any

import jax

from capi_jax.base import storage

logger = logging.getLogger(__name__)

# The keys LiveStats adds to a logging step's metrics: they depend on the machine and its load.
TIMING_KEYS = ('step_time_s', 'images_per_s', 'tflops_per_s_per_device', 'mfu',
               'data_wait_fraction', 'eta_s')


class LiveStats:
  """Throughput numbers per logging interval (see the module docstring)."""

  def __init__(self, *, total_steps: int, global_batch: int, flops_per_step: float,
               device_count: int, peak_flops_per_device: float | None):
    self.total_steps = total_steps
    self.global_batch = global_batch
    self.flops_per_step = flops_per_step
    self.device_count = device_count
    self.peak = peak_flops_per_device
    self._start, self._start_step = time.perf_counter(), 0
    self._waited = self._excluded = 0.0
    self._segment_s, self._segment_steps = 0.0, 0

  def restart(self, step: int) -> None:
    """Begins an interval now, `step` steps done (after compiling: compile time is not a step)."""
    self._start, self._start_step = time.perf_counter(), step
    self._waited = self._excluded = 0.0

  @contextlib.contextmanager
  def _adding_time_to(self, attribute: str):
    start = time.perf_counter()
    try:
      yield
    finally:
      setattr(self, attribute, getattr(self, attribute) + time.perf_counter() - start)

  def waiting_for_data(self) -> contextlib.AbstractContextManager[None]:
    """Times the body as input-pipeline wait."""
    return self._adding_time_to('_waited')

  def excluded(self) -> contextlib.AbstractContextManager[None]:
    """Leaves the body's time out of the step time (evaluations, profiler start / stop)."""
    return self._adding_time_to('_excluded')

  def interval(self, done: int) -> dict[str, float]:
    """The numbers since the last call (or `restart`), `done` steps completed; starts the next
    interval. Call after syncing with the devices."""
    now = time.perf_counter()
    seconds = max(now - self._start - self._excluded, 1e-9)
    steps = max(done - self._start_step, 1)
    step_time = seconds / steps
    self._segment_s += seconds
    self._segment_steps += steps
    flops_per_device = self.flops_per_step / step_time / self.device_count
    values = {
        'step_time_s': step_time,
        'images_per_s': self.global_batch / step_time,
        'tflops_per_s_per_device': flops_per_device / 1e12,
    }
    if self.peak:
      values['mfu'] = flops_per_device / self.peak
    values['data_wait_fraction'] = min(self._waited / seconds, 1.0)
    values['eta_s'] = (self.total_steps - done) * self._segment_s / self._segment_steps
    self._start, self._start_step = now, done
    self._waited = self._excluded = 0.0
    return values


class StepProfiler:
  """A jax.profiler trace of steps [start, stop), on process 0 (see the module docstring).

  jax.profiler writes local files only (and its own GCS client cannot be pointed anywhere but
  Google): the trace goes into `storage.staged_dir(directory)`, the folder itself when it is
  local, else a temporary one uploaded to gs:// when the trace closes. Starting and writing the
  trace are left out of `stats`' step times.
  """

  def __init__(self, directory: str | os.PathLike[str], steps: Sequence[int], enabled: bool,
               stats: LiveStats):
    self.directory = directory
    self.start, self.stop = (int(steps[0]), int(steps[1])) if steps else (-1, -1)
    self.enabled = enabled and bool(steps)
    self.stats = stats
    self._stage = contextlib.ExitStack()
    self.active = False

  def before_step(self, step: int) -> None:
    """Starts the trace when `step` is the first to profile."""
    if self.enabled and step == self.start:
      with self.stats.excluded():
        local = self._stage.enter_context(storage.staged_dir(self.directory))
        jax.profiler.start_trace(str(local), create_perfetto_trace=True)
      self.active = True
      logger.info('Profiling steps %d to %d into %s.', self.start, self.stop - 1, self.directory)

  def after_step(self, step: int, outputs: Any) -> None:
    """Waits for `outputs` and writes the trace when `step` is the last to profile."""
    if self.active and step + 1 >= self.stop:
      jax.block_until_ready(outputs)
      self.finish()

  def finish(self) -> None:
    """Writes the trace if one is running (also when training stops early)."""
    if self.active:
      self.active = False
      with self.stats.excluded():
        jax.profiler.stop_trace()
        self._stage.close()
      logger.info('Profile written to %s: open it with TensorBoard (tensorboard --logdir %s, '
                  'profile tab) or perfetto_trace.json.gz at ui.perfetto.dev.', self.directory,
                  self.directory)

