"""2 local processes x 4 fake devices train exactly like 1 process x 8 devices, and resume exactly.

Both runs see the same global batches: here every process builds the single-host stream and
keeps its own rows of each batch (the input pipeline's per-host sharding has its own tests), so
the only difference is the engine's multi-process path: `jax.distributed`, global arrays
assembled from per-process data, sharded steps with cross-process collectives, multi-process
Orbax checkpoints. Then a 2-process run killed with SIGKILL (both processes, as a scheduler ends
a job) and resumed on 2 processes ends bitwise where the uninterrupted 2-process run ended.

Run as a script (`python tests/test_multiprocess.py WORKDIR TOTAL_ITERS [SECONDS_PER_BATCH]`),
this file is the training process that `launch/local_multiprocess.py` starts; it writes the final
TrainState to WORKDIR/final_state.npz.
"""

from capi_jax.data import pipeline
from capi_jax.engine import progress
from capi_jax.engine import train
import json
import os
import pathlib
import re
import signal
import subprocess
import sys

import numpy as np

import loader_wrappers  # tests/ is on sys.path (pytest's rootdir insertion, PYTHONPATH in scripts)
import test_train

ROOT = pathlib.Path(__file__).resolve().parents[1]
TESTS = pathlib.Path(__file__).resolve().parent
TOTAL = 6


def _env(devices: int, cache: pathlib.Path | None = None) -> dict[str, str]:
  env = {**os.environ, 'PYTHONPATH': f'{ROOT}{os.pathsep}{TESTS}', 'JAX_PLATFORMS': 'cpu',
         'XLA_FLAGS': f'--xla_force_host_platform_device_count={devices}'}
  if cache:  # The 2-process runs compile the same programs: one compiles, the others read.
    env.update(JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0')
  return env


def _two_processes(workdir: pathlib.Path, *args: str) -> subprocess.Popen:
  """This file's script as 2 processes x 4 devices; the launcher leads a new process group."""
  return subprocess.Popen(
      [sys.executable, str(ROOT / 'launch' / 'local_multiprocess.py'), '--num_processes=2',
       '--devices_per_process=4', '--', sys.executable, __file__, str(workdir), *args],
      cwd=ROOT, env=_env(4, workdir.parent / 'jax_cache'), stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _losses(workdir: pathlib.Path) -> list[dict[str, float]]:
  lines = [json.loads(l) for l in (workdir / 'metrics.jsonl').read_text().splitlines()]
  return [{k: v for k, v in l.items() if k not in progress.TIMING_KEYS} for l in lines]


def test_two_processes_equal_one_process_and_resume_exactly_after_kill_9(tmp_path):
  script = [sys.executable, __file__]
  one = subprocess.run([*script, str(tmp_path / 'one'), str(TOTAL)], cwd=ROOT, env=_env(8),
                       capture_output=True, text=True, timeout=600)
  assert one.returncode == 0, one.stdout + one.stderr
  out = test_train.finish(_two_processes(tmp_path / 'two', str(TOTAL)))
  assert 'Process 1/2, 4 local / 8 global devices' in out, out

  expected, got = _losses(tmp_path / 'one'), _losses(tmp_path / 'two')
  assert [l['step'] for l in got] == list(range(TOTAL))
  for a, b in zip(expected, got):
    for key, value in a.items():
      # Same global batch and math; only the cross-device reduction order may differ.
      np.testing.assert_allclose(b[key], value, rtol=2e-5, err_msg=key)
  steps = sorted(int(p.name) for p in (tmp_path / 'two' / 'checkpoints').iterdir())
  assert steps == [2, 4, TOTAL]
  # Each process saved its own data iterator position.
  assert len(list((tmp_path / 'two' / 'checkpoints' / str(TOTAL) / 'data_iter').glob(
      'process_*.json'))) == 2

  # Both processes killed after a checkpoint with rows logged past it, then resumed on 2.
  workdir = tmp_path / 'killed'
  killed = _two_processes(workdir, str(TOTAL), '0.1')
  test_train.wait_for(killed, lambda: test_train.saved_steps(workdir) and test_train.rows_written(
      workdir) >= test_train.saved_steps(workdir)[-1] + 1)
  os.killpg(killed.pid, signal.SIGKILL)
  killed.communicate(timeout=60)
  logged = test_train.rows_written(workdir)
  out = test_train.finish(_two_processes(workdir, str(TOTAL)))
  resumed = re.search(r'Resuming from step (\d+)', out)
  assert resumed and 0 < int(resumed[1]) < logged < TOTAL, (logged, out)
  assert _losses(workdir) == _losses(tmp_path / 'two')
  test_train.assert_same_final_state(workdir, tmp_path / 'two')


def _main(workdir: str, total: int, seconds_per_batch: float) -> None:
  import logging  # pylint: disable=g-import-not-at-top
  from test_train_step import micro_config  # pylint: disable=g-import-not-at-top
  logging.basicConfig(level=logging.WARNING)
  logging.getLogger('capi_jax').setLevel(logging.INFO)
  real = pipeline.create_train_loader

  def single_host_rows(config, transform, *, seed, process_index, process_count):
    loader = real(config, transform, seed=seed, process_index=0, process_count=1)
    rows = loader_wrappers.HostRows(loader, process_index, process_count)
    # Throttled in every run (0 s: not slowed), so that all runs save one iterator state format.
    return loader_wrappers.Throttled(rows, seconds_per_batch)

  pipeline.create_train_loader = single_host_rows
  config = micro_config()
  config.train.total_iters = total
  config.train.checkpointing.period = 2
  test_train.save_final_state(train.train_and_evaluate(config, workdir), workdir)


if __name__ == '__main__':
  _main(sys.argv[1], int(sys.argv[2]), float((sys.argv[3:] or [0])[0]))
