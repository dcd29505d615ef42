"""Mask generators: exact counts, uniformity with roll, shapes of the masked / visible sets."""

import numpy as np
import pytest

from capi_jax.data import masking

GENERATORS = ('InverseBlock', 'Block', 'Uniform')


@pytest.mark.parametrize('name', GENERATORS)
@pytest.mark.parametrize('roll', (True, False))
@pytest.mark.parametrize('grid', ((16, 16), (14, 14), (8, 12), (12, 8), (1, 5), (3, 3)))
def test_exact_counts(name, roll, grid):
  generate = masking.make_mask_generator(name, grid=grid, roll=roll)
  rng = np.random.default_rng(0)
  n_tokens = grid[0] * grid[1]
  for n_masked in sorted({0, 1, n_tokens // 3, int(n_tokens * 0.65), n_tokens - 1, n_tokens}):
    for _ in range(5):
      mask = generate(n_masked, rng)
      assert mask.shape == grid and mask.dtype == bool
      assert mask.sum() == n_masked


def _chi_square_p(counts: np.ndarray) -> float:
  """p-value of a chi-square goodness-of-fit test against the uniform distribution."""
  from scipy import stats  # pylint: disable=g-import-not-at-top
  return float(stats.chisquare(counts.ravel()).pvalue)


@pytest.mark.parametrize('name', GENERATORS)
def test_roll_makes_every_position_equally_likely(name):
  grid, n_masked, n_masks = (8, 8), int(64 * 0.65), 4000
  generate = masking.make_mask_generator(name, grid=grid, roll=True)
  rng = np.random.default_rng(1)
  counts = sum(generate(n_masked, rng).astype(np.int64) for _ in range(n_masks))
  # Fixed seed, so deterministic; a uniform generator gives p ~ U(0, 1).
  assert _chi_square_p(counts) > 1e-3


@pytest.mark.parametrize('name', ('InverseBlock', 'Block'))
def test_block_generators_without_roll_are_not_uniform(name):
  grid, n_masked, n_masks = (8, 8), int(64 * 0.65), 4000
  generate = masking.make_mask_generator(name, grid=grid, roll=False)
  rng = np.random.default_rng(2)
  counts = sum(generate(n_masked, rng).astype(np.int64) for _ in range(n_masks))
  assert _chi_square_p(counts) < 1e-6


def _is_truncated_rectangle(cells: np.ndarray) -> bool:
  """Whether the True cells are the first k cells, row-major, of their bounding rectangle."""
  rows, cols = np.nonzero(cells)
  box = cells[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
  flat = box.ravel()
  k = int(flat.sum())
  return bool(flat[:k].all()) and box.shape[0] * box.shape[1] - k < box.shape[1]


def _is_wrapped_truncated_rectangle(cells: np.ndarray) -> bool:
  h, w = cells.shape
  return any(_is_truncated_rectangle(np.roll(cells, (dy, dx), axis=(0, 1)))
             for dy in range(h) for dx in range(w))


@pytest.mark.parametrize('roll', (True, False))
def test_inverse_block_visible_set_is_one_rectangle(roll):
  grid = (14, 14)
  generate = masking.make_mask_generator('InverseBlock', grid=grid, roll=roll)
  rng = np.random.default_rng(3)
  for _ in range(30):
    visible = ~generate(int(196 * 0.65), rng)
    if roll:
      assert _is_wrapped_truncated_rectangle(visible)
    else:
      assert _is_truncated_rectangle(visible)


def test_block_masked_set_is_one_rectangle():
  generate = masking.make_mask_generator('Block', grid=(10, 12), roll=True)
  rng = np.random.default_rng(4)
  for _ in range(20):
    assert _is_wrapped_truncated_rectangle(generate(40, rng))


def test_uniform_is_not_a_rectangle():
  generate = masking.make_mask_generator('Uniform', grid=(14, 14))
  masks = [generate(60, np.random.default_rng(i)) for i in range(5)]
  assert not all(_is_wrapped_truncated_rectangle(m) for m in masks)


@pytest.mark.parametrize('name', GENERATORS)
def test_sample_indices(name):
  grid, mask_ratio, subsampling = (16, 16), 0.65, 0.25
  generate = masking.make_mask_generator(name, grid=grid)
  n_masked, n_visible, n_predict = masking.mask_counts(256, mask_ratio, subsampling)
  assert (n_masked, n_visible, n_predict) == (166, 90, 41)
  rng = np.random.default_rng(5)
  for _ in range(10):
    visible, predict = masking.sample_indices(generate, grid, mask_ratio, subsampling, rng)
    assert visible.dtype == np.int32 and predict.dtype == np.int32
    assert visible.shape == (n_visible,) and predict.shape == (n_predict,)
    assert np.all(np.diff(visible) > 0)
    assert len(set(predict.tolist())) == n_predict
    assert not set(predict.tolist()) & set(visible.tolist())
    assert predict.min() >= 0 and predict.max() < 256


def test_predicted_positions_are_a_uniform_subset_of_the_masked():
  # With a fixed mask (the first n cells), each masked cell must be predicted equally often.
  grid = (4, 4)

  def first_cells(n_masked, rng):
    del rng
    return np.arange(16).reshape(grid) < n_masked

  rng = np.random.default_rng(6)
  counts = np.zeros(16, np.int64)
  for _ in range(3000):
    _, predict = masking.sample_indices(first_cells, grid, 0.5, 0.25, rng)
    counts[predict] += 1
  assert not counts[8:].any()
  assert _chi_square_p(counts[:8]) > 1e-3


def test_sampling_is_deterministic_given_the_rng():
  generate = masking.make_mask_generator('InverseBlock', grid=(14, 14))
  a = masking.sample_indices(generate, (14, 14), 0.65, 0.05, np.random.default_rng(7))
  b = masking.sample_indices(generate, (14, 14), 0.65, 0.05, np.random.default_rng(7))
  np.testing.assert_array_equal(a[0], b[0])
  np.testing.assert_array_equal(a[1], b[1])


def test_errors_name_the_problem():
  with pytest.raises(ValueError, match='Unknown masking generator'):
    masking.make_mask_generator('Blocks')
  with pytest.raises(ValueError, match='Cannot mask'):
    masking.make_mask_generator('Block', grid=(4, 4))(17, np.random.default_rng(0))
  with pytest.raises(ValueError, match='predicted tokens'):
    masking.mask_counts(16, 0.65, 0.05)
