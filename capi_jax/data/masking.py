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

CAE v2 (BEiT's generator, `docs/reference/caev2_algorithm.md`, Data and masks):
- `BeitBlock`: rectangles are added until exactly `n_masked` cells are masked. With m = min(still
  needed, max per block), up to 10 tries of area ~ U(min_block_patches, m) and a log-uniform aspect
  ratio; h = round(sqrt(area * ratio)), w = round(sqrt(area / ratio)) must be strictly smaller than
  the grid; a uniformly placed rectangle is kept if it masks between 1 and m new cells. The masks
  favour the centre of the grid.

Every generator is `generate(n_masked, rng) -> bool (h, w)` with exactly `n_masked` True cells,
random only through the given `np.random.Generator`, so a Grain `random_map` makes it
deterministic per record; generators pickle (module-level functions bound with
`functools.partial`).
"""

from collections.abc import Callable
import functools
import math

import numpy as np

MaskGenerator = Callable[[int, np.random.Generator], np.ndarray]

GENERATORS = ('InverseBlock', 'Block', 'Uniform', 'BeitBlock')
_BEIT_MAX_IDLE_ROUNDS = 100


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
  # The first n cells of the rectangle in row-major order; with `roll`, each cell (r, c) moves to
  # ((r + dy) % height, (c + dx) % width), as np.roll would move it (index arithmetic is ~3x
  # cheaper per image, and this runs for every training image).
  cells = np.arange(n)
  rows, cols = top + cells // w, left + cells % w
  if roll:
    rows = (rows + int(rng.integers(0, height))) % height
    cols = (cols + int(rng.integers(0, width))) % width
  mask[rows * width + cols] = True
  return mask.reshape(grid)


def _uniform(n_masked: int, rng: np.random.Generator, *, grid: tuple[int, int]) -> np.ndarray:
  _check_count(n_masked, grid)
  mask = np.zeros(grid[0] * grid[1], dtype=bool)
  mask[rng.permutation(mask.size)[:n_masked]] = True
  return mask.reshape(grid)


def _one_block(n_masked: int, rng: np.random.Generator, *, grid: tuple[int, int], roll: bool,
               log_aspect: tuple[float, float]) -> np.ndarray:
  _check_count(n_masked, grid)
  return _block(n_masked, grid, roll, log_aspect, rng)


def _inverse_block(n_masked: int, rng: np.random.Generator, *, grid: tuple[int, int], roll: bool,
                   log_aspect: tuple[float, float]) -> np.ndarray:
  _check_count(n_masked, grid)
  return ~_block(grid[0] * grid[1] - n_masked, grid, roll, log_aspect, rng)


def _add_beit_block(mask: np.ndarray, limit: int, min_patches: int,
                    log_aspect: tuple[float, float], rng: np.random.Generator) -> int:
  """Masks one more rectangle of 1 .. `limit` new cells in place (<= 10 tries); the count."""
  height, width = mask.shape
  for _ in range(10):
    # a + (b - a) * U, like Python's random.uniform, also when b < a (limit < min_patches).
    area = min_patches + (limit - min_patches) * rng.random()
    aspect = math.exp(log_aspect[0] + (log_aspect[1] - log_aspect[0]) * rng.random())
    # Python's round (half to even), as the reference.
    h = int(round(math.sqrt(area * aspect)))
    w = int(round(math.sqrt(area / aspect)))
    if h < height and w < width:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      window = mask[top:top + h, left:left + w]
      new = h * w - int(window.sum())
      if 0 < new <= limit:
        window[...] = True
        return new
  return 0


def _beit_block(n_masked: int, rng: np.random.Generator, *, grid: tuple[int, int],
                log_aspect: tuple[float, float], min_patches: int,
                max_patches: int | None) -> np.ndarray:
  _check_count(n_masked, grid)
  if n_masked and min(grid) < 2:
    raise ValueError(f'BeitBlock masking needs a grid of at least 2x2 (its rectangles are strictly '
                     f'smaller than the grid), got {grid[0]}x{grid[1]}; use another generator.')
  mask = np.zeros(grid, dtype=bool)
  count, idle = 0, 0
  while count < n_masked:
    limit = min(n_masked - count, n_masked if max_patches is None else max_patches)
    added = _add_beit_block(mask, limit, min_patches, log_aspect, rng)
    count += added
    idle = 0 if added else idle + 1
    # The reference loops forever when no rectangle can fit (e.g. every drawn area too large
    # for the grid); a workable setting fails 100 rounds in a row with negligible probability.
    if idle == _BEIT_MAX_IDLE_ROUNDS:
      raise ValueError(
          f'BeitBlock masking placed no rectangle in {idle * 10} tries with {count} of '
          f'{n_masked} cells masked on a {grid[0]}x{grid[1]} grid (min_block_patches='
          f'{min_patches}): lower min_block_patches or the mask count.')
  return mask


def make_mask_generator(name: str = 'InverseBlock', grid: tuple[int, int] = (16, 16),
                        roll: bool = True, min_aspect: float = 0.5,
                        max_aspect: float | None = None, min_block_patches: int = 16,
                        max_block_patches: int | None = None) -> MaskGenerator:
  """Returns `generate(n_masked, rng) -> bool (h, w)` with exactly `n_masked` True cells.

  Args:
    name: 'InverseBlock' (CAPI's default), 'Block', 'Uniform' or 'BeitBlock' (CAE v2).
    grid: (h, w) token grid, i.e. (image_size / patch_size,) * 2.
    roll: shift block masks by a random wrap-around offset ('InverseBlock' and 'Block' only).
    min_aspect: smallest rectangle aspect ratio (height / width) for the block generators
      (CAE v2: 0.3).
    max_aspect: largest aspect ratio; None = 1 / min_aspect.
    min_block_patches: 'BeitBlock' only: the lower end of a rectangle's drawn area
      (`--min_mask_patches_per_block`).
    max_block_patches: 'BeitBlock' only: the most new cells one rectangle may mask; None = all
      `n_masked` (`--max_mask_patches_per_block`).
  """
  grid = (int(grid[0]), int(grid[1]))
  log_aspect = (math.log(min_aspect), math.log(max_aspect or 1 / min_aspect))
  generators = {
      'InverseBlock': functools.partial(_inverse_block, grid=grid, roll=roll,
                                        log_aspect=log_aspect),
      'Block': functools.partial(_one_block, grid=grid, roll=roll, log_aspect=log_aspect),
      'Uniform': functools.partial(_uniform, grid=grid),
      'BeitBlock': functools.partial(_beit_block, grid=grid, log_aspect=log_aspect,
                                     min_patches=min_block_patches,
                                     max_patches=max_block_patches),
  }
  if name not in GENERATORS:
    raise ValueError(f'Unknown masking generator {name!r}; choose one of {GENERATORS} '
                     '(e.g. CAPI\'s config.capi.data.masking_generator).')
  return generators[name]


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
        'size, or change the mask ratio / prediction subsampling (CAPI: config.capi.data).')
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
