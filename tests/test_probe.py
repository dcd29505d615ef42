"""Issue 23's hostile probe, case by case: each case refuses with one line naming the problem
and the fix, or recovers, and loses nothing. Cases that need a trained workdir live beside
their kin in tests/test_faults.py (the table in docs/ lists where each item is tested)."""

import asyncio
import errno
import gc
import json
import logging
import os
import pathlib
import subprocess
import sys
import threading

import numpy as np
import pytest
from PIL import Image

from capi_jax import evaluate
from capi_jax.base import storage
from capi_jax.data import sources
from capi_jax.engine import checkpointing
from capi_jax.engine import config_checks
from capi_jax.engine import curves
from capi_jax.engine import evaluation
from capi_jax.engine import metrics_writer
from capi_jax.engine import runs
from capi_jax.evaluators import viz
from capi_jax.weights import files
from configs import tiny
import expected_skips  # tests/ is on sys.path (pytest's rootdir insertion)

TESTS = pathlib.Path(__file__).resolve().parent


def _images(folder: pathlib.Path, n: int, prefix: str = 'img') -> None:
  folder.mkdir(parents=True, exist_ok=True)
  for i in range(n):
    Image.fromarray(np.full((4, 4, 3), i % 256, np.uint8)).save(folder / f'{prefix}{i}.png')


# ------------------------------------------------------------------ 2. image folders
def test_a_hidden_folder_does_not_replace_the_data_set(tmp_path):
  _images(tmp_path, 30)
  _images(tmp_path / '.thumbs', 3)  # Thumbnails a file manager left behind.
  (tmp_path / '._img0.png').write_bytes(b'macOS resource fork, not an image')
  source = sources.make_source(f'folder:{tmp_path}', 'train')
  assert (len(source), source.num_classes) == (30, 0)
  # In a class folder too: hidden classes and hidden files below a class are left out.
  _images(tmp_path / 'cls' / 'a', 5)
  _images(tmp_path / 'cls' / 'a' / '.cache', 2)
  _images(tmp_path / 'cls' / '.git', 2)
  source = sources.make_source(f'folder:{tmp_path / "cls"}', 'train')
  assert (len(source), source.class_names) == (5, ['a'])


def test_symlink_loops_give_each_real_file_once(tmp_path, caplog):
  _images(tmp_path / 'cls', 30)
  _images(tmp_path / 'other', 4)
  os.symlink('.', tmp_path / 'cls' / 'again')
  with caplog.at_level(logging.WARNING):
    source = sources.make_source(f'folder:{tmp_path}', 'train')
  assert len(source) == 34 and source.labels == [0] * 30 + [1] * 4
  assert 'again -> .' in caplog.text and 'each real file is read once' in caplog.text
  # `loop -> .` plus `up -> ..` once made the scan hang; a link from one class into another
  # is not followed either (its images keep their own label).
  os.symlink('.', tmp_path / 'other' / 'loop')
  os.symlink('..', tmp_path / 'other' / 'up')
  os.symlink('../cls', tmp_path / 'other' / 'cousin')
  (tmp_path / 'other' / 'twin.png').symlink_to(tmp_path / 'other' / 'img0.png')
  source = sources.make_source(f'folder:{tmp_path}', 'train')
  assert len(source) == 34 and source.labels == [0] * 30 + [1] * 4
  # Read alone, `other` has one class: `cousin` (the loops are no classes).
  alone = sources.make_source(f'folder:{tmp_path / "other"}', 'train')
  assert alone.class_names == ['cousin'] and len(alone) == 30


def test_a_link_to_images_elsewhere_is_followed(tmp_path):
  _images(tmp_path / 'pool', 6)
  (tmp_path / 'set' / 'a').mkdir(parents=True)
  os.symlink(tmp_path / 'pool', tmp_path / 'set' / 'a' / 'pool')
  source = sources.make_source(f'folder:{tmp_path / "set"}', 'train')
  assert len(source) == 6 and source.paths[0].endswith('set/a/pool/img0.png')


def test_the_layout_rule_is_stated(tmp_path, caplog):
  _images(tmp_path, 3)
  _images(tmp_path / 'a', 2)
  with caplog.at_level(logging.WARNING):
    source = sources.make_source(f'folder:{tmp_path}', 'train')
  assert len(source) == 2
  assert 'one class per sub-folder' in caplog.text
  (tmp_path / 'empty').mkdir()
  with pytest.raises(sources.DatasetNotFoundError, match='one unlabelled set'):
    sources.make_source(f'folder:{tmp_path / "empty"}', 'train')


def test_a_long_scan_reports_progress(tmp_path, caplog, monkeypatch):
  monkeypatch.setattr(sources, '_SCAN_PROGRESS_S', 0.0)
  for i in range(3):
    _images(tmp_path / f'part{i}', 1)
  with caplog.at_level(logging.INFO, logger=sources.logger.name):
    sources.make_source(f'folder:{tmp_path}', 'train')
  assert 'Scanning' in caplog.text and 'images so far' in caplog.text


# ------------------------------------------------------------------ CI's skips
def test_only_the_listed_skips_pass_in_ci(tmp_path):
  """Under CAPI_STRICT_SKIPS=1 (.ci/run) an unlisted skip fails the session, naming it."""
  (tmp_path / 'test_x.py').write_text(
      'import pytest\n'
      'def test_fine():\n  pass\n'
      'def test_gone():\n  pytest.importorskip("no_such_module_capi")\n')
  run = lambda strict: subprocess.run(
      [sys.executable, '-m', 'pytest', '-q', '-p', 'expected_skips', '--noconftest',
       '--rootdir', str(tmp_path), str(tmp_path / 'test_x.py')],
      cwd=tmp_path, capture_output=True, text=True, timeout=120,
      env={**os.environ, 'PYTHONPATH': str(TESTS), expected_skips.STRICT_ENV: strict})
  relaxed, strict = run('0'), run('1')
  assert relaxed.returncode == 0, relaxed.stdout + relaxed.stderr
  assert strict.returncode == 1, strict.stdout + strict.stderr
  assert "test_x.py::test_gone: could not import 'no_such_module_capi'" in strict.stdout
  assert expected_skips.unexpected([
      ('tests/test_transforms.py::test_fixture_regenerates_with_torchvision',
       'torchvision is not installed'),
      ('tests/test_convert.py::test_x', 'could not import torch')]) == [
          ('tests/test_convert.py::test_x', 'could not import torch')]


# ------------------------------------------------------------------ 6. metrics.jsonl
def test_a_last_row_without_its_newline_is_not_glued_to_the_next(tmp_path, caplog):
  rows = [json.dumps({'step': s, 'loss': 1.0 / (s + 1)}) for s in range(4)]
  (tmp_path / 'metrics.jsonl').write_text('\n'.join(rows))  # Killed before the last '\n'.
  writer = metrics_writer.MetricsWriter(tmp_path, start_step=4)
  writer.write(4, {'loss': 0.1})
  writer.close()
  lines = (tmp_path / 'metrics.jsonl').read_text().splitlines()
  assert [json.loads(l)['step'] for l in lines] == [0, 1, 2, 3, 4]
  # Curves skip a line that is not one row (as an older version glued them), with a warning.
  (tmp_path / 'old.jsonl').write_text(rows[0] + '\n' + rows[1] + rows[2] + '\n' + rows[3] + '\n')
  with caplog.at_level(logging.WARNING):
    assert list(curves.read_metrics(tmp_path / 'old.jsonl')['loss'][0]) == [0, 3]
  assert '1 lines that are not one JSON row' in caplog.text


# ------------------------------------------------------------------ 4. convert's outputs
def test_converted_weights_never_replace_a_file_and_appear_whole(tmp_path, monkeypatch):
  sd = {'w': np.arange(6, dtype=np.float32).reshape(2, 3)}
  existing = tmp_path / 'old.npz'
  existing.write_bytes(b'a file the user keeps')
  with pytest.raises(files.OutputExistsError, match='exists: give another --output'):
    files.write_state_dict(sd, existing)
  assert existing.read_bytes() == b'a file the user keeps'
  (tmp_path / 'run' / 'params').mkdir(parents=True)
  with pytest.raises(files.OutputExistsError, match='params exists'):
    files.save_params({'backbone': sd}, tmp_path / 'run')

  def full_disk(path, **arrays):
    del arrays
    pathlib.Path(path).write_bytes(b'PK\x03\x04 cut short')
    raise OSError(28, 'No space left on device')

  monkeypatch.setattr(np, 'savez', full_disk)
  with pytest.raises(OSError, match='No space left'):
    files.write_state_dict(sd, tmp_path / 'new.npz')
  assert sorted(p.name for p in tmp_path.iterdir()) == ['old.npz', 'run']  # Nothing left.


# ------------------------------------------------------------------ 16. concurrent writers
def test_concurrent_atomic_writes_use_their_own_temporary_files(tmp_path):
  """Two `evaluate` runs writing one results.json: each write goes through its own temporary
  name (was one shared 'results.json.tmp'), so the file is always one writer's whole text."""
  target = tmp_path / 'results.json'
  texts = [json.dumps({'writer': w, 'pad': 'x' * 100_000}) for w in range(4)]
  errors_seen = []

  def write(text):
    try:
      for _ in range(25):
        storage.write_atomic(target, text)
        assert target.read_text() in texts
    except Exception as e:  # pylint: disable=broad-except
      errors_seen.append(e)

  threads = [threading.Thread(target=write, args=(t,)) for t in texts]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert not errors_seen and target.read_text() in texts
  assert [p.name for p in tmp_path.iterdir()] == ['results.json']  # No temporary file left.


# ------------------------------------------------------------------ 15. a line, not a traceback
def test_an_unusable_workdir_is_one_line(tmp_path, monkeypatch):
  (tmp_path / 'a_file').write_text('x')
  for workdir in (tmp_path / 'a_file', tmp_path / 'a_file' / 'run'):
    with pytest.raises(runs.WorkdirUnusableError, match='is a file. Give a --workdir'):
      runs.make_workdir(workdir)

  def read_only(self, data):
    raise OSError(errno.EROFS, 'Read-only file system', os.fspath(self))

  monkeypatch.setattr(type(storage.path(tmp_path)), 'write_bytes', read_only)
  with pytest.raises(runs.WorkdirUnusableError, match='cannot be used: Read-only file system'):
    runs.make_workdir(tmp_path / 'run')


def test_evaluate_checks_its_config_and_names_a_missing_file(tmp_path):
  config = tiny.get_config()
  config.evals.batch_size = 0  # Was a ZeroDivisionError: evaluate ran no config checks.
  with pytest.raises(config_checks.ConfigError, match='evals.batch_size=0'):
    config_checks.validate(config, device_count=0)
  with pytest.raises(checkpointing.CheckpointNotFoundError, match='no such official checkpoint'):
    evaluate.load_params(tiny.get_config(), tmp_path, str(tmp_path / 'missing.pth'), '', 'ema',
                         None)


# ------------------------------------------------------------------ 7. another process count
def test_resuming_with_another_process_count_is_one_line(tmp_path):
  step_dir = tmp_path / '16'
  (step_dir / 'data_iter').mkdir(parents=True)
  (step_dir / 'data_iter' / 'process_0-of-1.json').write_text('{}')
  checkpointing.check_process_count(storage.path(step_dir), 1)
  with pytest.raises(checkpointing.IncompatibleCheckpointError,
                     match=r'written by 1 process\(es\) and this run has 2: resume with 1'):
    checkpointing.check_process_count(storage.path(step_dir), 2)


# ------------------------------------------------------------------ 8. a full disk in evaluate
def test_a_full_disk_in_evaluate_keeps_the_protocols_done_and_leaves_no_cut_png(
    tmp_path, monkeypatch):
  class Done:
    def run(self, backbone, env, out_dir, log):
      del backbone, env, out_dir, log
      return {'global/k10': 0.75}, {}

  class FillsTheDisk:
    def run(self, backbone, env, out_dir, log):
      del backbone, env, log
      viz._save_png(Image.new('RGB', (64, 64)), f'{out_dir}/picture.png')
      return {}, {}

  monkeypatch.setattr(evaluation, 'make_backbone', lambda *a: None)
  monkeypatch.setattr(evaluation, 'environment', lambda config: None)
  monkeypatch.setattr(evaluation.evaluators, 'from_config',
                      lambda evals, name: Done() if name == 'knn' else FillsTheDisk())
  real_open = open

  def full_disk_open(file, mode='r', *args, **kwargs):
    f = real_open(file, mode, *args, **kwargs)
    if 'w' in mode and str(file).endswith('.tmp') and 'picture.png' in str(file):
      f.write(b'\x89PNG cut')  # Part of it reaches the disk, then: ENOSPC.
      f.close()
      raise OSError(errno.ENOSPC, 'No space left on device')
    return f

  monkeypatch.setattr('builtins.open', full_disk_open)
  with pytest.raises(evaluation.EvaluationWriteError,
                     match=r"'viz' could not write .*No space left.*\(results_knn.json\)"):
    evaluation.evaluate_params(tiny.get_config(), None, None, storage.path(tmp_path),
                               ['knn', 'viz'])
  assert json.loads((tmp_path / 'results_knn.json').read_text())['results'] == {
      'global/k10': 0.75}
  assert sorted(p.name for p in tmp_path.iterdir()) == ['results_knn.json']  # No cut PNG.


# ------------------------------------------------------------------ 12. a write fails in a save
def test_a_failed_save_is_not_buried_under_unretrieved_futures(tmp_path, caplog):
  """After a failed asynchronous save, asyncio reported each of Orbax's parallel writes'
  error again when collected (~600 lines after the one that mattered)."""

  class FailedSave:
    def wait_until_finished(self):
      raise OSError(errno.ENOSPC, 'No space left on device')

  ckpt = checkpointing.Checkpointer.__new__(checkpointing.Checkpointer)
  ckpt.manager, ckpt.directory, ckpt._saving = FailedSave(), tmp_path, 8  # pylint: disable=protected-access
  with pytest.raises(checkpointing.CheckpointWriteError, match='No space left'):
    ckpt.wait()
  try:
    with caplog.at_level(logging.ERROR):
      loop = asyncio.new_event_loop()
      future = loop.create_future()
      future.set_exception(OSError(errno.ENOSPC, 'No space left on device'))
      del future
      gc.collect()
      loop.close()
      logging.getLogger('asyncio').error('A real asyncio error')  # Still shown.
    assert [r.getMessage() for r in caplog.records] == ['A real asyncio error']
  finally:
    logging.getLogger('asyncio').removeFilter(checkpointing._QUIET)  # pylint: disable=protected-access


# ------------------------------------------------------------------ simultaneous starts
_RACER = '''
import os, pathlib, sys, time
from capi_jax.engine import runs
workdir, meeting, n = sys.argv[1], pathlib.Path(sys.argv[2]), int(sys.argv[3])


def wait_for(prefix):  # Until all n racers have left a file starting with prefix.
  deadline = time.time() + 120
  while len(list(meeting.glob(prefix + '*'))) < n and time.time() < deadline:
    time.sleep(0.01)

(meeting / f'ready_{os.getpid()}').touch()
wait_for('ready_')  # Every racer has imported capi_jax: go.
lock = runs.WorkdirLock(workdir)
try:
  lock.acquire()
except runs.WorkdirBusyError:
  print('busy', flush=True)
  (meeting / f'tried_{os.getpid()}').touch()
else:
  print('won', flush=True)
  (meeting / f'tried_{os.getpid()}').touch()
  wait_for('tried_')  # Held until every racer has tried.
  lock.release()
'''


def test_simultaneous_starts_in_separate_processes_get_one_lock(tmp_path):
  """README: 'simultaneous starts: exactly one wins', so far raced by threads of one process."""
  meeting = tmp_path / 'meeting'
  meeting.mkdir()
  racers = [subprocess.Popen(
      [sys.executable, '-c', _RACER, str(tmp_path / 'run'), str(meeting), '4'],
      cwd=TESTS.parent, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
      env={**os.environ, 'JAX_PLATFORMS': 'cpu'}) for _ in range(4)]
  outs = [r.communicate(timeout=300) for r in racers]
  said = sorted(out.strip() for out, _ in outs)
  assert said == ['busy', 'busy', 'busy', 'won'], outs
