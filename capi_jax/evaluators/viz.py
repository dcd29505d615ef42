r"""The official visualisations ('viz'): CAPI's eval_visualizations.py PCA pictures, as PNG.

- Per image (`separate_pca`): PCA(6, whiten=True) of its patch features, everything divided by
  the std of component 0, each component's sign flipped when its skewness
  mean(x^3) / mean(x^2)^1.5 is negative.
- Over all images (`joint_pca`): PCA(10, whiten=True) of every patch, the same sign rule, then
  the division by the std of component 0.
- `build_rgb`: the first 3 components, [-2.3, 2.3] -> [0, 255], clipped, truncated to uint8, PIL
  NEAREST to 224 x 224; each component is also drawn as a coolwarm heat map on [-2.3, 2.3], and
  the 8 sign flips of the RGB are saved (`FLIP_DIRECTIONS` order).
- `save_pictures` writes, per image, `<index:07d>_pca_{sep,joint}.png` (image, RGB, heat maps in
  one row, 10 px apart) and `<index:07d>_pca_{sep,joint}all_flips_<i>.png`, as the official
  script names them.
Images are every max(n // num_images, 1)-th of the dataset, squashed to (res, res) bicubic
(`transforms.seg_image`). PCA runs in float64 on the host (scikit-learn's runs in float32:
projections agree to ~1e-4).
"""

from collections.abc import Callable, Sequence
import dataclasses
import io
import pathlib
from typing import ClassVar

import matplotlib
import numpy as np
from PIL import Image

from capi_jax.base import storage
from capi_jax.data import transforms as image_ops
from capi_jax.evaluators import protocol
from capi_jax.evaluators import seg_data
from capi_jax.evaluators import transforms

VMIN, VMAX = -2.3, 2.3
PICTURE_SIZE = 224
SEPARATE_COMPONENTS, JOINT_COMPONENTS = 6, 10
NUM_IMAGES = 1024
# np.stack(np.meshgrid([-1, 1], [-1, 1], [-1, 1])).reshape(3, 8).T, as the official script.
FLIP_DIRECTIONS = np.stack(np.meshgrid([-1, 1], [-1, 1], [-1, 1])).reshape(3, 8).T


def image_indices(n: int, num_images: int = NUM_IMAGES) -> list[int]:
  """The dataset positions the official script draws: every max(n // num_images, 1)-th."""
  return list(range(0, n, max(n // num_images, 1)))


def whitened_pca(x: np.ndarray, n_components: int) -> np.ndarray:
  """PCA(n_components, whiten=True).fit_transform(x): (n, D) -> (n, n_components) float64.

  Up to the signs of the components (the skewness rule fixes them afterwards).
  """
  x = x.astype(np.float64)
  centred = x - x.mean(0)
  # The thin SVD's left vectors are the whitened projections (up to sqrt(n - 1)).
  u, _, _ = np.linalg.svd(centred, full_matrices=False)
  return u[:, :n_components] * np.sqrt(len(x) - 1)


def _positive_skew(projected: np.ndarray) -> np.ndarray:
  skew = np.mean(projected ** 3, 0) / np.mean(projected ** 2, 0) ** 1.5
  return projected * np.where(skew < 0, -1.0, 1.0)


def separate_pca(feature_maps: np.ndarray) -> np.ndarray:
  """(n, h, w, D) -> (n, h * w, 6) per-image projections, official scaling and signs."""
  out = []
  for fmap in feature_maps:
    projected = whitened_pca(fmap.reshape(-1, fmap.shape[-1]), SEPARATE_COMPONENTS)
    out.append(_positive_skew(projected / projected[:, 0].std()))
  return np.stack(out).astype(np.float32)


def joint_pca(feature_maps: np.ndarray) -> np.ndarray:
  """(n, h, w, D) -> (n, h * w, 10) projections of a PCA over all images' patches."""
  n, h, w, d = feature_maps.shape
  # Covariance route: the (n h w, n h w) left vectors of an SVD would not fit in memory.
  x = feature_maps.reshape(-1, d).astype(np.float64)
  mean = x.mean(0)
  cov = (x - mean).T @ (x - mean) / (len(x) - 1)
  values, vectors = np.linalg.eigh(cov)
  order = np.argsort(values)[::-1][:JOINT_COMPONENTS]
  projected = (x - mean) @ vectors[:, order] / np.sqrt(np.maximum(values[order], 1e-300))
  projected = _positive_skew(projected)
  projected = projected / projected[:, 0].std()
  return projected.reshape(n, h * w, -1).astype(np.float32)


def build_rgb(h: int, w: int, projected: np.ndarray) -> np.ndarray:
  """build_rgb: (h * w, >= 3) projections -> (224, 224, 3) uint8."""
  channels = projected.T.reshape(-1, h, w)[:3]
  pixels = (((channels - VMIN) / (VMAX - VMIN)).clip(0, 1) * 255).astype(np.uint8)
  image = Image.fromarray(pixels.transpose(1, 2, 0)).resize((PICTURE_SIZE, PICTURE_SIZE),
                                                            Image.Resampling.NEAREST)
  return np.asarray(image)


def _heatmap(channel: np.ndarray) -> Image.Image:
  """PIL_heatmap(channel, low=-2.3, high=2.3, cmap='coolwarm'), as RGB."""
  colours = matplotlib.colormaps['coolwarm']((channel - VMIN) / (VMAX - VMIN))
  image = Image.fromarray((colours * 255).astype(np.uint8))
  return image.resize((PICTURE_SIZE, PICTURE_SIZE), Image.Resampling.NEAREST).convert('RGB')


def _grid_row(images: Sequence[Image.Image], padding: int = 10) -> Image.Image:
  """PIL_make_grid of one row: images left to right, `padding` black pixels between."""
  width = sum(im.width for im in images) + padding * len(images)
  out = Image.new('RGB', (width, max(im.height for im in images) + padding))
  left = 0
  for im in images:
    out.paste(im, (left, 0))
    left += im.width + padding
  return out


def _picture(image: np.ndarray) -> Image.Image:
  """A normalised (H, W, 3) input image as the official script shows it (224 x 224)."""
  pixels = (np.clip(image * image_ops.IMAGENET_STD + image_ops.IMAGENET_MEAN, 0, 1) * 255)
  return Image.fromarray(pixels.astype(np.uint8)).resize((PICTURE_SIZE, PICTURE_SIZE),
                                                         Image.Resampling.BICUBIC)


def save_pictures(image_fn: Callable[[int], np.ndarray], feature_maps: np.ndarray,
                  indices: Sequence[int], out_dir: str | pathlib.Path) -> list[pathlib.Path]:
  """Writes the official PNGs of the separate and joint PCAs; returns the grid files.

  Args:
    image_fn: dataset position -> its normalised (H, W, 3) input image.
    feature_maps: (n, h, w, D) the patch features of the images at `indices`.
    indices: the images' dataset positions (file names).
    out_dir: folder to write into (created).
  """
  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  _, h, w, _ = feature_maps.shape
  written = []
  for kind, projections in (('sep', separate_pca(feature_maps)),
                            ('joint', joint_pca(feature_maps))):
    for projected, index in zip(projections, indices):
      row = [_picture(image_fn(index)), Image.fromarray(build_rgb(h, w, projected))]
      row += [_heatmap(c) for c in projected.T.reshape(-1, h, w)]
      base = out_dir / f'{index:07d}_pca_{kind}'
      _save_png(_grid_row(row), f'{base}.png')
      for i, direction in enumerate(FLIP_DIRECTIONS):
        _save_png(Image.fromarray(build_rgb(h, w, projected[:, :3] * direction)),
                  f'{base}all_flips_{i}.png')
      written.append(pathlib.Path(f'{base}.png'))
  return written


def _save_png(image: Image.Image, path: str) -> None:
  """Writes `image` whole or not at all (a full disk leaves no truncated PNG behind)."""
  buffer = io.BytesIO()
  image.save(buffer, format='PNG')
  storage.write_atomic(path, buffer.getvalue())


def run(backbone, dataset, resolution: int, out_dir: str | pathlib.Path,
        num_images: int = NUM_IMAGES, *, num_workers: int = 0) -> list[pathlib.Path]:
  """eval_model: the pictures of every max(n // num_images, 1)-th image of a `seg_data` set."""
  indices = image_indices(len(dataset), num_images)
  features = backbone.extract(
      seg_data.batches(dataset, indices, resolution, backbone.batch_size,
                       num_workers=num_workers, with_masks=False),
      outputs=('feature_map',))['feature_map']
  image_fn = lambda i: transforms.seg_image(dataset.image(i), resolution)
  return save_pictures(image_fn, features, indices, out_dir)


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class Viz(protocol.Protocol):
  """'viz': `run` at each resolution, into out_dir/viz_<resolution>/."""
  name: ClassVar[str] = 'viz'

  dataset: str  # A segmentation set ('<reader>:<root>'): its images are drawn.
  split: str
  resolutions: Sequence[int]
  num_images: int

  def check(self, p: protocol.Problems, key: str, model: protocol.ModelShape | None) -> None:
    p.check(str(self.dataset).partition(':')[0] in seg_data.READERS,
            f'{key}.dataset={self.dataset!r} must be a segmentation dataset (ade20k:ROOT, '
            '..., fashion_mnist_scenes[:DIR]): its images are drawn.')
    p.check(isinstance(self.split, str) and self.split,
            f'{key}.split={self.split!r} must name a split.')
    if isinstance(self.resolutions, Sequence) and len(self.resolutions):
      for r in self.resolutions:
        protocol.check_resolution(p, f'{key}.resolutions', r, model)
    else:
      p.found.append(f'{key}.resolutions={self.resolutions!r} must be a non-empty tuple.')
    p.number(f'{key}.num_images', self.num_images, 1, integer=True)

  def run(self, backbone, env, out_dir, log):
    dataset = seg_data.make_seg_set(self.dataset, self.split)
    files = {}
    for resolution in self.resolutions:
      written = run(backbone, dataset, resolution, pathlib.Path(out_dir) / f'viz_{resolution}',
                    self.num_images, num_workers=env.num_workers)
      files[resolution] = len(written)
      log(f'viz: {len(written)} pictures at {resolution} px in {out_dir}/viz_{resolution}')
    return {}, {'pictures': files}
