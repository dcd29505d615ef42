"""Live numbers in every logging step (step time, throughput, MFU, input wait, ETA) and profiles."""

import json

import jax
import pytest

from capi_jax.engine import metrics_writer
from capi_jax.engine import progress
from capi_jax.engine import train
from capi_jax.engine import config_checks


class _Clock:
  def __init__(self):
    self.now = 100.0

  def __call__(self) -> float:
    return self.now


def test_live_stats_numbers(monkeypatch):
  clock = _Clock()
  monkeypatch.setattr(progress.time, 'perf_counter', clock)
  stats = progress.LiveStats(total_steps=100, global_batch=64, flops_per_step=8e12,
                             device_count=4, peak_flops_per_device=1e12)
  stats.restart(10)
  for _ in range(5):  # 5 steps of 2 s, 0.5 s of each waiting for data, one 7 s evaluation.
    with stats.waiting_for_data():
      clock.now += 0.5
    clock.now += 1.5
  with stats.excluded():
    clock.now += 7
  got = stats.interval(15)
  assert got == pytest.approx({
      'step_time_s': 2.0, 'images_per_s': 32.0, 'tflops_per_s_per_device': 1.0, 'mfu': 1.0,
      'data_wait_fraction': 0.25, 'eta_s': 85 * 2.0})
  clock.now += 3 * 4.0  # Slower: the ETA uses the mean step time of the segment (3 s).
  got = stats.interval(18)
  assert got['step_time_s'] == 4.0 and got['data_wait_fraction'] == 0
  assert got['eta_s'] == pytest.approx(82 * (10 + 12) / 8)
  assert set(got) == set(progress.TIMING_KEYS)
  no_peak = progress.LiveStats(total_steps=1, global_batch=1, flops_per_step=1.0, device_count=1,
                               peak_flops_per_device=None)
  assert 'mfu' not in no_peak.interval(1)  # CPU, float32: TFLOP/s only.


def test_log_line_shows_progress_and_eta():
  line = metrics_writer.log_line(499, {'loss': 0.5, 'step_time_s': 0.25, 'eta_s': 3723.4}, 2000)
  assert line == '[step 499/2000] loss=0.5, step_time_s=0.25, eta=1:02:03'


def _trained(tmp_path, **train_settings):
  from test_train_step import micro_config  # pylint: disable=g-import-not-at-top
  config = micro_config()
  config.train.total_iters = 4
  config.train.checkpointing.period = 100
  config.train.update(train_settings)
  train.train_and_evaluate(config, tmp_path)
  return [json.loads(l) for l in (tmp_path / 'metrics.jsonl').read_text().splitlines()]


def test_rows_carry_live_numbers_two_steps_are_profiled_and_the_record_is_complete(tmp_path):
  rows = _trained(tmp_path, profile_steps=(1, 3))
  assert [r['step'] for r in rows] == [0, 1, 2, 3]
  for row in rows:
    assert row['step_time_s'] > 0 and row['tflops_per_s_per_device'] > 0
    assert 0 <= row['data_wait_fraction'] <= 1 and row['eta_s'] >= 0
    assert 'mfu' not in row  # No datasheet peak for a CPU.
  assert rows[-1]['eta_s'] == 0
  traces = list((tmp_path / 'profile' / 'plugins' / 'profile').glob('*/*.xplane.pb'))
  assert len(traces) == 1
  assert list(traces[0].parent.glob('perfetto_trace.json.gz'))
  profile = jax.profiler.ProfileData.from_file(str(traces[0]))
  steps = [event for plane in profile.planes for line in plane.lines for event in line.events
           if event.name == 'train']
  assert len(steps) == 2
  record, = [json.loads(p.read_text()) for p in (tmp_path / 'runs').glob('*.json')]
  assert record['mesh'] == {'data': 1, 'fsdp': jax.device_count()}
  assert record['versions']['jax'] == jax.__version__ and 'orbax-checkpoint' in record['versions']
  assert record['device_kind'] == jax.devices()[0].device_kind and 'git' in record


def test_bad_profile_steps_are_refused():
  from test_train_step import micro_config  # pylint: disable=g-import-not-at-top
  for bad in ((3, 3), (5,), (-1, 2), (1.0, 2)):
    config = micro_config()
    config.train.profile_steps = bad
    assert any('train.profile_steps' in p for p in config_checks.problems(config, 1)), bad


def test_profile_is_written_when_the_last_step_ends(tmp_path):
  """(A gs:// workdir's profile is traced locally and uploaded then: tests/test_gcs.py.)"""
  directory = tmp_path / 'profile'
  stats = progress.LiveStats(total_steps=1, global_batch=1, flops_per_step=1.0, device_count=1,
                             peak_flops_per_device=None)
  profiler = progress.StepProfiler(directory, (0, 1), True, stats)
  double = jax.jit(lambda x: x * 2)
  profiler.before_step(0)
  assert profiler.active
  profiler.after_step(0, double(1.0))
  assert not profiler.active and len(list(directory.glob('plugins/profile/*/*.xplane.pb'))) == 1
