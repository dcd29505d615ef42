"""Fine-tuning's training example: timm 0.3.2's `create_transform(is_training=True)` as CAE v2's
`furnace.datasets.build_transform` calls it (input side > 32).

RandomResizedCrop (torchvision's box: 10 tries of area U(0.08, 1), log-uniform ratio in
(3/4, 4/3), then the centre fallback) resized bicubic, horizontal flip (p 0.5), RandAugment
rand-m9-mstd0.5-inc1 (`data/augment.py`), normalisation with the ImageNet mean / std, then
RandomErasing (p 0.25, per-pixel normal values) on the normalised image. All random numbers
come from Grain's per-record generator (the release draws from torch's, Python's and numpy's
global generators: the same distributions, other numbers).
"""

from collections.abc import Mapping
import dataclasses
from typing import Any

import grain
import numpy as np

from capi_jax.data import augment
from capi_jax.data import transforms


@dataclasses.dataclass(frozen=True)
class FinetuneTransform(grain.transforms.RandomMap):
  """Record -> {'images' float32 (S, S, 3) normalised, 'labels' int32 ()}."""
  image_size: int
  crop_scale: tuple[float, float] = (0.08, 1.0)
  randaug_magnitude: float = 9.0
  randaug_std: float = 0.5
  randaug_ops: int = 2
  erase_prob: float = 0.25

  def random_map(self, element: Mapping[str, Any], rng: np.random.Generator
                 ) -> dict[str, np.ndarray]:
    image = element['image'].convert('RGB')
    box = transforms.sample_crop_box(image.height, image.width, self.crop_scale,
                                     transforms.CROP_RATIO, rng)
    image = transforms.random_flip(transforms.resized_crop(image, box, self.image_size), rng)
    if self.randaug_ops:
      image = augment.rand_augment(image, augment.draw_ops(
          rng, self.randaug_ops, self.randaug_magnitude, self.randaug_std))
    x = transforms.normalize(image)
    if self.erase_prob > 0:
      x = augment.random_erasing(x, rng, self.erase_prob)
    return {'images': x.astype(np.float32), 'labels': np.int32(element['label'])}
