"""2 local processes x 4 fake devices train exactly like 1 process x 8 devices.

Both runs see the same global batches: here every process builds the single-host stream and
keeps its own rows of each batch (the input pipeline's per-host sharding has its own tests), so
the only difference is the engine's multi-process path: `jax.distributed`, global arrays
assembled from per-process data, sharded steps with cross-process collectives, multi-process
Orbax checkpoints.

Run as a script (`python tests/test_multiprocess.py WORKDIR TOTAL_ITERS`), this file is the
training process that `launch/local_multiprocess.py` starts.
"""

from capi_jax.data import pipeline
from capi_jax.engine import progress
from capi_jax.engine import train
import json
import os
import pathlib
import subprocess
import sys

import numpy as np

import loader_wrappers  # tests/ is on sys.path (pytest's rootdir insertion, PYTHONPATH in scripts)

ROOT = pathlib.Path(__file__).resolve().parents[1]
TESTS = pathlib.Path(__file__).resolve().parent
TOTAL = 6


def _env(devices: int) -> dict[str, str]:
  return {**os.environ, 'PYTHONPATH': f'{ROOT}{os.pathsep}{TESTS}', 'JAX_PLATFORMS': 'cpu',
          'XLA_FLAGS': f'--xla_force_host_platform_device_count={devices}'}


def _losses(workdir: pathlib.Path) -> list[dict[str, float]]:
  lines = [json.loads(l) for l in (workdir / 'metrics.jsonl').read_text().splitlines()]
  return [{k: v for k, v in l.items() if k not in progress.TIMING_KEYS} for l in lines]


def test_two_processes_equal_one_process(tmp_path):
  script = [sys.executable, __file__]
  one = subprocess.run([*script, str(tmp_path / 'one'), str(TOTAL)], cwd=ROOT, env=_env(8),
                       capture_output=True, text=True, timeout=600)
  assert one.returncode == 0, one.stdout + one.stderr
  two = subprocess.run(
      [sys.executable, str(ROOT / 'launch' / 'local_multiprocess.py'), '--num_processes=2',
       '--devices_per_process=4', '--', *script, str(tmp_path / 'two'), str(TOTAL)],
      cwd=ROOT, env=_env(4), capture_output=True, text=True, timeout=600)
  assert two.returncode == 0, two.stdout + two.stderr
  assert 'Process 1/2, 4 local / 8 global devices' in two.stderr, two.stderr

  expected, got = _losses(tmp_path / 'one'), _losses(tmp_path / 'two')
  assert [l['step'] for l in got] == list(range(TOTAL))
  for a, b in zip(expected, got):
    for key, value in a.items():
      # Same global batch and math; only the cross-device reduction order may differ.
      np.testing.assert_allclose(b[key], value, rtol=2e-5, err_msg=key)
  steps = sorted(int(p.name) for p in (tmp_path / 'two' / 'checkpoints').iterdir())
  assert steps == [4, TOTAL]
  # Each process saved its own data iterator position.
  assert len(list((tmp_path / 'two' / 'checkpoints' / str(TOTAL) / 'data_iter').glob(
      'process_*.json'))) == 2


def _main(workdir: str, total: int) -> None:
  import logging  # pylint: disable=g-import-not-at-top
  from test_train_step import micro_config  # pylint: disable=g-import-not-at-top
  logging.basicConfig(level=logging.WARNING)
  logging.getLogger('capi_jax').setLevel(logging.INFO)
  real = pipeline.create_train_loader

  def single_host_rows(config, transform, *, seed, process_index, process_count):
    loader = real(config, transform, seed=seed, process_index=0, process_count=1)
    return loader_wrappers.HostRows(loader, process_index, process_count)

  pipeline.create_train_loader = single_host_rows
  config = micro_config()
  config.train.total_iters = total
  train.train_and_evaluate(config, workdir)


if __name__ == '__main__':
  _main(sys.argv[1], int(sys.argv[2]))
