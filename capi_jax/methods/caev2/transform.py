"""CAE v2's training example: two views of one crop and a block mask with an exact count.

Per record, as the release's `DataAugmentationForCAE` (`furnace/datasets.py`,
`docs/reference/caev2_algorithm.md`, Data and masks):
  colour jitter on the whole image (torchvision's ColorJitter(s, s, s), s =
  `caev2.data.color_jitter`: brightness, contrast and saturation factors uniform in
  [1 - s, 1 + s], applied in a random order)
  -> horizontal flip (p 0.5, `caev2.data.do_hflip`)
  -> one random resized crop box (`caev2.data.crop_scale`, ratio (3/4, 4/3)), resized bicubic to the
     student's `data.image_size` and to the teacher's `caev2.teacher.image_size`
  -> both views as uint8 pixels; the method normalises them on the device, the student's with
     ImageNet's statistics, the teacher's with `caev2.teacher.normalization` (CLIP's for the
     release);
  BEiT's block mask on the student's patch grid with exactly `caev2.num_mask_patches` patches.
"""

import dataclasses
from collections.abc import Mapping
from typing import Any

import grain
import ml_collections
import numpy as np
from PIL import Image

from capi_jax.data import masking
from capi_jax.data import transforms


@dataclasses.dataclass(frozen=True)
class CaeV2Transform(grain.transforms.RandomMap):
  """Record -> {'images' uint8 (S, S, 3), 'teacher_images' uint8 (S_t, S_t, 3),
  'visible_indices' int32 (N - n_masked,), 'masked_indices' int32 (n_masked,)}, both index
  sets ascending and row-major over the mask generator's grid; all randomness from Grain's
  per-record generator."""
  image_size: int
  teacher_image_size: int
  crop_scale: tuple[float, float]
  color_jitter: float
  do_hflip: bool
  mask_generator: masking.MaskGenerator
  num_mask_patches: int

  def _jitter(self, image: Image.Image, rng: np.random.Generator) -> Image.Image:
    s = self.color_jitter
    # torchvision draws the order of all four operations; hue (index 3) has no factor here.
    order = rng.permutation(4)
    factors = {op: rng.uniform(max(0.0, 1 - s), 1 + s)
               for op in (transforms.BRIGHTNESS, transforms.CONTRAST, transforms.SATURATION)}
    return transforms.color_jitter(image, order, factors)

  def random_map(self, element: Mapping[str, Any], rng: np.random.Generator
                 ) -> dict[str, np.ndarray]:
    image = element['image']
    if self.color_jitter > 0:
      image = self._jitter(image, rng)
    if self.do_hflip:
      image = transforms.random_flip(image, rng)
    box = transforms.sample_crop_box(image.height, image.width, self.crop_scale,
                                     transforms.CROP_RATIO, rng)
    # One crop at both sizes (the release's two-resolution RandomResizedCrop).
    student = transforms.resized_crop(image, box, self.image_size)
    teacher = transforms.resized_crop(image, box, self.teacher_image_size)
    masked = self.mask_generator(self.num_mask_patches, rng).ravel()
    return {
        'images': np.asarray(student, np.uint8),
        'teacher_images': np.asarray(teacher, np.uint8),
        'visible_indices': np.flatnonzero(~masked).astype(np.int32),
        'masked_indices': np.flatnonzero(masked).astype(np.int32),
    }


def from_config(config: ml_collections.ConfigDict) -> CaeV2Transform:
  """The transform of `config.caev2` (its `data` augmentation, masks, teacher view) at
  `config.data.image_size` (values already validated)."""
  c, image_size = config.caev2, config.data.image_size
  d = c.data
  grid = (image_size // c.model.patch_size,) * 2
  generator = masking.make_mask_generator(
      'BeitBlock', grid=grid, min_aspect=c.mask_min_aspect,
      min_block_patches=c.min_mask_patches_per_block,
      max_block_patches=c.max_mask_patches_per_block or None)
  return CaeV2Transform(
      image_size=image_size, teacher_image_size=c.teacher.image_size,
      crop_scale=tuple(d.crop_scale), color_jitter=d.color_jitter, do_hflip=d.do_hflip,
      mask_generator=generator,
      num_mask_patches=c.num_mask_patches)
