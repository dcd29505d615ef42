"""WebDataset tar shards (`wds:`): patterns, records, damage, and the training pipeline's
guarantees on them (every image once per epoch, exact resume). Shards are made from
Fashion-MNIST; nothing is downloaded."""

import concurrent.futures
import io
import logging
import pathlib
import tarfile
import threading
import time
import zipfile

import grain
import numpy as np
from PIL import Image
import pytest

from capi_jax.base import storage
from capi_jax.data import mixture
from capi_jax.data import pipeline
from capi_jax.data import sources
from capi_jax.data import wds
from configs import tiny

N, PER_SHARD = 40, 10


def _fashion_mnist(n: int = N) -> tuple[np.ndarray, np.ndarray]:
  source = sources.make_source('fashion_mnist', 'test')
  return source.images[:n], source.labels[:n]


def _png(pixels: np.ndarray) -> bytes:
  out = io.BytesIO()
  Image.fromarray(pixels).save(out, format='PNG')
  return out.getvalue()


@pytest.fixture(scope='module')
def shards(tmp_path_factory):
  """DIR with 0000.tar .. 0003.tar: Fashion-MNIST test images 0-39 as PNG, 10 a shard."""
  root = tmp_path_factory.mktemp('wds')
  images, labels = _fashion_mnist()
  wds.write_shards([(_png(x), 'png', int(y)) for x, y in zip(images, labels)],
                   str(root / '%04d.tar'), PER_SHARD)
  return root


def test_brace_expansion():
  assert wds.expand_braces('d/{0000..0002}.tar') == ['d/0000.tar', 'd/0001.tar', 'd/0002.tar']
  assert wds.expand_braces('{a,b}-{8..10}') == ['a-8', 'a-9', 'a-10', 'b-8', 'b-9', 'b-10']
  assert wds.expand_braces('plain.tar') == ['plain.tar']
  with pytest.raises(wds.ShardError, match='backwards'):
    wds.expand_braces('{3..1}')


def test_records_labels_and_patterns(shards):
  images, labels = _fashion_mnist()
  source = sources.make_source(f'wds:{shards}/{{0000..0003}}.tar', 'train')
  assert len(source) == N and source.num_classes == 10
  for i in (0, 9, 10, 39):
    record = sources.decode(source[i])
    np.testing.assert_array_equal(np.asarray(record['image'])[..., 0], images[i])
    assert record['label'] == labels[i]
  assert source[10]['name'] == f'{shards}/0001.tar:00000010.png'
  # The pipeline's reader threads read at once: each gets its own record.
  with concurrent.futures.ThreadPoolExecutor(8) as pool:
    read = list(pool.map(lambda i: source[i % N]['image'], range(8 * N)))
  assert read == [source[i % N]['image'] for i in range(8 * N)]
  globbed = sources.make_source(f'wds:{shards}/*.tar', 'train')
  assert [globbed[i]['image'] for i in range(N)] == [source[i]['image'] for i in range(N)]
  two = sources.make_source(f'wds:{shards}/0002.tar::{shards}/{{0000,0001}}.tar', 'train')
  assert two[0]['image'] == source[20]['image'] and len(two) == 30
  with pytest.raises(wds.ShardsNotFoundError, match='1 of the 5 shards'):
    sources.make_source(f'wds:{shards}/{{0000..0004}}.tar', 'train')
  with pytest.raises(wds.ShardsNotFoundError, match='no {split}'):
    sources.make_source(f'wds:{shards}/{{0000..0003}}.tar', 'test')
  (shards / 'test-0000.tar').write_bytes((shards / '0003.tar').read_bytes())
  test = sources.make_source(f'wds:{shards}/{{split}}-0000.tar', 'test')
  assert len(test) == PER_SHARD and test[0]['image'] == source[30]['image']


def test_damage_is_skipped_and_counted(tmp_path, caplog):
  images, labels = _fashion_mnist(6)
  samples = [(_png(x), 'png', int(y)) for x, y in zip(images, labels)]
  samples[2] = (b'not an image', 'jpg', 0)
  path, = wds.write_shards(samples, str(tmp_path / 'bad-%d.tar'), 6)
  with tarfile.open(path, 'a') as archive:  # A sample with no image at all.
    info = tarfile.TarInfo('lonely.cls')
    info.size = 1
    archive.addfile(info, io.BytesIO(b'3'))
  source = sources.make_source(f'wds:{path}', 'train')
  assert len(source) == 6 and source.skipped_without_image == 1
  before = sources.skipped_records()
  assert sources.decode(source[2]) is None and sources.skipped_records() == before + 1
  # Cut in the middle of the fourth sample: the three before it are kept.
  data = (tmp_path / 'bad-0.tar').read_bytes()
  cut = tmp_path / 'cut.tar'
  cut.write_bytes(data[:data.index(b'00000003.png') + 700])
  assert len(sources.make_source(f'wds:{cut}', 'train')) == 3
  assert 'cut.tar is damaged after 00000002' in caplog.text
  caplog.clear()  # Said again when the index comes from the cache.
  assert len(sources.make_source(f'wds:{cut}', 'train')) == 3
  assert 'cut.tar is damaged after 00000002' in caplog.text


def _records(source) -> list[tuple[bytes, int, str]]:
  return [(r['image'], r['label'], r['name']) for r in (source[i] for i in range(len(source)))]


@pytest.fixture
def counted(monkeypatch):
  """The shards read for their index, in order (`wds.index_shard` calls)."""
  calls = []

  def index_shard(shard):
    calls.append(shard)
    return original(shard)

  original = wds.index_shard
  monkeypatch.setattr(wds, 'index_shard', index_shard)
  return calls


def test_the_index_cache_is_used_and_rebuilt_when_stale_or_damaged(tmp_path, monkeypatch,
                                                                     counted, caplog):
  images, labels = _fashion_mnist(6)
  samples = [(_png(x), 'png', int(y)) for x, y in zip(images, labels)]
  wds.write_shards(samples, str(tmp_path / '%d.tar'), 3)
  spec = f'wds:{tmp_path}/{{0..1}}.tar'
  monkeypatch.setattr(wds, '_PROGRESS_S', 0.0)  # Every shard a progress line.
  caplog.set_level(logging.INFO, logger=wds.logger.name)
  first = _records(sources.make_source(spec, 'train'))
  assert len(counted) == 2 and len(first) == 6
  assert f'Indexing {spec}: 2 of 2 shards (0 from the index cache)' in caplog.text
  assert sorted(p.name for p in (tmp_path / wds.INDEX_FOLDER).iterdir()) == ['0.tar.npz',
                                                                           '1.tar.npz']
  assert _records(sources.make_source(spec, 'train')) == first and len(counted) == 2
  # Shard 1 rewritten, its samples in another order: same size, other offsets and labels.
  size = (tmp_path / '1.tar').stat().st_size
  other, = wds.write_shards(samples[3:][::-1], str(tmp_path / 'other-%d.tar'), 3)
  (tmp_path / '1.tar').write_bytes(pathlib.Path(other).read_bytes())
  assert (tmp_path / '1.tar').stat().st_size == size
  changed = _records(sources.make_source(spec, 'train'))
  assert counted[2:] == [str(tmp_path / '1.tar')]
  assert [r[:2] for r in changed] == [r[:2] for r in first[:3] + first[3:][::-1]]
  index = tmp_path / wds.INDEX_FOLDER / '0.tar.npz'
  whole = index.read_bytes()
  flipped = bytearray(whole)
  flipped[zipfile.ZipFile(index).start_dir - 5] ^= 0xff  # In the last array's data.
  for damaged in (whole[:-9], bytes(flipped)):
    index.write_bytes(damaged)
    caplog.clear()
    assert _records(sources.make_source(spec, 'train')) == changed
    assert f'Index {index} of {tmp_path}/0.tar is damaged' in caplog.text
  assert len(counted) == 5
  assert _records(sources.make_source(spec, 'train')) == changed and len(counted) == 5


def test_the_index_goes_to_the_cache_folder_when_not_beside_the_shards(tmp_path, monkeypatch,
                                                                      counted, caplog):
  data, cache = tmp_path / 'data', tmp_path / 'cache'
  data.mkdir()
  wds.write_shards([(_png(_fashion_mnist(1)[0][0]), 'png', 1)], str(data / '%d.tar'), 1)
  (data / wds.INDEX_FOLDER).write_text('a file where the folder would be')
  monkeypatch.setenv(storage.CACHE_ENV, str(cache))
  for _ in range(2):
    assert len(sources.make_source(f'wds:{data}/0.tar', 'train')) == 1
  assert len(counted) == 1 and [p.name for p in (cache / 'wds_index').iterdir()] == [
      wds.index_files(str(data / '0.tar'))[1].name]
  monkeypatch.setenv(storage.CACHE_ENV, str(data / wds.INDEX_FOLDER))  # Not writable either.
  assert len(sources.make_source(f'wds:{data}/0.tar', 'train')) == 1 and len(counted) == 2
  assert 'the indexes of 1 shards could not be written' in caplog.text


def test_processes_index_their_share_then_read_the_others(shards, tmp_path, monkeypatch,
                                                         counted):
  """Two processes (threads here) sharing the cache: each shard is read once, by its process;
  the barrier holds process 0 back until process 1 (slow here) has written its share."""
  for i in range(4):
    (tmp_path / f'{i}.tar').write_bytes((shards / f'{i:04d}.tar').read_bytes())
  counting = wds.index_shard
  monkeypatch.setattr(wds, 'index_shard', lambda shard: (
      time.sleep(0.3 * shard.endswith(('1.tar', '3.tar'))), counting(shard))[1])
  barrier = threading.Barrier(2)
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    made = list(pool.map(lambda i: wds.WebDatasetSource(f'{tmp_path}/{{0..3}}.tar', 'train',
                                                        wds.IndexShare(i, 2, barrier.wait)),
                         range(2)))
  assert sorted(counted) == [f'{tmp_path}/{i}.tar' for i in range(4)]
  plain = sources.make_source(f'wds:{shards}/{{0000..0003}}.tar', 'train')
  assert _records(made[0]) == _records(made[1])
  assert [r[:2] for r in _records(made[0])] == [r[:2] for r in _records(plain)]
  # The training pipeline makes the source with its host's share (no barrier in one process).
  for i in range(4):
    (tmp_path / 'host' / f'{i:04d}.tar').parent.mkdir(exist_ok=True)
    (tmp_path / 'host' / f'{i:04d}.tar').write_bytes((shards / f'{i:04d}.tar').read_bytes())
  counted.clear()
  pipeline.train_dataset(_loader_config(tmp_path / 'host'), _Keep(), seed=0, process_index=1,
                         process_count=2)
  shard = lambda i: f'{tmp_path}/host/{i:04d}.tar'
  assert sorted(counted[:2]) == [shard(1), shard(3)] and sorted(counted[2:]) == [shard(0),
                                                                                shard(2)]


class _Keep(grain.transforms.RandomMap):
  """The record's position and first pixel row: what a method would make into views."""

  def random_map(self, element, rng):
    del rng
    return {'index': element['index'], 'row': np.asarray(element['image'])[0, :, 0]}


def _loader_config(shards):
  config = tiny.get_config()
  config.data.dataset = f'wds:{shards}/{{0000..0003}}.tar'
  config.data.num_workers = 0
  config.train.global_batch_size = 8
  return config


def test_each_image_once_per_epoch_and_an_exact_resume(shards, caplog):
  config = _loader_config(shards)
  with caplog.at_level('INFO', logger=pipeline.__name__):
    iterator = pipeline.create_train_loader(config, _Keep(), seed=0)
  # The run's log states the source's image count and the epoch in steps.
  assert (f'({N} images in {N // PER_SHARD} shards): an epoch is 5.0 steps of 8 images'
          in caplog.text)
  epoch = [next(iterator) for _ in range(N // 8)]
  assert sorted(np.concatenate([b['index'] for b in epoch])) == list(range(N))
  images, _ = _fashion_mnist()  # Each record's pixels are its own (reader threads read at once).
  for batch in epoch:
    np.testing.assert_array_equal(batch['row'], images[batch['index'], 0])
  state = iterator.get_state()
  expected = [next(iterator) for _ in range(3)]
  resumed = pipeline.create_train_loader(config, _Keep(), seed=0)
  resumed.set_state(state)
  for want in expected:
    got = next(resumed)
    np.testing.assert_array_equal(got['index'], want['index'])
    np.testing.assert_array_equal(got['row'], want['row'])


def test_weighted_mixture_of_sources(shards):
  """mix: 3 parts shards to 1 part Fashion-MNIST: 40 + 60000 records per epoch."""
  spec = f'mix:0.75*wds:{shards}/{{0000..0003}}.tar|0.25*fashion_mnist'
  mixed = sources.make_source(spec, 'train')
  assert len(mixed) == N + 60_000 and mixed.class_names == []  # wds has numbered classes.
  names = [mixed[i]['name'] for i in range(len(mixed))]
  from_shards = [n for n in names if n.startswith(str(shards))]
  assert len(from_shards) == round(0.75 * len(mixed))
  assert set(from_shards) == {f'{shards}/{k:04d}.tar:{i:08d}.png' for k in range(4)
                              for i in range(k * 10, k * 10 + 10)}  # Each repeated evenly.
  assert max(from_shards.count(n) for n in set(from_shards)) - min(
      from_shards.count(n) for n in set(from_shards)) <= 1
  window = names[:100]  # Interleaved, not one component after the other.
  assert 60 <= sum(n.startswith(str(shards)) for n in window) <= 90
  assert [mixed[i]['name'] for i in range(50)] == names[:50]  # Deterministic.
  with pytest.raises(mixture.MixtureError, match='WEIGHT\\*DATASET'):
    sources.make_source(f'mix:wds:{shards}/0000.tar|0.5*fashion_mnist', 'train')
