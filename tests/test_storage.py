"""capi_jax.base.storage on local disk and on gs:// (fake-gcs-server, loopback-only namespace).

Each test taking `root` runs twice: on a local folder and on a fresh gs:// folder (marked `gcs`:
the gs:// variant runs in the namespace, see gcs_netns.py).
"""

import concurrent.futures as cf
import json
import os
import subprocess
import sys

import pytest

from capi_jax.base import storage

BACKENDS = [pytest.param('local', id='local'),
            pytest.param('gcs', id='gcs', marks=pytest.mark.gcs)]


@pytest.fixture(params=BACKENDS)
def root(request, tmp_path):
  """A fresh empty folder: local (tmp_path) or gs://bucket/<test>-<random>."""
  if request.param == 'local':
    return storage.path(tmp_path)
  return request.getfixturevalue('gcs_path')


def _write(p, text: str) -> None:
  storage.makedirs(p.parent)
  p.write_text(text)


def test_paths_stay_where_they_are(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  gcs = storage.path('gs://bucket/run')
  assert os.fspath(gcs) == 'gs://bucket/run' and storage.is_gcs(gcs)
  assert os.fspath(gcs / 'checkpoints' / '4') == 'gs://bucket/run/checkpoints/4'
  assert os.fspath((gcs / 'checkpoints').parent) == 'gs://bucket/run'
  assert storage.path(gcs) == gcs
  assert storage.path('run') == tmp_path / 'run'  # Local: absolute, as pathlib's absolute().
  with pytest.raises(storage.UnsupportedPathError, match='local paths and gs:// only'):
    storage.path('s3://bucket/run')
  assert storage.free_bytes(gcs) is None and storage.free_bytes(tmp_path) > 0
  storage.makedirs(gcs / 'x')  # Nothing to create on GCS, and nothing created here.
  assert not list(tmp_path.iterdir())


def test_write_atomic_replaces_the_whole_content(root):
  p = root / 'results.json'
  storage.makedirs(root)
  storage.write_atomic(p, '{"a": 1}')
  storage.write_atomic(p, b'{"a": 2}')
  assert p.read_text() == '{"a": 2}'
  assert list(storage.list_files(root)) == ['results.json']  # Nothing left aside.


def test_create_exclusive_has_exactly_one_winner_among_racers(root):
  # On gs:// a real test: fake-gcs-server enforces ifGenerationMatch=0 on the multipart uploads
  # that create_exclusive makes (not on resumable ones).
  storage.makedirs(root)
  lock = root / 'lock.json'
  with cf.ThreadPoolExecutor(8) as ex:
    wins = list(ex.map(lambda i: storage.create_exclusive(lock, f'{{"who": {i}}}'), range(8)))
  assert sum(wins) == 1
  assert json.loads(lock.read_text())['who'] == wins.index(True)
  assert list(storage.list_files(root)) == ['lock.json']
  assert not storage.create_exclusive(lock, '{"who": 99}')
  if storage.is_gcs(root):  # A retried request (its first attempt succeeded) finds its content.
    assert storage.create_exclusive(lock, f'{{"who": {wins.index(True)}}}')


@pytest.mark.gcs
def test_replace_if_version_is_a_compare_and_swap(gcs_path):
  p = gcs_path / 'lock.json'
  assert storage.read_versioned(p) is None
  assert storage.create_exclusive(p, 'v1')
  first = storage.read_versioned(p)
  assert first.data == b'v1' and first.updated > 0
  v2 = storage.replace_if_version(p, 'v2', first.version)  # A heartbeat of the holder.
  assert v2 is not None and v2 != first.version
  assert storage.replace_if_version(p, 'stale', first.version) is None
  # Eight hosts judged v2 stale at once: exactly one takes it over.
  with cf.ThreadPoolExecutor(8) as ex:
    taken = list(ex.map(lambda i: storage.replace_if_version(p, f'taker {i}', v2), range(8)))
  assert sum(t is not None for t in taken) == 1
  winner = [t is not None for t in taken].index(True)
  assert storage.read_versioned(p).data == f'taker {winner}'.encode()
  assert storage.replace_if_version(p, 'v3', v2) is None  # The old holder has lost it.
  # A retried replace whose first attempt succeeded: its content is there, it counts as done.
  assert storage.replace_if_version(p, f'taker {winner}', v2) == taken[winner]


@pytest.mark.gcs
def test_delete_if_version_deletes_the_current_version(gcs_path):
  # The stale-version case is not tested: fake-gcs-server 1.54 ignores this precondition.
  p = gcs_path / 'lock.json'
  storage.create_exclusive(p, 'x')
  assert storage.delete_if_version(p, storage.read_versioned(p).version)
  assert not p.exists()
  assert storage.delete_if_version(p, 1)  # Gone already: nothing to do.


def test_appends_keep_everything(root, monkeypatch):
  monkeypatch.setattr(storage, '_MAX_COMPONENTS', 3)  # GCS: rewritten whole every 3 appends.
  storage.makedirs(root)
  p = root / 'metrics.jsonl'
  log = storage.AppendOnlyFile(p)
  for i in range(5):
    log.append(f'{i}\n')
  log.close()
  log = storage.AppendOnlyFile(p)  # A resumed writer appends to what is there.
  log.append(b'5\n')
  log.append(b'')
  log.close()
  assert p.read_text() == ''.join(f'{i}\n' for i in range(6))
  assert list(storage.list_files(root)) == ['metrics.jsonl']  # No piece left behind.
  # Not tested: a second writer's compose is refused on GCS by the generation precondition;
  # fake-gcs-server 1.54 does not enforce preconditions on compose.


def test_list_files_is_recursive_relative_with_sizes(root):
  for rel in ('a.txt', 'd/b.txt', 'd/e/c.txt'):
    _write(root / rel, rel)
  listed = storage.list_files(root)
  assert list(listed) == ['a.txt', 'd/b.txt', 'd/e/c.txt']
  assert [f.size for f in listed.values()] == [5, 7, 9]
  assert list(storage.list_files(root / 'd')) == ['b.txt', 'e/c.txt']
  assert storage.list_files(root / 'nothing') == {}
  if storage.is_gcs(root):  # The server's CRC32C, as computed from a local copy.
    with storage.local_copy(root / 'd' / 'b.txt') as local:
      assert listed['d/b.txt'].crc32c == storage.crc32c(local) == storage.crc32c(root / 'd/b.txt')


def test_upload_tree_puts_last_files_last(root, tmp_path):
  src = tmp_path / 'made_locally'
  (src / 'plugins' / 'profile').mkdir(parents=True)
  (src / 'plugins' / 'profile' / 'host.xplane.pb').write_bytes(b'\x00' * 10)
  (src / 'results.json').write_text('{}')
  copied = []
  original = storage.copy_file
  storage.copy_file = lambda a, b: (copied.append(os.fspath(b)), original(a, b))
  try:
    assert storage.upload_tree(src, root / 'up', last=('results.json',)) == 2
  finally:
    storage.copy_file = original
  assert copied[-1].endswith('up/results.json')
  assert list(storage.list_files(root / 'up')) == ['plugins/profile/host.xplane.pb',
                                                   'results.json']


def test_staged_dir_uploads_only_what_a_finished_block_wrote(root):
  with storage.staged_dir(root / 'eval' / '4') as local:
    assert not storage.is_gcs(local)
    (local / 'results.json').write_text('{"ok": 1}')
  assert (root / 'eval' / '4' / 'results.json').read_text() == '{"ok": 1}'
  with pytest.raises(RuntimeError), storage.staged_dir(root / 'eval' / '8') as local:
    (local / 'results.json').write_text('{}')
    raise RuntimeError('the evaluation failed')
  if storage.is_gcs(root):  # Locally the block wrote in place.
    assert not (root / 'eval' / '8').exists()
  with storage.staged_file(root / 'w.npz') as local:
    local.write_bytes(b'npz')
  with storage.local_copy(root / 'w.npz') as local:
    assert not storage.is_gcs(local) and local.read_bytes() == b'npz'


def test_move_tree_and_remove_tree(root):
  for rel in ('12/state/d/0', '12/commit_success.txt'):
    _write(root / 'checkpoints' / rel, rel)
  storage.move_tree(root / 'checkpoints' / '12', root / 'checkpoints_damaged' / '12',
                    first=('commit_success.txt',))
  assert not (root / 'checkpoints' / '12').exists()
  assert list(storage.list_files(root / 'checkpoints_damaged')) == [
      '12/commit_success.txt', '12/state/d/0']
  storage.remove_tree(root / 'checkpoints_damaged')
  assert storage.list_files(root) == {}
  storage.remove_tree(root / 'missing')


@pytest.mark.gcs
def test_other_processes_writes_are_seen_despite_an_earlier_listing(gcs_path):
  # Without storage's `use_listings_cache=False` the last three checks fail (b.txt "missing",
  # a.txt read cut to its old 2 bytes).
  (gcs_path / 'a.txt').write_text('v1')
  assert [p.name for p in gcs_path.iterdir()] == ['a.txt']  # A listing, formerly cached.
  other = (f"from etils import epath; p = epath.Path('{gcs_path}'); "
           "(p / 'b.txt').write_text('new'); (p / 'a.txt').write_text('longer v2')")
  subprocess.run([sys.executable, '-c', other], check=True, timeout=60)
  assert (gcs_path / 'b.txt').exists()
  assert (gcs_path / 'b.txt').read_text() == 'new'
  assert (gcs_path / 'a.txt').read_text() == 'longer v2'
