"""Evaluation batches: every image exactly once, in order, for any numbers of reader processes,
hosts and images; padding rows masked, never dropped; a count check that fails loudly.

Grain's reader processes are real processes (a few seconds each to start on 2 cores): the
tests with 2 and 8 of them read small sets of tiny records.
"""

import dataclasses
import itertools

import jax
import ml_collections
import numpy as np
from PIL import Image
import pytest

from capi_jax.data import pipeline
from capi_jax.evaluators import backbone as backbone_lib
from capi_jax.evaluators import classif
from capi_jax.evaluators import datasets
from capi_jax.evaluators import extras
from capi_jax.evaluators import protocol
from capi_jax.evaluators import seg
from capi_jax.evaluators import seg_data
from capi_jax.evaluators import viz


@dataclasses.dataclass(frozen=True)
class _Position:
  """A record per position, as cheap as a record can be (readers are separate processes)."""

  def __call__(self, position: int) -> dict[str, np.ndarray]:
    return {'index': np.int64(position), 'valid': np.bool_(position >= 0),
            'value': np.float32(position)}


class _Images:
  """n tiny RGB images whose pixels encode their position; labels position % 3."""
  num_classes = 3

  def __init__(self, n: int):
    self.n = n

  def __len__(self) -> int:
    return self.n

  def __getitem__(self, i: int) -> dict:
    pixels = np.full((6, 6, 3), (i * 7) % 256, np.uint8)
    pixels[0, 0] = i % 256
    return {'image': pixels, 'label': i % 3, 'name': f'images[{i}]'}


def _global_rows(n: int, global_batch: int, hosts: int, workers: int, positions=None
                 ) -> tuple[np.ndarray, np.ndarray, list[int]]:
  """Every host's stream of `positions` (default all n) put back together: (index, valid) of the
  global rows in reading order, and the number of batches each host yielded."""
  positions = np.arange(n) if positions is None else positions
  per_host, counts = [], []
  for host in range(hosts):
    batches = list(datasets.batches('set', positions, global_batch, _Position(),
                                    num_workers=workers, process_index=host,
                                    process_count=hosts))
    counts.append(len(batches))
    per_host.append(batches)
  index, valid = [], []
  for parts in zip(*per_host):  # Global batch j: the hosts' columns side by side.
    index.append(np.concatenate([b['index'] for b in parts]))
    valid.append(np.concatenate([b['valid'] for b in parts]))
    for b in parts:
      np.testing.assert_array_equal(b['value'], b['index'].astype(np.float32))
  if not index:
    return np.zeros(0, np.int64), np.zeros(0, bool), counts
  return np.concatenate(index), np.concatenate(valid), counts


def _assert_exactly_once(n, global_batch, hosts, workers, positions=None):
  positions = np.arange(n) if positions is None else positions
  index, valid, counts = _global_rows(n, global_batch, hosts, workers, positions)
  batches = -(-len(positions) // global_batch)
  assert counts == [batches] * hosts  # Every host steps through the same global batches.
  assert len(index) == batches * global_batch
  np.testing.assert_array_equal(index[:len(positions)], positions)  # Once each, in order.
  assert (index[len(positions):] == -1).all()  # Then padding, masked.
  np.testing.assert_array_equal(valid, index >= 0)


@pytest.mark.parametrize('n', [0, 1, 7, 48, 50, 101])
@pytest.mark.parametrize('global_batch,hosts', [(4, 1), (16, 1), (8, 2), (12, 4)])
def test_every_position_once_in_order_without_reader_processes(n, global_batch, hosts):
  _assert_exactly_once(n, global_batch, hosts, workers=0)


def test_positions_of_a_subset_and_repeats_are_read_as_given():
  positions = np.array([5, 3, 3, 9, 0, 7, 1])  # Order and repeats kept (VOC trainaug repeats).
  _assert_exactly_once(10, 4, 2, 0, positions)


def test_every_position_once_in_order_with_2_reader_processes():
  _assert_exactly_once(37, 8, hosts=2, workers=2)  # 5 global batches: one blank one to even out.


def test_every_position_once_in_order_with_8_reader_processes():
  # The count: 8 workers used to read 0 of 2000 images at batch 500.
  _assert_exactly_once(2000, 500, hosts=1, workers=8)


def _spec(dataset: str, split: str) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(dataset=dataset, split=split))


def _images_stream(n, global_batch, workers, training=False, hosts=1, host=0):
  data = datasets.ClassifSet('images', _Images(n))
  return datasets.stream(data, np.arange(n), global_batch,
                         datasets.ClassifTransform(4, train=training), 4, seed=3,
                         num_workers=workers, training=training, process_index=host,
                         process_count=hosts)


@pytest.mark.parametrize('training', [False, True])
def test_images_and_random_crops_do_not_depend_on_the_reader_processes(training):
  """Rows, images and each row's random crop are the same with 0 and 2 reader processes."""
  # The count: 2 workers used to read 32 of 48 images at batch 16, out of order.
  n, batch = (48, 16) if not training else (22, 4)
  alone = list(itertools.islice(_images_stream(n, batch, 0, training), 3))
  workers = list(itertools.islice(_images_stream(n, batch, 2, training), 3))
  for a, b in zip(alone, workers, strict=True):
    assert a.keys() == b.keys()
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_padding_and_undecodable_images_are_masked(tmp_path):
  root = tmp_path / 'train' / 'a'
  root.mkdir(parents=True)
  for i in range(5):
    Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(root / f'{i}.png')
  (root / '2.png').write_bytes(b'not a png')  # Read, logged, and not used.
  data = datasets.classif_set('folder', _spec(f'folder:{tmp_path}', 'train'))
  batches = list(datasets.stream(data, np.arange(5), 4, datasets.ClassifTransform(4), 4, seed=0,
                                 num_workers=0))
  index = np.concatenate([b['index'] for b in batches])
  valid = np.concatenate([b['valid'] for b in batches])
  targets = np.concatenate([b['targets'] for b in batches])
  np.testing.assert_array_equal(index, [0, 1, 2, 3, 4, -1, -1, -1])
  np.testing.assert_array_equal(valid, [1, 1, 0, 1, 1, 0, 0, 0])
  assert (targets[~valid] == -1).all() and (targets[valid] == 0).all()


# --- the count check ------------------------------------------------------------------------


def _faulty_reader(monkeypatch, fault: str):
  """pipeline.batched whose output loses or repeats a batch (the old worker bugs)."""
  real = pipeline.batched

  def batched(*args, **kwargs):
    batches = list(real(*args, **kwargs))
    if fault == 'drop':
      batches = batches[:1] + batches[2:] + batches[-1:]  # Same length, one batch lost.
    else:
      batches = batches[:1] + batches[:1] + batches[2:]  # Same length, one batch twice.
    return batches

  monkeypatch.setattr(pipeline, 'batched', batched)


@pytest.mark.parametrize('fault', ['drop', 'repeat'])
def test_a_lost_or_repeated_batch_fails_loudly(monkeypatch, fault):
  _faulty_reader(monkeypatch, fault)
  with pytest.raises(datasets.CountError, match='images were read where the set gives 11'):
    list(datasets.batches('set', np.arange(11), 4, _Position(), num_workers=0))


# --- every protocol, end to end on a stand-in backbone ---------------------------------------


def _forward(params, images):
  """A stand-in backbone: 2x2 patches of 4x4 images, one tanh layer of 64."""
  b = images.shape[0]
  x = images.reshape(b, 2, 2, 2, 2, 3).transpose(0, 1, 3, 2, 4, 5).reshape(b, 4, 12)
  tokens = jax.numpy.tanh(x @ params['w'])
  return tokens.mean(1), tokens[:, :1], tokens.reshape(b, 2, 2, 64)


@pytest.fixture(scope='module')
def backbone() -> backbone_lib.Backbone:
  mesh = jax.make_mesh((1,), ('batch',), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=jax.devices()[:1])
  params = {'w': jax.random.normal(jax.random.key(0), (12, 64)) * 0.3}
  return backbone_lib.Backbone(_forward, params, mesh, 8)


def _scenes(n: int) -> seg_data.ArraySegSet:
  rng = np.random.default_rng(n)
  images = rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)
  masks = rng.integers(1, 4, (n, 8, 8), dtype=np.uint8)
  return seg_data.ArraySegSet(f'scenes{n}', images, masks)


@pytest.mark.parametrize('workers', [0, 2])
def test_segmentation_sees_every_image_once(backbone, workers):
  train, test = _scenes(21), _scenes(11)  # Not multiples of the batch of 8 (x 2 workers).
  settings = seg.Settings(ignore_labels=(255,), classifiers=('knn',), knn_neighbours=(1,),
                          knn_distances=('cosine',))
  outcome = seg.run(backbone, train, test, settings, 4, num_workers=workers)
  assert outcome.test_predictions['knn'].shape == (11 * 4, 4)  # 11 images of 2x2 patches.


def test_pictures_of_every_image(backbone, tmp_path):
  written = viz.run(backbone, _scenes(11), 4, tmp_path, num_images=11, num_workers=0)
  assert len(written) == 2 * 11  # Separate and joint PCA of each image.


def test_knn_and_classif_see_every_image_once(backbone, monkeypatch, tmp_path):
  sets = {'train': _Images(29), 'test': _Images(13)}
  monkeypatch.setattr(datasets, 'classif_set',
                      lambda name, spec, data_dir='': datasets.ClassifSet(name, sets[spec.split]))
  knn = extras.Knn(period=0, train=_spec('synthetic', 'train'),
                   test=_spec('synthetic', 'test'), max_train_images=0,
                   max_test_images=0, ks=(1,), temperature=0.07, pixels=True, resolution=4)
  results, _ = knn.run(backbone, protocol.Environment(), tmp_path, lambda _: None)
  # Each image's nearest pixel neighbour among the training images shows its own label.
  assert results['pixels/k1'] == 1.0

  counts = []
  real = classif._eval_counts  # pylint: disable=protected-access

  def eval_counts(*args, **kwargs):
    correct, counted = real(*args, **kwargs)
    counts.append(int(counted))
    return correct, counted

  monkeypatch.setattr(classif, '_eval_counts', eval_counts)
  settings = classif.Settings(representations=('cls',), learning_rates=(1e-3,),
                              weight_decays=(0.0,), n_iters=2, warmup_iters=1, batch_size=8,
                              ranks=1, val_proportion=0.25, resolution=4, log_every=1)
  classif.run(backbone, datasets.ClassifSet('train', sets['train']),
              [datasets.ClassifSet('test', sets['test'])], settings, num_workers=0,
              log=lambda _: None)
  held_out = len(classif.held_out_split(29, 0.25)[1])
  assert sum(counts) == held_out + 13  # Every held-out and test image scored once.
