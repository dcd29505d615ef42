"""CAPI's masks, predicted subsets, crop boxes and flips against the official code, draw for draw.

tests/fixtures/capi_data_reference/ holds what the release's `data.py` (mask generators,
`collate_data_and_cast`) and torchvision 0.20.1's RandomResizedCrop / RandomHorizontalFlip
returned, with every random draw they made (see its README.md). `RecordedDraws` hands those draws
to capi_jax's functions in place of a `np.random.Generator`, and checks that each draw is asked
for with the official range, so a geometry that drifts fails at the first draw where it does.
"""

import json
import pathlib

import numpy as np
from PIL import Image
import pytest

from capi_jax.data import masking
from capi_jax.data import transforms
from capi_jax.methods.capi import transform as capi_transform
from configs import tiny

FIXTURE = (pathlib.Path(__file__).parent / 'fixtures' / 'capi_data_reference' /
           'capi_data_small.npz')


class RecordedDraws:
  """The `np.random.Generator` methods capi_jax's data functions call, answered from a record.

  Args:
    random: U in [0, 1) for each `random()` (the release's `random.uniform(a, b)` is a + (b - a) U,
      as capi_jax computes it).
    integers: rows (low, high, value) for each `integers(low, high)` (half-open, as recorded).
    uniform: rows (low, high, value) for each `uniform(low, high)`; torchvision draws float32
      between float32 bounds, so the bounds are compared to float32 precision.
    permutations: the permutation p the release's `np.random.shuffle` applied to k Trues and
      n - k Falses: position i is masked iff p[i] < k, so `permutation(n)` answers argsort(p).
    rand_rows: the release's `torch.rand` row per image: it predicts the masked positions in the
      order of argsort(row), so `choice(masked, size, replace=False)` answers those.
  """

  def __init__(self, random=(), integers=(), uniform=(), permutations=(), rand_rows=()):
    self._queues = {name: list(values)[::-1] for name, values in dict(
        random=random, integers=integers, uniform=uniform, permutations=permutations,
        rand_rows=rand_rows).items()}

  def _next(self, name):
    assert self._queues[name], f'more {name} draws than the official run made'
    return self._queues[name].pop()

  def random(self) -> float:
    return float(self._next('random'))

  def integers(self, low, high) -> int:
    want_low, want_high, value = self._next('integers')
    assert (low, high) == (want_low, want_high), ('integers', (low, high), 'official',
                                                  (want_low, want_high))
    return int(value)

  def uniform(self, low, high) -> float:
    want_low, want_high, value = self._next('uniform')
    np.testing.assert_allclose([low, high], [want_low, want_high], rtol=1e-7, atol=1e-7)
    return float(value)

  def permutation(self, n) -> np.ndarray:
    permutation = self._next('permutations')
    assert len(permutation) == n
    return np.argsort(permutation)

  def choice(self, a, size, replace=True) -> np.ndarray:
    row = self._next('rand_rows')
    assert not replace and len(row) == len(a)
    return np.asarray(a)[np.argsort(row, kind='stable')[:size]]

  def assert_used_up(self) -> None:
    left = {name: len(queue) for name, queue in self._queues.items() if queue}
    assert not left, f'official draws left unused: {left}'


@pytest.fixture(scope='module')
def official():
  with np.load(FIXTURE) as z:
    arrays = {k: z[k] for k in z.files}
  return arrays, json.loads(str(arrays.pop('meta_json')))


def test_masks_are_the_official_generators_draw_for_draw(official):
  arrays, meta = official
  assert len(meta['masks']) >= 10
  for j, case in enumerate(meta['masks']):
    grid, n_masked = tuple(case['grid']), case['n_masked']
    generate = masking.make_mask_generator(case['generator'], grid, case['roll'])
    rng = RecordedDraws(arrays[f'masks/{j}/random'], arrays[f'masks/{j}/integers'],
                        permutations=arrays.get(f'masks/{j}/permutation', ()))
    for d, want in enumerate(arrays[f'masks/{j}/mask']):
      np.testing.assert_array_equal(generate(n_masked, rng), want, err_msg=f'{case}, draw {d}')
    rng.assert_used_up()


def test_visible_and_predicted_indices_are_the_official_collate(official):
  """The release's `collate_data_and_cast` (flat indices into the batch's tokens) vs
  `masking.sample_indices` per image, offset by the image's first token."""
  arrays, meta = official
  for j, case in enumerate(meta['collate']):
    grid = tuple(case['grid'])
    n_tokens, batch = grid[0] * grid[1], case['batch']
    generate = masking.make_mask_generator('InverseBlock', grid, case['roll'])
    rng = RecordedDraws(arrays[f'collate/{j}/random'], arrays[f'collate/{j}/integers'],
                        rand_rows=arrays[f'collate/{j}/rand'].reshape(-1, arrays[
                            f'collate/{j}/rand'].shape[-1]))
    for b in range(case['batches']):
      per_image = [masking.sample_indices(generate, grid, case['mask_ratio'],
                                          case['prediction_subsampling'], rng)
                   for _ in range(batch)]
      offsets = np.arange(batch) * n_tokens
      np.testing.assert_array_equal(
          np.concatenate([v + o for (v, _), o in zip(per_image, offsets)]),
          arrays[f'collate/{j}/visible_indices'][b], err_msg=f'{case}, batch {b}')
      np.testing.assert_array_equal(
          np.concatenate([p + o for (_, p), o in zip(per_image, offsets)]),
          arrays[f'collate/{j}/predict_indices'][b], err_msg=f'{case}, batch {b}')
    rng.assert_used_up()


def test_crop_boxes_are_torchvisions_draw_for_draw(official):
  """RandomResizedCrop.get_params (torchvision 0.20.1, the release's pin): (top, left, h, w)."""
  arrays, meta = official
  for j, case in enumerate(meta['crops']):
    rng = RecordedDraws(integers=arrays[f'crops/{j}/integers'],
                        uniform=arrays[f'crops/{j}/uniform'])
    for d, want in enumerate(arrays[f'crops/{j}/boxes']):
      got = transforms.sample_crop_box(case['height'], case['width'], tuple(case['scale']),
                                       tuple(case['ratio']), rng)
      assert got == tuple(want), (case, d)
    rng.assert_used_up()


def test_flips_are_torchvisions(official):
  arrays, _ = official
  image = Image.fromarray(np.array([[[0] * 3, [255] * 3]], np.uint8))
  rng = RecordedDraws(arrays['flip/rand'])
  flipped = [np.asarray(transforms.random_flip(image, rng))[0, 0, 0] == 255
             for _ in arrays['flip/flipped']]
  np.testing.assert_array_equal(flipped, arrays['flip/flipped'])
  rng.assert_used_up()


def test_capi_transform_is_the_official_training_path(official):
  """train_capi.py's per-image transform (crop, flip, ToTensor, ImageNet normalisation) and
  collate vs configs/tiny.py's CapiTransform at the fixture's size, then `normalize`: the
  images to float32 rounding (one uint8 level is 0.017), the index lists exactly."""
  arrays, meta = official
  cfg = meta['pipeline']
  config = tiny.get_config()
  config.data.image_size = cfg['image_size']
  assert config.capi.model.patch_size == cfg['patch_size']
  data = config.capi.data
  assert (tuple(data.crop_scale), data.mask_ratio, data.prediction_subsampling) == (
      tuple(cfg['crop_scale']), cfg['mask_ratio'], cfg['prediction_subsampling'])
  assert (data.do_hflip, data.masking_generator, data.masking_roll) == (True, 'InverseBlock', True)
  transform = capi_transform.from_config(config)
  n_tokens = cfg['grid'][0] * cfg['grid'][1]
  uniform, integers = list(arrays['pipeline/uniform']), list(arrays['pipeline/integers'])
  k = 0  # Image index over the batches (flip and mask draws are one per image, four integers).
  for b in range(cfg['batches']):
    images, visible, predict = [], [], []
    for i, (n_uniform, n_integers) in enumerate(arrays[f'pipeline/{b}/crop_draws']):
      rng = RecordedDraws(
          random=[arrays['pipeline/flip_rand'][k], arrays['pipeline/mask_random'][k]],
          integers=integers[:n_integers] + list(arrays['pipeline/mask_integers'][4 * k:4 * k + 4]),
          uniform=uniform[:n_uniform], rand_rows=[arrays[f'pipeline/{b}/rand'][i]])
      del uniform[:n_uniform], integers[:n_integers]
      example = transform.random_map(
          {'image': Image.fromarray(arrays[f'pipeline/{b}/input/{i}'])}, rng)
      rng.assert_used_up()
      images.append(transforms.normalize(example['images']))
      visible.append(example['visible_indices'] + i * n_tokens)
      predict.append(example['predict_indices'] + i * n_tokens)
      k += 1
    np.testing.assert_allclose(np.stack(images), arrays[f'pipeline/{b}/images'], rtol=0,
                               atol=1e-5, err_msg=f'batch {b}')
    np.testing.assert_array_equal(np.concatenate(visible), arrays[f'pipeline/{b}/visible_indices'])
    np.testing.assert_array_equal(np.concatenate(predict), arrays[f'pipeline/{b}/predict_indices'])
  assert not uniform and not integers
