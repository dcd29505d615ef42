"""The training loop: pre-emption and exact resume, NaN abort, metrics files.

Run as a script (`python tests/test_train.py WORKDIR TOTAL_ITERS`), this file trains the micro
config in WORKDIR: the subprocess that the pre-emption test signals.
"""

from capi_jax import methods
from capi_jax.data import pipeline
from capi_jax.engine import checkpointing
from capi_jax.engine import progress
from capi_jax.engine import train
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import loader_wrappers  # tests/ is on sys.path (pytest's rootdir insertion, PYTHONPATH in scripts)

ROOT = pathlib.Path(__file__).resolve().parents[1]
TESTS = pathlib.Path(__file__).resolve().parent


def _micro(total_iters: int):
  from test_train_step import micro_config  # pylint: disable=g-import-not-at-top
  config = micro_config()
  config.train.total_iters = total_iters
  return config


def _metrics(workdir: pathlib.Path) -> list[dict[str, float]]:
  lines = (workdir / 'metrics.jsonl').read_text().splitlines()
  # Throughput depends on the machine's load; everything else must match exactly.
  return [{k: v for k, v in json.loads(l).items() if k not in progress.TIMING_KEYS} for l in lines]


def _run_script(workdir: pathlib.Path, total: int) -> subprocess.Popen:
  # The three runs compile the same programs: share them through JAX's persistent cache.
  env = {**os.environ, 'PYTHONPATH': f'{ROOT}{os.pathsep}{TESTS}', 'JAX_PLATFORMS': 'cpu',
         'XLA_FLAGS': '--xla_force_host_platform_device_count=8',
         'JAX_COMPILATION_CACHE_DIR': str(workdir.parent / 'jax_cache'),
         'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0'}
  return subprocess.Popen([sys.executable, __file__, str(workdir), str(total)], cwd=ROOT,
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_sigterm_then_resume_equals_uninterrupted(tmp_path):
  total = 24
  straight = _run_script(tmp_path / 'straight', total)
  out, _ = straight.communicate(timeout=600)
  assert straight.returncode == 0, out

  workdir = tmp_path / 'preempted'
  first = _run_script(workdir, total)
  deadline = time.time() + 600
  while not ((workdir / 'metrics.jsonl').exists() and len(_metrics(workdir)) >= 3):
    assert first.poll() is None and time.time() < deadline, first.communicate()[0]
    time.sleep(0.02)
  first.send_signal(signal.SIGTERM)
  out, _ = first.communicate(timeout=600)
  assert first.returncode == 0, out
  assert 'Stopped by signal' in out, out
  stopped_at = len(_metrics(workdir))
  assert 3 <= stopped_at < total, 'the signal should land mid-run'
  assert sorted(int(p.name) for p in (workdir / 'checkpoints').iterdir()) == [stopped_at]

  second = _run_script(workdir, total)
  out, _ = second.communicate(timeout=600)
  assert second.returncode == 0, out
  assert f'Resuming from step {stopped_at}' in out, out
  assert _metrics(workdir) == _metrics(tmp_path / 'straight')


def test_nan_in_data_aborts_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
  real = pipeline.create_train_loader
  monkeypatch.setattr(pipeline, 'create_train_loader',
                      lambda *a, **k: loader_wrappers.NanFrom(real(*a, **k), start=5))
  monkeypatch.setitem(methods._REGISTERED, 'capi',  # pylint: disable=protected-access
                      loader_wrappers.HostNormalisedCapi)
  # Checkpoints every 4 steps, NaN check every step: the third bad check (step 7) aborts before
  # the non-finite state reaches the checkpoint of step 8.
  config = _micro(total_iters=20)
  with pytest.raises(train.NonFiniteLossError, match=r'NaN/inf at 3 consecutive checks.*'
                     r'last good checkpoint is step 4'):
    train.train_and_evaluate(config, tmp_path)
  ckpt = checkpointing.Checkpointer(tmp_path / 'checkpoints', config)
  assert ckpt.all_steps() == [4]
  # Restore without a target: every array of the last good state, as saved.
  restored = ckpt.manager.restore(4, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  leaves = [np.asarray(x) for x in jax.tree.leaves(restored['state'])]
  assert leaves and all(np.isfinite(x).all() for x in leaves if x.dtype.kind == 'f')
  ckpt.close()
  lines = _metrics(tmp_path)
  assert [l['step'] for l in lines] == list(range(8))
  assert np.isfinite(lines[4]['capi_loss']) and np.isnan(lines[5]['capi_loss'])
  assert len(list((tmp_path / 'runs').iterdir())) == 1
  assert list((tmp_path / 'tensorboard').iterdir())


if __name__ == '__main__':
  import logging  # pylint: disable=g-import-not-at-top
  logging.basicConfig(level=logging.WARNING)
  logging.getLogger('capi_jax').setLevel(logging.INFO)
  real_loader = pipeline.create_train_loader
  pipeline.create_train_loader = (
      lambda *a, **k: loader_wrappers.Throttled(real_loader(*a, **k), 0.1))
  train.train_and_evaluate(_micro(int(sys.argv[2])), sys.argv[1])
