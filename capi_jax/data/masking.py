"""Mask generators and token-index sampling, run on the host inside the input pipeline.

Semantics follow the official CAPI release (see `docs/reference/capi_algorithm.md`, Masking):
- `Block`: one rectangle of (at least) `n` cells with a log-uniform aspect ratio in
  [min_aspect, max_aspect], clipped so that it fits the grid; exactly the first `n` cells of the
  rectangle in row-major order are kept, so the count is exact.
- `InverseBlock` (the default): a `Block` of `n_tokens - n_masked` cells, inverted: the visible
  set is one rectangle (possibly missing the tail of its last row), everything else is masked.
- `Uniform`: `n_masked` positions drawn uniformly without replacement.
With `roll`, a block mask is shifted by a uniform random (dy, dx) with wrap-around, so every grid
position is equally likely to be masked.

Every generator is `generate(n_masked, rng) -> bool (h, w)` with exactly `n_masked` True cells,
random only through the given `np.random.Generator`, so a Grain `random_map` makes it
deterministic per record.
"""

import dataclasses
import math

import numpy as np


def _check_count(n: int, grid: tuple[int, int]) -> None:
  if not 0 <= n <= grid[0] * grid[1]:
    raise ValueError(f'Cannot mask {n} cells of a {grid[0]}x{grid[1]} grid.')


def _block(n: int, grid: tuple[int, int], roll: bool, log_aspect: tuple[float, float],
           rng: np.random.Generator) -> np.ndarray:
  """Exactly `n` True cells forming one (wrapped, if `roll`) rectangle; bool (h, w)."""
  height, width = grid
  mask = np.zeros(height * width, dtype=bool)
  if n == 0:
    return mask.reshape(grid)
  # Clip the aspect ratio so that ceil(sqrt(n*ar)) <= height and ceil(sqrt(n/ar)) <= width.
  # On very elongated grids the interval can be empty (min > max); like Python's
  # random.uniform in the reference, we then sample between the two bounds anyway.
  min_lar = max(log_aspect[0], math.log(n / width**2))
  max_lar = min(log_aspect[1], math.log(height**2 / (n + 1e-5)))
  aspect_ratio = math.exp(min_lar + (max_lar - min_lar) * rng.random())
  # ceil makes the rectangle hold at least n cells whenever it fits the grid (the reference
  # case). Where clipping to the grid cuts it below n cells (the reference would crash), grow
  # the other side so that the count stays exact.
  h = min(int(math.ceil(math.sqrt(n * aspect_ratio))), height)
  w = min(max(int(math.ceil(math.sqrt(n / aspect_ratio))), -(-n // h)), width)
  h = min(max(h, -(-n // w)), height)
  top = int(rng.integers(0, height - h + 1))
  left = int(rng.integers(0, width - w + 1))
  rows, cols = np.meshgrid(np.arange(top, top + h), np.arange(left, left + w), indexing='ij')
  mask[(rows * width + cols).ravel()[:n]] = True
  mask = mask.reshape(grid)
  if roll:
    shift = (int(rng.integers(0, height)), int(rng.integers(0, width)))
    mask = np.roll(mask, shift, axis=(0, 1))
  return mask


GENERATORS = ('InverseBlock', 'Block', 'Uniform')


@dataclasses.dataclass(frozen=True)
class MaskGenerator:
  """`generate(n_masked, rng) -> bool (h, w)` with exactly `n_masked` True cells.

  A plain dataclass, so a transform holding one pickles into Grain's worker processes.
  """
  name: str
  grid: tuple[int, int]
  roll: bool
  log_aspect: tuple[float, float]

  def __call__(self, n_masked: int, rng: np.random.Generator) -> np.ndarray:
    _check_count(n_masked, self.grid)
    if self.name == 'Uniform':
      mask = np.zeros(self.grid[0] * self.grid[1], dtype=bool)
      mask[rng.permutation(mask.size)[:n_masked]] = True
      return mask.reshape(self.grid)
    if self.name == 'Block':
      return _block(n_masked, self.grid, self.roll, self.log_aspect, rng)
    n_tokens = self.grid[0] * self.grid[1]
    return ~_block(n_tokens - n_masked, self.grid, self.roll, self.log_aspect, rng)


def make_mask_generator(name: str = 'InverseBlock', grid: tuple[int, int] = (16, 16),
                        roll: bool = True, min_aspect: float = 0.5,
                        max_aspect: float | None = None) -> MaskGenerator:
  """The generator `name` on `grid`.

  Args:
    name: 'InverseBlock' (reference default), 'Block' or 'Uniform'.
    grid: (h, w) token grid, i.e. (image_size / patch_size,) * 2.
    roll: shift block masks by a random wrap-around offset (no effect on 'Uniform').
    min_aspect: smallest rectangle aspect ratio (height / width) for the block generators.
    max_aspect: largest aspect ratio; None = 1 / min_aspect.
  """
  if name not in GENERATORS:
    raise ValueError(f'Unknown masking generator {name!r}; choose one of {sorted(GENERATORS)} '
                     '(config.data.masking_generator).')
  log_aspect = (math.log(min_aspect), math.log(max_aspect or 1 / min_aspect))
  return MaskGenerator(name, (int(grid[0]), int(grid[1])), roll, log_aspect)


def mask_counts(n_tokens: int, mask_ratio: float,
                prediction_subsampling: float) -> tuple[int, int, int]:
  """(n_masked, n_visible, n_predict), the same for every image so that shapes are static."""
  n_masked = int(n_tokens * mask_ratio)
  n_predict = int(n_masked * prediction_subsampling)
  if n_predict == 0 or n_masked == n_tokens:
    raise ValueError(
        f'With {n_tokens} tokens, mask_ratio={mask_ratio} and prediction_subsampling='
        f'{prediction_subsampling} there are {n_tokens - n_masked} visible and {n_predict} '
        'predicted tokens per image; both must be >= 1. Raise the image size, lower the patch '
        'size, or change config.data.mask_ratio / prediction_subsampling.')
  return n_masked, n_tokens - n_masked, n_predict


def sample_indices(mask_generator: MaskGenerator, grid: tuple[int, int], mask_ratio: float,
                   prediction_subsampling: float,
                   rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  """Samples one image's visible and predicted token indices (row-major over `grid`).

  Returns:
    visible_indices: (n_visible,) int32, ascending (the encoder keeps tokens in order).
    predict_indices: (n_predict,) int32, a uniform random subset of the masked positions,
      in the order sampled.
  """
  n_masked, _, n_predict = mask_counts(grid[0] * grid[1], mask_ratio, prediction_subsampling)
  mask = mask_generator(n_masked, rng).ravel()
  visible = np.flatnonzero(~mask).astype(np.int32)
  predict = rng.choice(np.flatnonzero(mask), size=n_predict, replace=False).astype(np.int32)
  return visible, predict
