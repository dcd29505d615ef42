"""WebDataset tar shards (`wds:`): patterns, records, damage, and the training pipeline's
guarantees on them (every image once per epoch, exact resume). Shards are made from
Fashion-MNIST; nothing is downloaded."""

import concurrent.futures
import io
import tarfile

import grain
import numpy as np
from PIL import Image
import pytest

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
  assert f'({N} images in {N // PER_SHARD} shards): an epoch is 5.0 steps of 8 images' in caplog.text
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
