"""The training loop: pre-emption and exact resume, NaN abort, metrics files.

Run as a script (`python tests/test_train.py WORKDIR TOTAL_ITERS [METHOD]`), this file trains
METHOD's seconds-sized config (`_config`) in WORKDIR, throttled so that a signal or a kill lands
mid-run, and writes the final TrainState to WORKDIR/final_state.npz: the subprocess that the
pre-emption and resume tests stop.
"""

from capi_jax import methods
from capi_jax.data import pipeline
from capi_jax.engine import checkpointing
from capi_jax.engine import progress
from capi_jax.engine import train
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time
from typing import Callable

import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp
import pytest

import loader_wrappers  # tests/ is on sys.path (pytest's rootdir insertion, PYTHONPATH in scripts)

ROOT = pathlib.Path(__file__).resolve().parents[1]
TESTS = pathlib.Path(__file__).resolve().parent
FINAL_STATE = 'final_state.npz'


def _micro(total_iters: int):
  from test_train_step import micro_config  # pylint: disable=g-import-not-at-top
  config = micro_config()
  config.train.total_iters = total_iters
  return config


def _teacher_dir(workdir: pathlib.Path) -> pathlib.Path:
  """CAE v2's CAPI teacher, shared by the runs of one test (the test writes it)."""
  return workdir.parent / 'caev2_teacher'


def _config(method: str, total_iters: int, workdir: pathlib.Path):
  """METHOD's config of the test module that owns it, checkpointing every 2 steps (CAPI: 4)."""
  if method == 'capi':
    return _micro(total_iters)
  if method == 'mim_refiner':
    from test_mim_refiner import small_config  # pylint: disable=g-import-not-at-top
    config = small_config()  # configs/mim_refiner/tiny.py shrunk; stage 3, 2 heads, a queue.
  else:
    from test_caev2 import micro_config  # pylint: disable=g-import-not-at-top
    config = micro_config(str(_teacher_dir(workdir)))
  config.train.update(total_iters=total_iters, log_loss_every=1, nan_check_period=1)
  config.train.checkpointing.period = 2
  config.evals.final = False
  return config


def _metrics(workdir: pathlib.Path) -> list[dict[str, float]]:
  lines = (workdir / 'metrics.jsonl').read_text().splitlines()
  # Throughput depends on the machine's load; everything else must match exactly.
  return [{k: v for k, v in json.loads(l).items() if k not in progress.TIMING_KEYS} for l in lines]


def rows_written(workdir: pathlib.Path) -> int:
  """Complete rows of metrics.jsonl so far (the run may be writing the next one)."""
  path = workdir / 'metrics.jsonl'
  return path.read_text().count('\n') if path.exists() else 0


def _run_script(workdir: pathlib.Path, total: int, method: str = 'capi',
                devices: int = 8) -> subprocess.Popen:
  # The three runs compile the same programs: share them through JAX's persistent cache.
  env = {**os.environ, 'PYTHONPATH': f'{ROOT}{os.pathsep}{TESTS}', 'JAX_PLATFORMS': 'cpu',
         'XLA_FLAGS': f'--xla_force_host_platform_device_count={devices}',
         'JAX_COMPILATION_CACHE_DIR': str(workdir.parent / 'jax_cache'),
         'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0'}
  return subprocess.Popen([sys.executable, __file__, str(workdir), str(total), method], cwd=ROOT,
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for(run: subprocess.Popen, condition: Callable[[], bool]) -> None:
  """Polls `condition` while `run` is alive (its output on failure)."""
  deadline = time.time() + 600
  while not condition():
    assert run.poll() is None and time.time() < deadline, run.communicate()[0]
    time.sleep(0.01)


def finish(run: subprocess.Popen) -> str:
  out, _ = run.communicate(timeout=600)
  assert run.returncode == 0, out
  return out


def assert_same_final_state(workdir: pathlib.Path, expected: pathlib.Path) -> None:
  """Every array of the final TrainState (parameters, frozen parts, buffers such as queues,
  BatchNorm statistics and EMA copies, optimiser state, step, rng) is bitwise the same."""
  with np.load(workdir / FINAL_STATE) as got, np.load(expected / FINAL_STATE) as want:
    assert sorted(got.files) == sorted(want.files)
    for key in want.files:
      np.testing.assert_array_equal(got[key], want[key], err_msg=key, strict=True)


def save_final_state(state, workdir: str | os.PathLike[str]) -> None:
  """Writes every array of `state` (all processes take part; process 0 writes)."""
  if jax.process_count() > 1:  # Global arrays: each process holds only its shards.
    state = multihost_utils.process_allgather(state, tiled=True)
  leaves = jax.tree_util.tree_flatten_with_path(jax.device_get(state))[0]
  if jax.process_index() == 0:
    np.savez(pathlib.Path(workdir) / FINAL_STATE,
             **{jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves})


def test_sigterm_then_resume_equals_uninterrupted(tmp_path):
  total = 24
  finish(_run_script(tmp_path / 'straight', total))

  workdir = tmp_path / 'preempted'
  first = _run_script(workdir, total)
  wait_for(first, lambda: rows_written(workdir) >= 3)
  first.send_signal(signal.SIGTERM)
  out = finish(first)
  assert 'Stopped by signal' in out, out
  stopped_at = len(_metrics(workdir))
  assert 3 <= stopped_at < total, 'the signal should land mid-run'
  assert sorted(int(p.name) for p in (workdir / 'checkpoints').iterdir()) == [stopped_at]

  out = finish(_run_script(workdir, total))
  assert f'Resuming from step {stopped_at}' in out, out
  assert _metrics(workdir) == _metrics(tmp_path / 'straight')
  assert_same_final_state(workdir, tmp_path / 'straight')


def saved_steps(workdir: pathlib.Path) -> list[int]:
  """Finished checkpoints (Orbax renames a step's temporary folder to its number when done)."""
  folder = workdir / 'checkpoints'
  return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.exists() else []


def kill_and_resume_equals_straight(tmp_path: pathlib.Path, total: int, method: str) -> None:
  """A run of `total` steps vs. one killed with SIGKILL (no chance to save or clean up) after a
  checkpoint with rows logged past it, then resumed: the same metrics rows, bitwise, and the
  same final TrainState, bitwise. On 1 device (38 s -> 33 s per test on 2 cores): sharded
  restores are the CAPI test's (8 devices) and tests/test_multiprocess.py's."""
  straight = _run_script(tmp_path / 'straight', total, method, devices=1)
  # Once the straight run has compiled (its first checkpoint), the second reads the programs from
  # the cache while the first finishes.
  wait_for(straight, lambda: saved_steps(tmp_path / 'straight'))
  workdir = tmp_path / 'killed'
  first = _run_script(workdir, total, method, devices=1)
  wait_for(first, lambda: saved_steps(workdir) and rows_written(workdir) >= saved_steps(
      workdir)[-1] + 1)
  first.kill()
  first.communicate(timeout=60)
  assert first.returncode == -signal.SIGKILL
  logged = rows_written(workdir)
  finish(straight)

  out = finish(_run_script(workdir, total, method, devices=1))
  resumed = re.search(r'Resuming from step (\d+)', out)
  assert resumed, out
  # Rows past the restored step were logged before the kill: the resumed run rewrites them.
  assert 0 < int(resumed[1]) < logged < total, (resumed[1], logged)
  assert _metrics(workdir) == _metrics(tmp_path / 'straight')
  assert_same_final_state(workdir, tmp_path / 'straight')


def test_mim_refiner_resumes_exactly_after_kill_9(tmp_path):
  """The queue (features, indices, ages), SyncBatchNorm statistics, the EMA encoder and the
  per-block optimiser groups all come back from the checkpoint (issue 23: promised, untested)."""
  kill_and_resume_equals_straight(tmp_path, 6, 'mim_refiner')


def test_caev2_resumes_exactly_after_kill_9(tmp_path):
  """CAE v2 with its frozen CAPI teacher: the teacher, student, regressor, decoder and AdamW
  state come back from the checkpoint (issue 23: promised, untested)."""
  from test_caev2 import capi_teacher_dir, micro_config  # pylint: disable=g-import-not-at-top
  capi_teacher_dir(micro_config(), _teacher_dir(tmp_path / 'straight'))
  kill_and_resume_equals_straight(tmp_path, 6, 'caev2')


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
  run_dir, run_method = pathlib.Path(sys.argv[1]), (sys.argv[3:] or ['capi'])[0]
  final = train.train_and_evaluate(_config(run_method, int(sys.argv[2]), run_dir), run_dir)
  save_final_state(final, run_dir)
