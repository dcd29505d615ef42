"""Nothing lost, ever: each fault a hostile user can cause, and what capi_jax does about it.

One test (or a few) per case of issue 13: two runs on one workdir, run records, divergence,
`data.num_workers` changes, config holes, orphaned Grain workers, duplicated metrics rows,
damaged checkpoints, Ctrl-C, evaluate's paths, misleading messages. (A parity check that
compares nothing failing is tests/test_check_reference.py::
test_a_fixture_with_nothing_comparable_fails.)

The training runs are subprocesses of this file (`python tests/test_faults.py WORKDIR ...`) on
one CPU device, sharing JAX's persistent compilation cache, so only the first one compiles.
`_workers_main` is the subprocess whose Grain workers must die with it.
One trained workdir (`trained`: 16 steps, checkpoints 8, 12, 16) is reused by most cases.
"""

import importlib
import json
import logging
import multiprocessing
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import grain
import jax
import ml_collections
import numpy as np
import pytest

from capi_jax import evaluate
from capi_jax import methods
from capi_jax.base import cli
from capi_jax.base import errors
from capi_jax.base import sharding
from capi_jax.base import storage
from capi_jax.data import pipeline
from capi_jax.data import sources
from capi_jax.engine import checkpointing
from capi_jax.engine import config_checks
from capi_jax.engine import metrics_writer
from capi_jax.engine import pretrained
from capi_jax.engine import progress
from capi_jax.engine import runs
from capi_jax.engine import state as state_lib
from capi_jax.engine import train
from capi_jax.methods.capi import convert as capi_convert
from capi_jax.weights import files
from capi_jax.weights import rules
from test_train_step import micro_config
import loader_wrappers  # tests/ is on sys.path (pytest's rootdir insertion, PYTHONPATH in scripts)

ROOT = pathlib.Path(__file__).resolve().parents[1]
TESTS = pathlib.Path(__file__).resolve().parent
TOTAL = 16  # micro_config checkpoints every 4 steps and keeps 3: 8, 12, 16.


def _config(total: int = TOTAL):
  config = micro_config()
  config.train.total_iters = total
  return config


@pytest.fixture(scope='module')
def cache_dir(tmp_path_factory) -> pathlib.Path:
  return tmp_path_factory.mktemp('jax_cache')


def _script(cache_dir: pathlib.Path, workdir: pathlib.Path, *flags: str) -> subprocess.Popen:
  """This file's training run in WORKDIR (see `_train_main`), on one CPU device."""
  env = {**os.environ, 'PYTHONPATH': f'{ROOT}{os.pathsep}{TESTS}', 'JAX_PLATFORMS': 'cpu',
         'XLA_FLAGS': '--xla_force_host_platform_device_count=1',
         'JAX_COMPILATION_CACHE_DIR': str(cache_dir),
         'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0'}
  return subprocess.Popen([sys.executable, __file__, str(workdir), *flags], cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen) -> tuple[int, str]:
  out, err = proc.communicate(timeout=600)
  return proc.returncode, out + err


def _steps(workdir: pathlib.Path) -> list[int]:
  return [json.loads(l)['step'] for l in (workdir / 'metrics.jsonl').read_text().splitlines()]


def _rows(workdir: pathlib.Path) -> list[dict[str, float]]:
  lines = (workdir / 'metrics.jsonl').read_text().splitlines()
  return [{k: v for k, v in json.loads(l).items() if k not in progress.TIMING_KEYS} for l in lines]


@pytest.fixture(scope='module')
def trained(tmp_path_factory, cache_dir) -> pathlib.Path:
  """A workdir trained for TOTAL steps in one go (read-only: tests copy it)."""
  workdir = tmp_path_factory.mktemp('trained') / 'run'
  rc, out = _finish(_script(cache_dir, workdir))
  assert rc == 0, out
  return workdir


def _copy(workdir: pathlib.Path, tmp_path: pathlib.Path) -> pathlib.Path:
  return pathlib.Path(shutil.copytree(workdir, tmp_path / 'copy'))


def _target(config):
  """Restore target of `config`'s TrainState on this process's 8 devices."""
  layout = state_lib.state_layout(config, methods.from_config(config),
                                  sharding.make_mesh(config))
  return checkpointing.restore_target(layout.abstract, layout.shardings)


# ------------------------------------------------------------------ 1. one run per workdir
@pytest.fixture(params=[pytest.param('local', id='local'),
                        pytest.param('gcs', id='gcs', marks=pytest.mark.gcs)])
def lock_root(request, tmp_path):
  """A workdir on local disk, or on gs:// (fake-gcs-server, see gcs_netns.py)."""
  return storage.path(tmp_path) if request.param == 'local' else request.getfixturevalue(
      'gcs_path')


def test_workdir_lock_refuses_a_live_holder_and_takes_over_stale_ones(lock_root, caplog,
                                                                      monkeypatch):
  first = runs.WorkdirLock(lock_root)
  first.acquire()
  with pytest.raises(runs.WorkdirBusyError, match=f'in use by another run: pid {os.getpid()} '):
    runs.WorkdirLock(lock_root).acquire()
  first.release()
  assert not (lock_root / runs.LOCK_NAME).exists()

  # Same host, holder gone (kill -9): taken over at once.
  dead = subprocess.Popen(['true'])
  dead.wait()
  lock_file = lock_root / runs.LOCK_NAME
  lock_file.write_text(json.dumps({'host': runs.Holder.me().host, 'pid': dead.pid,
                                   'started': 'x', 'token': 'old', 'command': 'c'}))
  with caplog.at_level(logging.WARNING), runs.WorkdirLock(lock_root):
    assert f'process {dead.pid} on this host is gone' in caplog.text

  # Another host: live while its heartbeat is fresh, stale after STALE_AFTER_S (locally the
  # file's mtime; on GCS the object's update time, the server's clock).
  lock_file.write_text(json.dumps({'host': 'elsewhere', 'pid': 1, 'started': 'x',
                                   'token': 'other', 'command': 'c'}))
  with pytest.raises(runs.WorkdirBusyError, match='pid 1 on host elsewhere'):
    runs.WorkdirLock(lock_root).acquire()
  if storage.is_gcs(lock_root):
    monkeypatch.setattr(runs, 'STALE_AFTER_S', 1.0)
    time.sleep(1.5)
  else:
    old = time.time() - runs.STALE_AFTER_S - 60
    os.utime(lock_file, (old, old))
  with caplog.at_level(logging.WARNING), runs.WorkdirLock(lock_root):
    assert 'no heartbeat for' in caplog.text


def race_for_the_lock(workdir, starts: int = 8) -> list[runs.WorkdirLock]:
  """`starts` simultaneous starts on `workdir`; the locks they got."""
  locks = [runs.WorkdirLock(workdir) for _ in range(starts)]
  won, start = [], threading.Barrier(len(locks))

  def try_lock(lock):
    start.wait()
    try:
      lock.acquire()
      won.append(lock)
    except runs.WorkdirBusyError:
      pass

  threads = [threading.Thread(target=try_lock, args=(lock,)) for lock in locks]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  return won


def test_simultaneous_starts_get_one_lock(tmp_path):
  won = race_for_the_lock(tmp_path)
  assert len(won) == 1
  won[0].release()


# ------------------------------------------------------------------ 2. run records
def test_a_refused_rerun_keeps_the_record_of_the_run(trained, tmp_path):
  workdir = _copy(trained, tmp_path)
  records = sorted((workdir / 'runs').iterdir())
  assert len(records) == 1
  first = json.loads(records[0].read_text())
  assert first['config']['capi']['model']['embed_dim'] == 32
  assert first['resumed_from_step'] is None
  config = _config()
  config.capi.model.embed_dim = 64
  with pytest.raises(checkpointing.IncompatibleCheckpointError) as error:
    train.train_and_evaluate(config, workdir)
  assert 'model.embed_dim: checkpoint 32 vs config 64' in str(error.value)
  assert 'WORKDIR/runs/' in str(error.value) and 'new --workdir' in str(error.value)
  assert sorted((workdir / 'runs').iterdir()) == records
  assert json.loads(records[0].read_text()) == first
  assert not (workdir / 'config.json').exists()


def test_records_appear_whole_and_a_cut_record_is_skipped(tmp_path, caplog):
  config = _config()
  first = runs.write_record(tmp_path, config, None)
  second = runs.write_record(tmp_path, config, 8)
  assert sorted(p.name for p in (tmp_path / 'runs').iterdir()) == sorted([first.name, second.name])
  assert json.loads(second.read_text())['resumed_from_step'] == 8  # Nothing left aside.
  # A newer record cut short (a crash of an older version while writing it) is skipped.
  cut = tmp_path / 'runs' / '29991231T000000.000000Z_host_1.json'
  cut.write_text(second.read_text()[:100])
  with caplog.at_level(logging.WARNING):
    assert runs.latest_config(tmp_path).capi.model.embed_dim == config.capi.model.embed_dim
  assert 'Skipping unreadable run record' in caplog.text


def _older_layout(config) -> dict:
  """`config` as records held it before configs were composed (configs/common.py + the method's
  section): `model` and `optim` (with the training lengths) at the top, the method's augmentation
  keys in `data`, and `init` only where the method had one."""
  old = json.loads(config.to_json_best_effort())
  section, train_cfg = old[config.method], old['train']
  old['model'] = section.pop('model')
  old['optim'] = {**section.pop('optim'), 'total_iters': train_cfg.pop('total_iters'),
                  'global_batch_size': train_cfg.pop('global_batch_size')}
  old['data'].update(section.pop('data', {}))
  if config.method != 'mim_refiner':
    del old['init']
  return old


@pytest.mark.parametrize('name', ['tiny', 'caev2.tiny', 'mim_refiner.tiny'])
def test_a_record_of_the_older_config_layout_is_read_in_todays(tmp_path, name):
  """Runs written before the composition change can still be restored (evaluated, converted,
  started from): their record's config is read in today's layout."""
  config = importlib.import_module(f'configs.{name}').get_config()
  today = json.loads(config.to_json_best_effort())
  assert runs.upgrade_config(today) == today
  (tmp_path / runs.RUNS_DIR).mkdir()
  (tmp_path / runs.RUNS_DIR / 'old.json').write_text(json.dumps({'config': _older_layout(config)}))
  restored = runs.latest_config(tmp_path)
  assert restored.to_dict() == ml_collections.ConfigDict(today).to_dict()
  assert methods.from_config(restored).architecture() == json.loads(json.dumps(
      methods.from_config(config).architecture()))


def test_a_record_that_cannot_be_written_leaves_nothing(tmp_path, monkeypatch):
  def full_disk(*args, **kwargs):
    raise OSError(28, 'No space left on device')
  monkeypatch.setattr(storage.os, 'fsync', full_disk)
  with pytest.raises(OSError, match='No space left'):
    runs.write_record(tmp_path, _config(), None)
  assert not list((tmp_path / 'runs').iterdir())


# ------------------------------------------------------------------ 3 + 7. divergence, metrics rows
def test_divergence_at_the_end_fails_loudly_and_rows_never_repeat(trained, tmp_path, cache_dir):
  workdir = _copy(trained, tmp_path)
  shutil.rmtree(workdir / 'checkpoints' / str(TOTAL))  # Resume from 12: rows 12..15 exist.
  # NaN batches from step 14: two bad checks, never the three that abort; the final state is
  # NaN. The final evaluation is on, and must not run.
  rc, out = _finish(_script(cache_dir, workdir, '--nan_from=14', '--final_eval'))
  assert rc == 1, out
  assert 'Resuming from step 12' in out
  assert (f'error: The state after step {TOTAL} is not finite (checkpoint): training diverged. '
          'The last good checkpoint is step 12') in out
  assert 'Traceback' not in out
  assert checkpointing.find_checkpoint(workdir).step == 12
  assert not (workdir / 'eval').exists()
  assert _steps(workdir) == list(range(TOTAL))  # Steps 12.. once, not twice.
  assert _rows(workdir)[:14] == _rows(trained)[:14]  # An exact resume up to the NaNs.
  assert np.isnan(_rows(workdir)[14]['capi_loss'])


def test_the_divergence_message_without_any_checkpoint(tmp_path):
  ckpt = checkpointing.Checkpointer(tmp_path, _config())
  message = str(train._diverged(ckpt, 'Loss is NaN'))  # pylint: disable=protected-access
  ckpt.close()
  assert 'None' not in message and 'No checkpoint was written' in message


def test_metrics_rows_after_the_resumed_step_are_dropped(tmp_path):
  path = tmp_path / metrics_writer.METRICS_FILE
  path.write_text(''.join(json.dumps({'step': s, 'loss': 1.0}) + '\n' for s in range(10))
                  + '{"step": 10, "lo')  # A line cut short by a kill.
  metrics_writer.MetricsWriter(tmp_path, start_step=6).close()
  assert _steps(tmp_path) == list(range(6))


# ------------------------------------------------------------------ 4 + 6. workers
def test_iterator_state_across_num_workers():
  fresh = {'next_index_in_cycle': 0, 'next_index_in_datasets': 2, 'iterators_in_use_indices':
           [0, 1], 'iterators_in_use_states': [{'next_index': 0}, {'next_index': 0}],
           'exhausted': [0, 0], 'future_states': {}}
  one = {**fresh, 'next_index_in_datasets': 1, 'iterators_in_use_indices': [0],
         'iterators_in_use_states': [{'next_index': 0}], 'exhausted': [0]}
  saved = {**fresh, 'next_index_in_cycle': 1,
           'iterators_in_use_states': [{'next_index': 32}, {'next_index': 16}]}
  assert pipeline.adapt_iterator_state(saved, fresh) == saved  # Same workers: as saved.
  assert pipeline.adapt_iterator_state({'next_index': 48}, {'next_index': 0}) == {
      'next_index': 48}
  # 0 <-> 1 worker: one stream, two forms.
  assert pipeline.adapt_iterator_state({'next_index': 48}, one)['iterators_in_use_states'] == [
      {'next_index': 48}]
  assert pipeline.adapt_iterator_state({**one, 'iterators_in_use_states': [{'next_index': 48}]},
                                       {'next_index': 0}) == {'next_index': 48}
  # 2 workers read records 0, 2, .., 62 and 1, 3, .., 31: go on after 62, none read twice.
  assert pipeline.adapt_iterator_state(saved, {'next_index': 0}) == {'next_index': 63}
  assert pipeline.adapt_iterator_state({'next_index': 63}, fresh)['iterators_in_use_states'] == [
      {'next_index': 32}, {'next_index': 31}]
  with pytest.raises(errors.UserError, match='num_workers=2'):
    pipeline.adapt_iterator_state({**saved, 'iterators_in_use_states': [{'x': 1}, {'x': 2}]},
                                  {'next_index': 0})


def _pid_gone(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return True
  status = pathlib.Path(f'/proc/{pid}/status')
  return status.exists() and '\nState:\tZ' in status.read_text()  # A zombie is gone too.


def _workers_main() -> None:
  """Resumes loaders across num_workers 0 -> 1 -> 2 -> 0, prints the workers' pids, waits."""
  config = micro_config()

  transform = methods.from_config(config).train_transform()

  def loader(workers):
    config.data.num_workers = workers
    return pipeline.create_train_loader(config, transform, seed=0, process_index=0,
                                        process_count=1)

  def resumed(workers, state):
    it = loader(workers)
    it.set_state(pipeline.adapt_iterator_state(state, it.get_state()))
    return it

  plain = loader(0)
  for _ in range(3):
    next(plain)
  state = plain.get_state()
  upcoming = [next(plain)['images'] for _ in range(2)]
  one = resumed(1, state)
  assert all(np.array_equal(next(one)['images'], want) for want in upcoming)  # Exact.
  two = resumed(2, state)
  next(two)
  next(resumed(0, two.get_state()))
  print(' '.join(str(p.pid) for p in multiprocessing.active_children()), flush=True)
  time.sleep(600)


def test_grain_workers_die_with_a_killed_main_process():
  # `-c`, not this file: spawned workers then import only what the pipeline needs.
  proc = subprocess.Popen(
      [sys.executable, '-c', 'import test_faults; test_faults._workers_main()'], cwd=ROOT,
      stdout=subprocess.PIPE, text=True,
      env={**os.environ, 'PYTHONPATH': f'{ROOT}{os.pathsep}{TESTS}', 'JAX_PLATFORMS': 'cpu'})
  try:
    line = proc.stdout.readline()
  finally:
    proc.kill()
    proc.wait()
  pids = [int(p) for p in line.split()]
  assert len(pids) >= 2, line  # At least the 2 workers of the last 2-worker loader.
  deadline = time.time() + 30
  while not all(_pid_gone(p) for p in pids):
    assert time.time() < deadline, [p for p in pids if not _pid_gone(p)]
    time.sleep(0.2)


# ------------------------------------------------------------------ 5. config values
@pytest.mark.parametrize('key, value, expected', [
    ('capi.optim.lr_schedule.base_value', -1e-3,
     'capi.optim.lr_schedule.base_value=-0.001 must be >= 0'),
    ('capi.model.num_heads', 0, 'capi.model.num_heads=0 must be an integer >= 1'),
    ('capi.model.patch_size', 0, 'capi.model.patch_size=0 must be an integer >= 1'),
    ('capi.data.crop_scale', (0.5,), 'capi.data.crop_scale=(0.5,) must be a pair of numbers'),
    ('capi.optim.betas', (1.5, -0.2), 'capi.optim.betas=(1.5, -0.2) must each be in [0, 1)'),
    ('capi.optim.eps', -1.0, 'capi.optim.eps=-1.0 must be > 0'),
    ('capi.optim.weight_decay', -5.0, 'capi.optim.weight_decay=-5.0 must be >= 0'),
    # Issue 23 item 14: nan read 'must be >= 0' and inf (which is >= 0) the same.
    ('capi.optim.lr_schedule.base_value', float('nan'),
     'capi.optim.lr_schedule.base_value=nan must be a finite number >= 0'),
    ('capi.optim.weight_decay', float('inf'),
     'capi.optim.weight_decay=inf must be a finite number >= 0'),
    ('capi.clustering_optimizer.eps', 0.0, 'capi.clustering_optimizer.eps=0.0 must be > 0'),
    ('capi.optim.momentum_schedule.base_value', 1.5, 'must be in [0, 1]'),
    ('data.num_workers', -1, 'data.num_workers=-1 must be an integer >= 0'),
    ('sharding.mesh', (('data', 3), ('fsdp', -1)), 'do not split into mesh'),
    ('sharding.param_rules', (('(', 'fsdp'),), "'(' is not a regular expression"),
    ('efficiency.reduce_dtype', 'float64', "efficiency.reduce_dtype='float64' must be one of"),
    ('efficiency.attention', 'flash', "efficiency.attention='flash' must be one of"),
])
def test_bad_config_values_are_named_up_front(key, value, expected):
  config = _config()
  *sections, name = key.split('.')
  section = config
  for s in sections:
    section = section[s]
  section[name] = value
  found = config_checks.problems(config, device_count=8)  # Never raises.
  assert any(expected in p for p in found), found


def test_a_mistyped_config_key_is_one_line():
  program = ('from ml_collections import config_flags; from capi_jax.base import cli; '
             "config_flags.DEFINE_config_file('config'); cli.run(lambda argv: None)")
  for flag, hint in (('--config.capi.model.embed_dimm=3', 'Did you mean "embed_dim"'),
                     ('--config.capi.modle.embed_dim=3', 'Did you mean "model"')):
    result = subprocess.run([sys.executable, '-c', program, '--config=configs/tiny.py', flag],
                            cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        f'error: {flag.split("=")[0]} names no config key: {hint}'), result.stderr


def test_an_unknown_tfds_dataset_is_one_line():
  with pytest.raises(sources.DatasetNotFoundError) as error:
    sources.make_source('tfds:nonexistent', 'train', '', 28)
  assert len(str(error.value).splitlines()) == 1 and len(str(error.value)) < 300


# ------------------------------------------------------------------ 9. damaged checkpoints
def _damage(step_dir: pathlib.Path, how: str) -> None:
  data = max((f for f in (step_dir / 'state').rglob('*') if f.is_file() and '/d/' in str(f)),
             key=lambda f: f.stat().st_size)
  if how == 'truncated':
    data.write_bytes(data.read_bytes()[:data.stat().st_size // 2])
  elif how == 'deleted':
    data.unlink()
  else:  # 8 bytes overwritten mid-file: same size, different content.
    raw = bytearray(data.read_bytes())
    middle = len(raw) // 2
    raw[middle:middle + 8] = bytes(255 - b for b in raw[middle:middle + 8])
    data.write_bytes(bytes(raw))


@pytest.mark.parametrize('how', ['truncated', 'deleted', 'overwritten'])
def test_a_damaged_latest_checkpoint_falls_back(trained, tmp_path, caplog, how):
  workdir = _copy(trained, tmp_path)
  _damage(workdir / 'checkpoints' / str(TOTAL), how)
  config = _config()
  ckpt = checkpointing.Checkpointer(workdir / 'checkpoints', config)
  with caplog.at_level(logging.WARNING):
    state, step = ckpt.restore_latest(_target(config), None)
  ckpt.close()
  assert step == 12 == int(state.step)
  assert f'checkpoints/{TOTAL} is damaged' in caplog.text
  assert 'Resuming from step 12' in caplog.text
  assert ckpt.all_steps() == [8, 12]
  assert (workdir / 'checkpoints_damaged' / str(TOTAL) / 'state').is_dir()  # Kept, aside.


def test_no_intact_checkpoint_is_an_error_and_none_is_unverified(trained, tmp_path):
  workdir = _copy(trained, tmp_path)
  config = _config()
  (workdir / 'checkpoints' / '12' / checkpointing.CHECKSUMS).unlink()
  for step in (8, TOTAL):
    _damage(workdir / 'checkpoints' / str(step), 'overwritten')
  ckpt = checkpointing.Checkpointer(workdir / 'checkpoints', config)
  _, step = ckpt.restore_latest(_target(config), None)  # 12 has no checksums: unverified.
  assert step == 12
  _damage(workdir / 'checkpoints' / '12', 'deleted')
  with pytest.raises(checkpointing.DamagedCheckpointError, match='No intact checkpoint'):
    ckpt.restore_latest(_target(config), None)
  ckpt.close()


def test_a_rerun_after_all_checkpoints_were_damaged_refuses_again(trained, tmp_path):
  """Issue 23 item 5: the rerun of the refused command neither starts from step 0 nor drops
  the rows of metrics.jsonl."""
  workdir = _copy(trained, tmp_path)
  rows = (workdir / 'metrics.jsonl').read_text()
  for step in (8, 12, TOTAL):
    _damage(workdir / 'checkpoints' / str(step), 'deleted')
  for refusal in ('No intact checkpoint', 'an earlier start set every one aside as damaged'):
    with pytest.raises(checkpointing.DamagedCheckpointError, match=refusal):
      train.train_and_evaluate(_config(), workdir)
    assert (workdir / 'metrics.jsonl').read_text() == rows
  assert sorted(int(p.name) for p in (workdir / 'checkpoints_damaged').iterdir()) == [8, 12, 16]


def test_total_iters_below_the_restored_step_is_refused(trained, tmp_path, cache_dir):
  """Issue 23 item 3: no silent exit 0, and no evaluation of step 16 labelled 12."""
  workdir = _copy(trained, tmp_path)
  rc, out = _finish(_script(cache_dir, workdir, '--total=12', '--final_eval'))
  assert rc == 1 and f'holds step {TOTAL}, beyond train.total_iters=12' in out, out
  assert 'Traceback' not in out, out
  assert not (workdir / 'eval').exists()


def test_resuming_with_another_process_count_is_refused(trained, tmp_path, monkeypatch):
  """Issue 23 item 7: was Grain's 'process_0-of-1.json does not exist' traceback. (This host
  has one process: the check is told it has two.)"""
  workdir = _copy(trained, tmp_path)
  real = checkpointing.check_process_count
  monkeypatch.setattr(checkpointing, 'check_process_count', lambda step_dir, _: real(step_dir, 2))
  ckpt = checkpointing.Checkpointer(workdir / 'checkpoints', _config())
  with pytest.raises(checkpointing.IncompatibleCheckpointError,
                     match=r'written by 1 process\(es\) and this run has 2: resume with 1'):
    ckpt.restore_latest(_target(_config()), object())  # Any iterator: refused before use.
  ckpt.close()
  assert ckpt.all_steps() == [8, 12, TOTAL]  # Nothing set aside: the checkpoints are fine.


def test_evaluate_reads_the_newest_checkpoint_when_training_rotates_one_away(
    trained, tmp_path, monkeypatch):
  """Issue 23 item 13: a step folder removed by max_to_keep while evaluate read it failed as
  'checkpoints/8 cannot be read', worded like damage."""
  workdir = _copy(trained, tmp_path)
  real = pretrained.restore_run
  read = []

  def rotated_while_read(step_dir, *args):
    read.append(pathlib.Path(step_dir).name)
    if len(read) == 1:  # The training run removes the newest while we read it.
      shutil.rmtree(step_dir)
    return real(step_dir, *args)

  monkeypatch.setattr(pretrained, 'restore_run', rotated_while_read)
  config = _config()
  step = evaluate.load_params(config, workdir, '', '', 'ema', None)[1]  # (params, step, ...)
  assert read == [str(TOTAL), '12'] and step == 12
  # A step folder named on the command line is not replaced by another: one line instead.
  read.clear()
  with pytest.raises(checkpointing.CheckpointNotFoundError, match='was removed while it was'):
    evaluate.load_params(config, workdir, str(workdir / 'checkpoints' / '12'), '', 'ema', None)


def test_a_killed_data_worker_stops_the_run_with_one_line_and_a_checkpoint(tmp_path, cache_dir):
  """Issue 23 item 11: the run went on ~4 steps, then a 27-line Grain traceback, no checkpoint
  of the healthy state, and 18 shared-memory blocks left behind."""
  workdir = tmp_path / 'run'
  start = time.monotonic()
  run = _script(cache_dir, workdir, '--kill_workers_at=6')
  rc, out = _finish(run)
  assert rc == 1, out
  # The killed worker's shared-memory blocks are removed on the way out (18 were left to
  # Python's resource tracker, which warned that they leaked).
  removed = re.search(r'Removed (\d+) shared-memory block\(s\) the data workers left', out)
  assert removed and int(removed.group(1)) >= 1, out
  assert 'leaked shared_memory' not in out, out
  assert not list(pathlib.Path('/dev/shm').glob(f'capi_jax_{run.pid}_*'))
  line = next(l for l in out.splitlines() if l.startswith('error: '))
  assert 'The input pipeline failed before step' in line and 'terminated unexpectedly' in line
  assert 'is checkpointed' in line and 'rerun with the same --workdir' in line, line
  failed_at = int(re.search(r'failed before step (\d+)', line).group(1))
  # After the batches already prefetched (9 here: the buffers of the worker and of the
  # pipeline), never past the end.
  assert 6 <= failed_at < TOTAL
  assert (workdir / 'checkpoints' / str(failed_at)).is_dir()
  assert time.monotonic() - start < 300


# ------------------------------------------------------------------ 11. evaluate's paths
def test_every_kind_of_checkpoint_path(trained, tmp_path):
  latest = trained / 'checkpoints' / str(TOTAL)
  for path in (trained, trained / 'checkpoints', latest):
    assert checkpointing.find_checkpoint(path) == checkpointing.CheckpointPath(
        'training', latest, TOTAL)
  copied = pathlib.Path(shutil.copytree(latest, tmp_path / 'my copy'))
  assert checkpointing.find_checkpoint(copied).step is None
  config = _config()
  mesh = sharding.make_mesh(config)
  params, step, _ = evaluate.load_params(config, tmp_path, str(copied), '', 'ema', mesh)
  assert step == TOTAL and 'encoder' in params

  files.save_params({'backbone': {'w': np.ones(2, np.float32)}}, tmp_path / 'converted')
  for path in (tmp_path / 'converted', tmp_path / 'converted' / 'params'):
    assert checkpointing.find_checkpoint(path).kind == 'params'

  fresh = tmp_path / 'fresh'
  fresh.mkdir()
  (tmp_path / 'file').write_text('x')
  for path, message in ((fresh, 'No checkpoint in'), (tmp_path / 'file', 'is a file'),
                        (tmp_path / 'missing', 'does not exist')):
    with pytest.raises(checkpointing.CheckpointNotFoundError, match=message):
      checkpointing.find_checkpoint(path)
  assert list(fresh.iterdir()) == []  # Nothing created in a workdir that has no checkpoint.


# ------------------------------------------------------------------ 12. messages
def test_a_full_disk_is_refused_before_writing(tmp_path, monkeypatch):
  config = _config()
  ckpt = checkpointing.Checkpointer(tmp_path, config)
  state = {'w': np.random.default_rng(0).normal(size=(256, 256)).astype(np.float32)}
  data_iter = iter(grain.MapDataset.range(10).to_iter_dataset())
  ckpt.save(1, state, data_iter)
  ckpt.wait()
  usage = shutil.disk_usage(tmp_path)
  monkeypatch.setattr(storage.shutil, 'disk_usage',
                      lambda _: usage._replace(free=100_000))
  with pytest.raises(checkpointing.CheckpointWriteError,
                     match=r'Not enough disk space .*: 0\.1 MiB free, about 0\.[23] MiB '
                     'needed.* resumes from step 1'):
    ckpt.save(2, state, data_iter)
  ckpt.close()
  assert ckpt.all_steps() == [1]


def _official_backbone(config) -> dict[str, np.ndarray]:
  shapes = capi_convert.backbone_shapes(config)
  return capi_convert.backbone_to_official(
      jax.tree.map(lambda s: np.zeros(s.shape, np.float32), shapes))


def test_convert_refuses_integer_and_non_finite_weights():
  config = _config()
  sd = _official_backbone(config)
  name = 'decoder.blocks.0.residual2.fn.fc1.weight'
  for value, message in ((sd[name].astype(np.int32), 'dtype int32, expected a floating-point'),
                         (np.full_like(sd[name], np.nan), 'are NaN or inf')):
    with pytest.raises(rules.CheckpointMismatchError, match=f"'{name}': .*{message}"):
      capi_convert.backbone_to_flax({**sd, name: value}, config)


def test_convert_names_an_unreadable_file(tmp_path):
  good = tmp_path / 'good.npz'
  np.savez(good, **{'backbone.x': np.ones(3, np.float32)})
  truncated = tmp_path / 'truncated.npz'
  truncated.write_bytes(good.read_bytes()[:40])
  text = tmp_path / 'text.pth'
  text.write_text('not a checkpoint')
  for path in (truncated, text):
    with pytest.raises(files.UnreadableCheckpointError, match='truncated, damaged'):
      files.read_state_dict(path)


def test_a_step_folder_of_another_model_does_not_suggest_a_new_workdir(trained):
  config = _config()
  config.capi.model.embed_dim = 64
  with pytest.raises(checkpointing.IncompatibleCheckpointError) as error:
    pretrained.restore_run(trained / "checkpoints" / "8", config)
  assert 'embed_dim' in str(error.value) and 'workdir' not in str(error.value).split('(')[0]
  assert 'new --workdir' not in str(error.value)


def test_bench_refuses_zero_steps():
  # The flags are defined when bench runs as a program, so it is run as one.
  result = subprocess.run(
      [sys.executable, '-m', 'capi_jax.bench', '--config=configs/bench_cpu.py', '--steps=0'],
      cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
      env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  assert result.returncode != 0
  assert '--steps=0: 0 is not a positive integer' in result.stderr, result.stderr


# ----------------------------------------- 10 + 1. Ctrl-C, busy workdir (last: the cache is warm)
def test_ctrl_c_checkpoints_and_a_second_run_is_refused_meanwhile(tmp_path, cache_dir):
  workdir = tmp_path / 'run'
  first = _script(cache_dir, workdir, '--throttle=5')  # Runs long enough for `second`.
  deadline = time.time() + 300
  while not ((workdir / 'metrics.jsonl').exists() and _steps(workdir)):
    assert first.poll() is None and time.time() < deadline, _finish(first)[1]
    time.sleep(0.1)

  second = subprocess.run(
      [sys.executable, '-m', 'capi_jax.main', '--config=configs/tiny.py', f'--workdir={workdir}'],
      cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
      env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  assert second.returncode == 1, second.stderr
  assert f'is in use by another run: pid {first.pid} on host' in second.stderr
  assert 'Traceback' not in second.stderr
  assert len(list((workdir / 'runs').iterdir())) == 1  # The refused start left no record.

  first.send_signal(signal.SIGINT)
  rc, out = _finish(first)
  assert rc == cli.INTERRUPTED_EXIT_CODE, out
  assert 'Stopped by signal' in out and 'Traceback' not in out, out
  saved = checkpointing.find_checkpoint(workdir)
  assert saved.step == _steps(workdir)[-1] + 1 < TOTAL
  assert not (workdir / runs.LOCK_NAME).exists()


def test_sigusr1_checkpoints_and_exits_0(tmp_path, cache_dir):
  """README: SIGUSR1 (SLURM's warning before the time limit) -> checkpoint, exit 0 (issue 23:
  promised, untested)."""
  workdir = tmp_path / 'run'
  run = _script(cache_dir, workdir, '--throttle=2')
  deadline = time.time() + 300
  while not ((workdir / 'metrics.jsonl').exists() and _steps(workdir)):
    assert run.poll() is None and time.time() < deadline, _finish(run)[1]
    time.sleep(0.1)
  run.send_signal(signal.SIGUSR1)
  rc, out = _finish(run)
  assert rc == 0 and 'Received SIGUSR1' in out and 'Stopped by signal' in out, out
  assert 'Traceback' not in out, out
  assert checkpointing.find_checkpoint(workdir).step == _steps(workdir)[-1] + 1 < TOTAL


def test_a_second_ctrl_c_interrupts_at_once():
  stop = train._StopFlag()  # pylint: disable=protected-access
  stop(signal.SIGINT, None)
  assert stop.signal == signal.SIGINT
  with pytest.raises(KeyboardInterrupt):
    stop(signal.SIGINT, None)


# ------------------------------------------------------------------ the training script
def _train_main(argv: list[str]) -> None:
  """Trains `_config()` in argv[1] with the test's loader wrapper (see `_script`)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
  fl = flags.FLAGS
  absl_logging.set_verbosity(absl_logging.WARNING)  # As capi_jax.main.
  logging.basicConfig(level=logging.WARNING)
  logging.getLogger('capi_jax').setLevel(logging.INFO)
  config = _config(fl.total)
  config.evals.final = fl.final_eval
  real = pipeline.create_train_loader

  if fl.kill_workers_at >= 0:
    config.data.num_workers = 1

  def loader(*args, **kwargs):
    inner = real(*args, **kwargs)
    if fl.kill_workers_at >= 0:
      return loader_wrappers.KillsItsWorkers(inner, fl.kill_workers_at)
    if fl.throttle:
      return loader_wrappers.Throttled(inner, fl.throttle)
    return loader_wrappers.NanFrom(inner, start=fl.nan_from)

  pipeline.create_train_loader = loader
  methods.register(loader_wrappers.HostNormalisedCapi)
  train.train_and_evaluate(config, argv[1])


if __name__ == '__main__':
  from absl import flags as absl_flags  # pylint: disable=g-import-not-at-top
  absl_flags.DEFINE_float('throttle', 0.0, 'Seconds per batch (a Throttled loader).')
  absl_flags.DEFINE_integer('nan_from', 10**9, 'First NaN batch (a NanFrom loader).')
  absl_flags.DEFINE_bool('final_eval', False, 'config.evals.final.')
  absl_flags.DEFINE_integer('total', TOTAL, 'config.train.total_iters.')
  absl_flags.DEFINE_integer('kill_workers_at', -1, 'Kill the data workers before this batch.')
  cli.run(_train_main)
