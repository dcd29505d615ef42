"""MIM-Refiner's multi-crop views (`zztemplates/datasets/imagenet/train_byolaug_localviews.yaml`).

Each view, in the release's order (kappadata transforms on PIL images, torchvision functional):
  RandomResizedCrop (torchvision's sampling, ratio (3/4, 4/3), crop then bicubic resize)
  -> horizontal flip (p 0.5)
  -> colour jitter (p 0.8): brightness, contrast, saturation, hue in a random order, factors
     uniform in [1 - 0.4, 1 + 0.4], [1 - 0.4, 1 + 0.4], [1 - 0.2, 1 + 0.2], [-0.1, 0.1]
     (torchvision's ColorJitter on PIL: ImageEnhance Brightness / Contrast / Color, and a hue
     shift of the HSV hue byte by int(255 h) mod 256)
  -> Gaussian blur (PIL ImageFilter.GaussianBlur(radius=sigma), sigma uniform in (0.1, 2);
     the release's `kd_gaussian_blur_pil` uses PIL's blur, not torchvision's kernel-size rule):
     global view 1 always, global view 2 p 0.1, local views p 0.5
  -> grayscale (p 0.2; PIL 'L' luma copied to 3 channels)
  -> solarize (global view 2 only, p 0.2: pixels >= 128 become 255 - pixel)
  -> ImageNet mean / std normalisation.
2 global views at 224 (scale (0.25, 1)), 10 local views at 96 (scale (0.05, 0.25)); the
H/14 and 2B/14 recipes use 98 for the local views.
"""

import dataclasses
from collections.abc import Mapping
from typing import Any

import grain
import numpy as np
from PIL import Image
from PIL import ImageFilter
from PIL import ImageOps

from capi_jax.data import transforms

@dataclasses.dataclass(frozen=True)
class MultiCrop(grain.transforms.RandomMap):
  """Decoded record {'image': PIL RGB, 'label': int, 'index': int} -> the release's views.

  Output: 'global_views' float32 (G, global_size, global_size, 3), 'local_views' float32
  (n_local, local_size, local_size, 3), 'label' int32 (), 'index' int32 () (the record's
  dataset index: the queue never returns a sample's own rows). G = len(global_blur_p); global view
  g is blurred with probability global_blur_p[g] and solarised with global_solarize_p[g].
  All randomness comes from the generator Grain passes (seeded per record).
  """
  global_size: int = 224
  local_size: int = 96
  n_local: int = 10
  global_scale: tuple[float, float] = (0.25, 1.0)
  local_scale: tuple[float, float] = (0.05, 0.25)
  flip_p: float = 0.5
  jitter_p: float = 0.8
  brightness: float = 0.4
  contrast: float = 0.4
  saturation: float = 0.2
  hue: float = 0.1
  grayscale_p: float = 0.2
  blur_sigma: tuple[float, float] = (0.1, 2.0)
  global_blur_p: tuple[float, ...] = (1.0, 0.1)
  local_blur_p: float = 0.5
  global_solarize_p: tuple[float, ...] = (0.0, 0.2)
  solarize_threshold: int = 128

  def __post_init__(self):
    problems = []
    if not self.global_blur_p:
      problems.append('global_blur_p is empty: it needs one probability per global view')
    if len(self.global_solarize_p) != len(self.global_blur_p):
      problems.append(f'global_solarize_p {self.global_solarize_p} and global_blur_p '
                      f'{self.global_blur_p} must have one entry per global view each')
    for name in ('flip_p', 'jitter_p', 'grayscale_p', 'local_blur_p'):
      if not 0.0 <= getattr(self, name) <= 1.0:
        problems.append(f'{name}={getattr(self, name)} is not a probability')
    for p in (*self.global_blur_p, *self.global_solarize_p):
      if not 0.0 <= p <= 1.0:
        problems.append(f'{p} in global_blur_p / global_solarize_p is not a probability')
    if not 0.0 <= self.hue <= 0.5:
      problems.append(f'hue={self.hue} must lie in [0, 0.5]')
    if self.global_size < 1 or self.local_size < 1 or self.n_local < 0:
      problems.append(f'sizes {self.global_size} / {self.local_size} must be positive and '
                      f'n_local={self.n_local} non-negative')
    if problems:
      raise ValueError('MultiCrop: ' + '; '.join(problems) + '.')

  @property
  def n_global(self) -> int:
    return len(self.global_blur_p)

  def _jitter_factors(self, rng: np.random.Generator) -> dict[int, float]:
    """torchvision's ColorJitter ranges; strength 0 leaves the operation out, as there."""
    factors = {}
    for op, strength in ((transforms.BRIGHTNESS, self.brightness),
                         (transforms.CONTRAST, self.contrast),
                         (transforms.SATURATION, self.saturation)):
      if strength:
        factors[op] = rng.uniform(max(0.0, 1 - strength), 1 + strength)
    if self.hue:
      factors[transforms.HUE] = rng.uniform(-self.hue, self.hue)
    return factors

  def _view(self, image: Image.Image, rng: np.random.Generator, size: int,
           scale: tuple[float, float], blur_p: float, solarize_p: float) -> np.ndarray:
    """One augmented view, float32 (size, size, 3), normalised."""
    box = transforms.sample_crop_box(image.height, image.width, scale, transforms.CROP_RATIO, rng)
    image = transforms.resized_crop(image, box, size)
    if rng.random() < self.flip_p:
      image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if rng.random() < self.jitter_p:
      image = transforms.color_jitter(image, rng.permutation(4), self._jitter_factors(rng))
    if rng.random() < blur_p:
      image = image.filter(ImageFilter.GaussianBlur(radius=rng.uniform(*self.blur_sigma)))
    if rng.random() < self.grayscale_p:
      image = transforms.grayscale(image)
    if rng.random() < solarize_p:
      image = ImageOps.solarize(image, self.solarize_threshold)
    return transforms.normalize(image)

  def random_map(self, element: Mapping[str, Any], rng: np.random.Generator
                 ) -> dict[str, np.ndarray]:
    image = element['image']
    global_views = [self._view(image, rng, self.global_size, self.global_scale, blur_p, sol_p)
                    for blur_p, sol_p in zip(self.global_blur_p, self.global_solarize_p)]
    local_views = [self._view(image, rng, self.local_size, self.local_scale, self.local_blur_p,
                             0.0) for _ in range(self.n_local)]
    local_shape = (self.n_local, self.local_size, self.local_size, 3)
    return {'global_views': np.stack(global_views),
            'local_views': np.stack(local_views) if local_views else np.zeros(local_shape,
                                                                              np.float32),
            'label': np.int32(element['label']), 'index': np.int32(element['index'])}
