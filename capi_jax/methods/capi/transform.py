"""CAPI's training example: one random resized crop, a flip, and that image's masks.

Per record (the release's data pipeline, `docs/reference/capi_algorithm.md`): RandomResizedCrop
(bicubic, `capi.data.crop_scale`), horizontal flip, then a mask from
`capi.data.masking_generator` with `int(n_tokens * mask_ratio)` masked positions, of which a
uniform `prediction_subsampling` fraction is predicted. The release's ImageNet normalisation
happens on the accelerator (`Capi.loss_and_grads`): the crop leaves the host as uint8 pixels.
"""

import dataclasses
from collections.abc import Mapping
from typing import Any

import grain
import ml_collections
import numpy as np

from capi_jax.data import masking
from capi_jax.data import transforms


@dataclasses.dataclass(frozen=True)
class CapiTransform(grain.transforms.RandomMap):
  """Record -> {'images' uint8 (S, S, 3), 'visible_indices' int32 (n_visible,) ascending,
  'predict_indices' int32 (n_predict,)}; all randomness from Grain's per-record generator."""
  image_size: int
  crop_scale: tuple[float, float]
  do_hflip: bool
  grid: tuple[int, int]
  mask_generator: masking.MaskGenerator
  mask_ratio: float
  prediction_subsampling: float

  def random_map(self, element: Mapping[str, Any], rng: np.random.Generator
                 ) -> dict[str, np.ndarray]:
    image = transforms.random_resized_crop(element['image'], self.image_size, self.crop_scale,
                                           rng)
    if self.do_hflip:
      image = transforms.random_flip(image, rng)
    visible, predict = masking.sample_indices(
        self.mask_generator, self.grid, self.mask_ratio,
        self.prediction_subsampling, rng)
    return {'images': np.asarray(image), 'visible_indices': visible,
            'predict_indices': predict}


def from_config(config: ml_collections.ConfigDict) -> CapiTransform:
  """The transform of `config.capi.data` at `config.data.image_size` in patches of
  `config.capi.model.patch_size` (values already validated)."""
  data, image_size = config.capi.data, config.data.image_size
  grid = (image_size // config.capi.model.patch_size,) * 2
  return CapiTransform(
      image_size=image_size, crop_scale=tuple(data.crop_scale), do_hflip=data.do_hflip,
      grid=grid, mask_generator=masking.make_mask_generator(data.masking_generator, grid,
                                                 data.masking_roll),
      mask_ratio=data.mask_ratio, prediction_subsampling=data.prediction_subsampling)
