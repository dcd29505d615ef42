"""gs:// workdirs end to end, against fake-gcs-server in a loopback-only namespace.

Every test here is marked `gcs`: it runs in the child pytest that gcs_netns.py starts inside
`unshare -n`, where any attempt to reach an address other than 127.0.0.1 fails the test. The
commands (`python -m capi_jax.main`, `python -m capi_jax.evaluate`) run as subprocesses there
too, on one CPU device, sharing a JAX compilation cache (local, in tmp_path).

What the emulator (fake-gcs-server 1.54) cannot prove, said again next to the tests concerned:
it enforces `ifGenerationMatch` only on multipart uploads, which is what the lock's create,
heartbeat and take-over use (so those races are real tests here), but not on deletes (the
lock's release), composes (metrics / TensorBoard appends) or resumable uploads.
"""

import io
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import tempfile
import time

from google.cloud.storage import blob as blob_lib
import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from PIL import Image
import pytest
import scipy.io

from capi_jax import prepare_data
from capi_jax.base import problems as problems_lib
from capi_jax.base import sharding
from capi_jax.base import storage
from capi_jax.data import sources
from capi_jax.data import wds
from capi_jax.engine import checkpointing
from capi_jax.engine import metrics_writer
from capi_jax.engine import pretrained
from capi_jax.engine import runs
from capi_jax.evaluators import datasets
from capi_jax.evaluators import seg_data
from capi_jax.weights import files
from configs import tiny
from test_faults import race_for_the_lock
from test_input_pipeline import _write_bad_data_folder

pytestmark = pytest.mark.gcs

ROOT = pathlib.Path(__file__).resolve().parents[1]
TOTAL, PERIOD = 120, 20
# configs/tiny.py shrunk to seconds (test_train_step.micro_config's model), as command-line flags.
MICRO = {
    'capi.model.embed_dim': 32, 'capi.model.num_heads': 2, 'capi.model.encoder_depth': 1,
    'capi.model.decoder_depth': 1, 'data.image_size': 16, 'capi.num_clusters': 16,
    'train.global_batch_size': 16, 'capi.optim.lr_schedule.warmup_iters': 2,
    'capi.optim.momentum_schedule.warmup_iters': 2,
    'capi.clustering_optimizer.lr_schedule.warmup_iters': 2, 'train.log_loss_every': 1,
    'train.nan_check_period': 1, 'train.total_iters': TOTAL,
    'train.checkpointing.period': PERIOD, 'evals.final': False,
}
# evaluate: the k-NN extra on a few hundred Fashion-MNIST images, and two PCA pictures.
EVALS = {
    'evals.protocols': "('knn','viz')", 'evals.random_init_baseline': False,
    'evals.batch_size': 50, 'evals.knn.max_train_images': 200, 'evals.knn.max_test_images': 50,
    'evals.knn.resolution': 16, 'evals.knn.ks': '(1,3)', 'evals.viz.resolutions': '(16,)',
    'evals.viz.num_images': 2,
}


def _flags(overrides: dict[str, object]) -> list[str]:
  return [f'--config.{k}={v}' for k, v in overrides.items()]


def _micro_config():
  config = tiny.get_config()
  for key, value in MICRO.items():
    *sections, name = key.split('.')
    node = config
    for s in sections:
      node = node[s]
    node[name] = value
  return config


def _command(module: str, workdir: str, cwd: pathlib.Path, cache: pathlib.Path,
             *flags: str) -> subprocess.Popen:
  """`python -m capi_jax.<module> --config=configs/tiny.py --workdir=WORKDIR ...`, run in `cwd`
  (an empty folder: a relative path written by mistake would land there), its temporary files
  in cwd/tmp (a killed run leaves its local TensorBoard folder there)."""
  (cwd / 'tmp').mkdir(exist_ok=True)
  env = {**os.environ, 'PYTHONPATH': str(ROOT), 'JAX_PLATFORMS': 'cpu', 'TMPDIR': str(cwd / 'tmp'),
         'XLA_FLAGS': '--xla_force_host_platform_device_count=1',
         'JAX_COMPILATION_CACHE_DIR': str(cache),
         'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0'}
  return subprocess.Popen(
      [sys.executable, '-m', f'capi_jax.{module}', f'--config={ROOT / "configs" / "tiny.py"}',
       f'--workdir={workdir}', *flags], cwd=cwd, env=env, stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen, timeout: float = 300) -> str:
  out, _ = proc.communicate(timeout=timeout)
  return out


def _committed(workdir: storage.Path) -> list[int]:
  """The checkpoint steps Orbax committed on GCS (their commit marker is written last)."""
  names = storage.list_files(workdir / 'checkpoints')  # Items have their own markers below.
  return sorted(int(m[1]) for n in names if (m := re.fullmatch(r'(\d+)/commit_success.txt', n)))


def _wait_for(condition, proc: subprocess.Popen, what: str, timeout: float = 240) -> None:
  deadline = time.time() + timeout
  while not condition():
    if proc.poll() is not None or time.time() > deadline:
      raise AssertionError(f'{what} never happened:\n{_finish(proc)[-3000:]}')
    time.sleep(0.05)


def _rows(workdir: storage.Path) -> list[dict[str, object]]:
  """metrics.jsonl without what depends on the machine's speed (throughput, timings)."""
  timing = {'per', 'time', 'eta', 'mfu', 'flops', 'tflops', 'wait', 'seconds'}
  speed = lambda key: bool(timing & set(re.split(r'[_/.]', key)))
  return [{k: v for k, v in json.loads(line).items() if not speed(k)}
          for line in (workdir / 'metrics.jsonl').read_text().splitlines()]


@pytest.fixture(scope='module')
def scenario(gcs_emulator, tmp_path_factory):
  """The issue's "done when", once: a straight run; a run killed with kill -9 after its first
  checkpoint (a second start refused while it held the lock), then resumed; an evaluation.

  On 2 cores, commands overlap where they may: the straight and the killed run start together
  (both compile), the evaluation (of the straight run) runs beside the resumed run.
  """
  del gcs_emulator
  tmp = tmp_path_factory.mktemp('scenario')
  cwd, cache = tmp / 'cwd', tmp / 'jax_cache'
  cwd.mkdir()
  base = f'gs://bucket/scenario-{os.getpid()}'
  straight, killed = storage.path(f'{base}/straight'), storage.path(f'{base}/killed')
  start = time.perf_counter()
  seconds = lambda: round(time.perf_counter() - start, 1)
  timeline = {}
  # The straight run also profiles two steps (jax.profiler writes locally; uploaded at stop).
  straight_run = _command('main', straight, cwd, cache,
                          *_flags({**MICRO, 'train.profile_steps': '(2,4)'}))
  first = _command('main', killed, cwd, cache, *_flags(MICRO))
  _wait_for(lambda: (killed / runs.LOCK_NAME).exists(), first, 'the lock')
  # Frozen (its pid alive, its lock fresh) while a second start tries the same workdir.
  os.kill(first.pid, signal.SIGSTOP)
  second = _command('main', killed, cwd, cache, *_flags(MICRO))
  second_out = _finish(second)
  timeline['second refused'] = seconds()
  os.kill(first.pid, signal.SIGCONT)
  _wait_for(lambda: _committed(killed), first, 'a checkpoint')
  still_running = first.poll() is None
  os.kill(first.pid, signal.SIGKILL)
  first_out = _finish(first)
  killed_with = _committed(killed)
  timeline['first killed'] = seconds()
  straight_out = _finish(straight_run)
  timeline['straight done'] = seconds()
  assert straight_run.returncode == 0, straight_out[-3000:]
  evaluate = _command('evaluate', straight, cwd, cache, *_flags({**MICRO, **EVALS}))
  resumed = _command('main', killed, cwd, cache, *_flags(MICRO))
  resumed_out = _finish(resumed)
  timeline['resumed done'] = seconds()
  evaluate_out = _finish(evaluate)
  timeline['evaluate done'] = seconds()
  print(f'\n[test_gcs] scenario timeline (s): {timeline}')
  return dict(straight=straight, killed=killed, cwd=cwd, first=first, first_out=first_out,
              still_running=still_running, killed_with=killed_with, second=second,
              second_out=second_out, resumed=resumed, resumed_out=resumed_out,
              evaluate=evaluate, evaluate_out=evaluate_out)


def test_a_profile_of_two_steps_lands_in_the_bucket(scenario):
  assert list((scenario['straight'] / 'profile').glob('plugins/profile/*/*.xplane.pb'))


def test_killed_then_resumed_equals_uninterrupted(scenario):
  s = scenario
  assert s['still_running'] and s['first'].returncode == -signal.SIGKILL, s['first_out'][-3000:]
  assert s['killed_with'] and s['killed_with'][-1] < TOTAL
  assert s['resumed'].returncode == 0, s['resumed_out'][-3000:]
  log = lambda out: '\n'.join(l for l in out.splitlines() if not l.startswith('[step'))
  assert f'Resuming from step {s["killed_with"][-1]}' in s['resumed_out'], (
      s['killed_with'], log(s['first_out']), log(s['resumed_out']))
  assert 'Took over the stale lock' in s['resumed_out']  # Same host, its pid gone.
  straight, killed = s['straight'], s['killed']
  assert [r['step'] for r in _rows(killed)] == list(range(TOTAL))  # Each step once.
  assert _rows(killed) == _rows(straight)
  with ocp.StandardCheckpointer() as checkpointer:
    final = [checkpointer.restore(w / 'checkpoints' / str(TOTAL) / 'state')
             for w in (straight, killed)]
  leaves = [jax.tree_util.tree_leaves_with_path(f) for f in final]
  assert [k for k, _ in leaves[0]] == [k for k, _ in leaves[1]] and leaves[0]
  for (key, a), (_, b) in zip(*leaves):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=str(key))
  for workdir in (straight, killed):
    assert not (workdir / runs.LOCK_NAME).exists()
    for step in _committed(workdir):  # Checksums from the listing's CRC32C, all intact.
      step_dir = workdir / 'checkpoints' / str(step)
      recorded = json.loads((step_dir / checkpointing.CHECKSUMS).read_text())['files']
      assert recorded and all('crc32c' in f for f in recorded.values())
      assert checkpointing.damage(step_dir) is None
  # TensorBoard: the killed start's events and the resumed start's, each in its own file.
  events = [n for n in storage.list_files(killed / 'tensorboard') if 'tfevents' in n]
  assert len(events) == 2, events
  assert all(b'capi_loss' in (killed / 'tensorboard' / n).read_bytes() for n in events)


def test_a_second_run_is_refused_while_the_first_holds_the_lock(scenario):
  s = scenario
  assert s['second'].returncode == 1, s['second_out']
  assert f'is in use by another run: pid {s["first"].pid} on host' in s['second_out']
  assert 'Traceback' not in s['second_out']
  # Records of the killed start and of the resumed one; none of the refused start.
  assert len(list((s['killed'] / runs.RUNS_DIR).iterdir())) == 2


def test_evaluate_writes_its_results_into_the_bucket(scenario):
  s = scenario
  assert s['evaluate'].returncode == 0, s['evaluate_out'][-3000:]
  out_dir = s['straight'] / 'eval' / str(TOTAL)
  results = json.loads((out_dir / 'results.json').read_text())
  assert results['step'] == TOTAL and 'knn' in results['protocols']
  written = storage.list_files(out_dir)
  assert 'curves.png' in written
  assert sum(n.startswith('viz_16/') and n.endswith('.png') for n in written) >= 2


def test_nothing_named_gs_appears_on_local_disk(scenario):
  local = [p for p in scenario['cwd'].rglob('*') if p.name.startswith('gs:')]
  found = subprocess.run(['find', '/tmp', '-maxdepth', '4', '-name', 'gs:*'],
                         capture_output=True, text=True, check=False).stdout.split()
  assert not local and not found and not pathlib.Path('gs:').exists(), (local, found)


# ------------------------------------------------------------------ the lock, records, metrics
# (test_faults.py: the lock's live / dead / stale holders, on local disk and on gs://.)
def test_simultaneous_starts_get_one_lock_and_a_taken_over_holder_notices(gcs_path, monkeypatch,
                                                                           caplog):
  # A real race: the create is a multipart upload with ifGenerationMatch=0, which the emulator
  # enforces.
  won = race_for_the_lock(gcs_path)
  assert len(won) == 1
  won[0].release()

  # Heartbeats rewrite the object (a new generation each time); a holder whose lock another start
  # took over (it had stalled past STALE_AFTER_S) says so, and its release leaves the new lock.
  monkeypatch.setattr(runs, 'HEARTBEAT_S', 0.2)
  holder = runs.WorkdirLock(gcs_path)
  holder.acquire()
  lock_file = gcs_path / runs.LOCK_NAME
  before = storage.read_versioned(lock_file).version
  time.sleep(0.7)
  assert storage.read_versioned(lock_file).version != before
  monkeypatch.setattr(runs, 'STALE_AFTER_S', 0.0)
  taker = runs.WorkdirLock(gcs_path)
  taker.acquire()  # Another host's view: its "pid" is on this host and alive, but silent.
  deadline = time.time() + 10
  while 'no longer this run' not in caplog.text and time.time() < deadline:
    time.sleep(0.05)
  assert 'is no longer this run\'s' in caplog.text
  holder.release()  # Not its lock any more: untouched. (A conditional delete, not enforced by
  assert json.loads(lock_file.read_text())['token'] == taker.holder.token  # the emulator.)
  taker.release()
  assert not lock_file.exists()


def test_records_on_gcs_appear_whole_and_the_newest_readable_one_counts(gcs_path, caplog):
  config = _micro_config()
  first = runs.write_record(gcs_path, config, None)
  second = runs.write_record(gcs_path, config, 8)
  assert str(first).startswith('gs://') and first != second
  assert sorted(storage.list_files(gcs_path / runs.RUNS_DIR)) == sorted([first.name, second.name])
  assert json.loads(second.read_text())['resumed_from_step'] == 8
  (gcs_path / runs.RUNS_DIR / '29991231T000000.000000Z_host_1.json').write_text('{"cut')
  assert runs.latest_config(gcs_path).capi.model.embed_dim == 32
  assert 'Skipping unreadable run record' in caplog.text


def test_metrics_keep_every_row_across_resumes(gcs_path, monkeypatch):
  monkeypatch.setattr(metrics_writer, 'GCS_FLUSH_S', 3600.0)  # Only explicit flushes.
  writer = metrics_writer.MetricsWriter(gcs_path)
  for step in range(6):
    writer.write(step, {'loss': float(step)})
  assert not (gcs_path / 'metrics.jsonl').exists()  # Batched: one update per flush on GCS.
  writer.flush()  # (The loop flushes before each checkpoint.)
  for step in range(6, 10):
    writer.write(step, {'loss': float(step)})
  writer.close()
  steps = lambda: [json.loads(l)['step'] for l in (gcs_path / 'metrics.jsonl').read_text().split(
      '\n') if l]
  assert steps() == list(range(10))
  # Resumed from a checkpoint of step 6: later rows dropped, then written again once.
  (gcs_path / 'metrics.jsonl').write_text((gcs_path / 'metrics.jsonl').read_text() + '{"step": 1')
  writer = metrics_writer.MetricsWriter(gcs_path, start_step=6)
  writer.write(6, {'loss': 0.5})
  writer.close()
  assert steps() == list(range(7))
  events = [n for n in storage.list_files(gcs_path / 'tensorboard') if 'tfevents' in n]
  assert len(events) == 2  # One per writer: a later one never replaces an earlier one.
  assert not [n for n in storage.list_files(gcs_path) if '.append-' in n]  # No piece left.


# ------------------------------------------------------------------ checkpoints
def _state(mesh, value: float):
  tree = {'w': jnp.full((8, 4), value), 'b': jnp.arange(6.0) + value, 'step': jnp.int32(3)}
  return jax.device_put(tree, sharding.tree_shardings(mesh, tree, (('.*', 'fsdp'),)))


def _target(state):
  return checkpointing.restore_target(state, jax.tree.map(lambda x: x.sharding, state))


def _damage(step_dir: storage.Path, how: str) -> None:
  """Damages the biggest array file of the checkpoint (an object rewritten or deleted)."""
  listed = storage.list_files(step_dir / 'state')
  name = max((n for n in listed if '/d/' in f'/{n}'), key=lambda n: listed[n].size)
  data = (step_dir / 'state' / name).read_bytes()
  if how == 'truncated':
    (step_dir / 'state' / name).write_bytes(data[:len(data) // 2])
  elif how == 'deleted':
    (step_dir / 'state' / name).unlink()
  else:  # Same size, 8 bytes changed: only the checksum tells.
    middle = len(data) // 2
    (step_dir / 'state' / name).write_bytes(
        data[:middle] + bytes(255 - b for b in data[middle:middle + 8]) + data[middle + 8:])


@pytest.mark.parametrize('how', ['truncated', 'deleted', 'overwritten'])
def test_a_damaged_latest_checkpoint_falls_back(gcs_path, caplog, how):
  config = _micro_config()
  mesh = sharding.make_mesh(config)
  ckpt = checkpointing.Checkpointer(gcs_path / 'checkpoints', config)
  it = iter(grain.MapDataset.range(100).to_iter_dataset())
  for step in (1, 2):
    ckpt.save(step, _state(mesh, float(step)), it)
  ckpt.close()
  _damage(gcs_path / 'checkpoints' / '2', how)
  ckpt = checkpointing.Checkpointer(gcs_path / 'checkpoints', config)
  state, step = ckpt.restore_latest(_target(_state(mesh, 0.0)), None)
  assert step == 1 and float(state['w'][0, 0]) == 1.0
  assert 'checkpoints/2 is damaged' in caplog.text
  assert ckpt.all_steps() == [1]
  ckpt.close()
  aside = gcs_path / f'checkpoints{checkpointing.DAMAGED_SUFFIX}' / '2'
  assert (aside / 'state').is_dir() and not (gcs_path / 'checkpoints' / '2').exists()
  assert checkpointing.find_checkpoint(gcs_path).step == 1


def test_an_uncommitted_step_folder_is_no_checkpoint(gcs_path):
  # On GCS Orbax writes <step>/ in place; a save killed half-way leaves it without its commit
  # marker (nor checksums): neither Orbax nor find_checkpoint may take it.
  config = _micro_config()
  mesh = sharding.make_mesh(config)
  ckpt = checkpointing.Checkpointer(gcs_path / 'checkpoints', config)
  ckpt.save(3, _state(mesh, 3.0), iter(grain.MapDataset.range(9).to_iter_dataset()))
  ckpt.close()
  for name in storage.list_files(gcs_path / 'checkpoints' / '3'):
    if name not in ('commit_success.txt', checkpointing.CHECKSUMS):
      storage.copy_file(gcs_path / 'checkpoints' / '3' / name,
                        gcs_path / 'checkpoints' / '5' / name)
  found = checkpointing.find_checkpoint(gcs_path)
  assert (found.step, os.fspath(found.path)) == (3, f'{gcs_path}/checkpoints/3')
  ckpt = checkpointing.Checkpointer(gcs_path / 'checkpoints', config)
  assert ckpt.all_steps() == [3]
  ckpt.close()


# ------------------------------------------------------------------ data, weights
def test_prepared_data_and_image_folders_on_gcs(gcs_path, tmp_path):
  folder = tmp_path / 'images'
  good, _ = _write_bad_data_folder(folder)
  result = prepare_data.prepare(f'folder:{folder}', ['train'], f'{gcs_path}/tfds', 'odd',
                                prepare_data.Encoding(resize=0, quality=90), workers=1)
  assert result['num_examples'] == {'train': len(good)}
  version_dir = gcs_path / 'tfds' / 'odd' / prepare_data.VERSION
  assert (version_dir / 'dataset_info.json').exists()
  assert not list(pathlib.Path(tempfile.gettempdir()).glob('capi_jax_prepare_*'))
  prepared = sources.make_source('tfds:odd', 'train', f'{gcs_path}/tfds')
  local = sources.make_source(f'folder:{folder}', 'train')
  kept = [local[i] for i in range(len(local)) if os.path.relpath(local[i]['name'], folder)
          in good]
  assert [prepared[i]['image'] for i in range(len(prepared))] == [r['image'] for r in kept]
  with pytest.raises(FileExistsError, match='already exists'):
    prepare_data.prepare(f'folder:{folder}', ['train'], f'{gcs_path}/tfds', 'odd',
                         prepare_data.Encoding(resize=0, quality=90), workers=1)
  # The same folder on GCS: the same records in the same order, labels and classes.
  storage.upload_tree(folder, gcs_path / 'images')
  remote = sources.make_source(f'folder:{gcs_path}/images', 'train')
  assert remote.class_names == local.class_names and len(remote) == len(local)
  for i in range(len(local)):
    assert (remote[i]['label'], remote[i]['image']) == (local[i]['label'], local[i]['image'])
    assert remote[i]['name'] == f'{gcs_path}/images/' + os.path.relpath(local[i]['name'], folder)


def test_segmentation_and_evaluation_sets_on_gcs(gcs_path, tmp_path):
  # Each layout written locally, uploaded, and read from the bucket: the same pairs, in the same
  # order, with the same pixels (SBD's .mat masks and Cityscapes' id mapping included).
  rng = np.random.default_rng(0)
  def save(relative, array):
    (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(tmp_path / relative)
  for split, names in (('training', 'ba'), ('validation', 'c')):
    for name in names:
      save(f'ADEChallengeData2016/images/{split}/{name}.jpg', rng.integers(0, 255, (12, 16, 3),
                                                                           np.uint8))
      save(f'ADEChallengeData2016/annotations/{split}/{name}.png', np.full((12, 16), ord(name),
                                                                           np.uint8))
  voc, sbd = 'VOCdevkit/VOC2012', 'benchmark_RELEASE/dataset'
  for path, text in ((f'{voc}/ImageSets/Segmentation/train.txt', 'v1\n'),
                     (f'{sbd}/train.txt', 's1\n'), (f'{sbd}/val.txt', '')):
    (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / path).write_text(text)
  save(f'{voc}/JPEGImages/v1.jpg', rng.integers(0, 255, (8, 8, 3), np.uint8))
  save(f'{voc}/SegmentationClass/v1.png', np.full((8, 8), 3, np.uint8))
  save(f'{sbd}/img/s1.jpg', rng.integers(0, 255, (8, 8, 3), np.uint8))
  (tmp_path / sbd / 'cls').mkdir()
  scipy.io.savemat(tmp_path / sbd / 'cls' / 's1.mat',
                   {'GTcls': {'Segmentation': np.full((8, 8), 7, np.uint8)}})
  city = 'val/lindau/lindau_000000_000019'
  save(f'leftImg8bit/{city}_leftImg8bit.png', rng.integers(0, 255, (8, 8, 3), np.uint8))
  save(f'gtFine/{city}_gtFine_labelIds.png', np.full((8, 8), 26, np.uint8))
  (tmp_path / 'labels.json').write_text('[1, [2, 3]]')
  storage.upload_tree(tmp_path, gcs_path / 'data')
  for spec, split in (('ade20k', 'training'), ('ade20k', 'validation'), ('folder', 'training'),
                      ('voc2012', 'trainaug'), ('cityscapes', 'val')):
    inner = 'ADEChallengeData2016' if spec == 'folder' else ''
    local = seg_data.make_seg_set(f'{spec}:{tmp_path / inner}', split)
    remote = seg_data.make_seg_set(f'{spec}:{gcs_path}/data/{inner}'.rstrip('/'), split)
    assert len(remote) == len(local) > 0
    assert all(p.startswith(f'{gcs_path}/data/') for p in remote.image_paths + remote.mask_paths)
    for i in range(len(local)):
      for ours, theirs in zip(remote[i], local[i]):
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))
  storage.remove_tree(gcs_path / 'data' / 'ADEChallengeData2016' / 'annotations' / 'validation')
  with pytest.raises(FileNotFoundError, match='1 images have no mask'):
    seg_data.make_seg_set(f'ade20k:{gcs_path}/data', 'validation')
  # Classification label files (`labels`, `class_map`) on GCS.
  np.testing.assert_array_equal(datasets.read_targets(f'{gcs_path}/data/labels.json', 2),
                                [[1, -1], [2, 3]])
  problems = problems_lib.Problems()
  for labels in (f'{gcs_path}/data/labels.json', f'{gcs_path}/data/none.json'):
    datasets.check_set(problems, 'test', ml_collections.ConfigDict(
        {'dataset': 'synthetic', 'split': 'train', 'labels': labels, 'class_map': ''}))
  assert len(problems.found) == 1 and 'none.json' in problems.found[0]


def test_weight_files_and_params_on_gcs(gcs_path):
  sd = {'backbone.w': np.arange(6, dtype=np.float32).reshape(2, 3)}
  files.write_state_dict(sd, gcs_path / 'w.npz')
  np.testing.assert_array_equal(files.read_state_dict(f'{gcs_path}/w.npz')['backbone.w'],
                                sd['backbone.w'])
  target = files.save_params({'backbone': {'w': sd['backbone.w']}}, f'{gcs_path}/converted')
  assert os.fspath(target) == f'{gcs_path}/converted/params'
  assert checkpointing.find_checkpoint(f'{gcs_path}/converted').kind == 'params'
  assert list(pretrained.load(f'{gcs_path}/w.npz').state_dict) == ['backbone.w']  # init.checkpoint
  assert pretrained.load(f'{gcs_path}/converted').backbone['w'].shape == (2, 3)
  np.testing.assert_array_equal(files.restore_params(target)['backbone']['w'], sd['backbone.w'])


def test_webdataset_shards_on_gcs(gcs_path, tmp_path, monkeypatch):
  """`wds:` shards in a bucket (brace range and glob) read as their local copies; their indexes
  are cached beside them, and a shard uploaded again (a new generation) is indexed again."""
  rng = np.random.default_rng(0)
  samples = []
  for i in range(6):
    out = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (8, 8, 3), np.uint8)).save(out, format='PNG')
    samples.append((out.getvalue(), 'png', i % 3))
  wds.write_shards(samples, str(tmp_path / '%04d.tar'), 3)
  wds.write_shards(samples, f'{gcs_path}/shards/%04d.tar', 3)
  local = sources.make_source(f'wds:{tmp_path}/{{0000..0001}}.tar', 'train')
  for pattern in ('{0000..0001}.tar', '*.tar'):
    remote = sources.make_source(f'wds:{gcs_path}/shards/{pattern}', 'train')
    assert len(remote) == len(local) == 6
    assert [(remote[i]['image'], remote[i]['label']) for i in range(6)] == [
        (local[i]['image'], local[i]['label']) for i in range(6)]
  assert sorted(storage.list_files(f'{gcs_path}/shards/{wds.INDEX_FOLDER}')) == [
      '0000.tar.npz', '0001.tar.npz']
  indexed = []
  index_shard = wds.index_shard
  monkeypatch.setattr(wds, 'index_shard', lambda shard: indexed.append(shard) or index_shard(shard))
  wds.write_shards(samples[3:], f'{gcs_path}/shards/%04d.tar', 3)  # 0000: other samples, same size.
  remote = sources.make_source(f'wds:{gcs_path}/shards/{{0000..0001}}.tar', 'train')
  assert indexed == [f'{gcs_path}/shards/0000.tar'] and remote[0]['image'] == local[3]['image']
  # A shard's member table is read in large chunks (one ranged download here), not a request per
  # member; a shard cut short keeps its samples before the cut there too.
  downloads = []
  download = blob_lib.Blob.download_as_bytes
  monkeypatch.setattr(blob_lib.Blob, 'download_as_bytes',
                      lambda blob, *a, **k: downloads.append(blob.name) or download(blob, *a, **k))
  data = (tmp_path / '0000.tar').read_bytes()
  storage.path(f'{gcs_path}/cut/0.tar').write_bytes(data[:data.index(b'00000002.png') + 600])
  cut = sources.make_source(f'wds:{gcs_path}/cut/0.tar', 'train')
  assert downloads == [f'{gcs_path}/cut/0.tar'.split('/', 3)[3]]
  assert [cut[i]['image'] for i in range(len(cut))] == [local[i]['image'] for i in range(2)]
