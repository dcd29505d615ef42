"""The official evaluation transforms (CAPI's eval_*.py torchvision pipelines) on PIL images.

torchvision resizes PIL images with PIL itself; `data.transforms.resize` runs PIL's passes in the
order of the Pillow versions the release pinned (10.4 / 11.0; Pillow 13 changed it), so these are
the official pixels bit for bit on any Pillow (tests/test_transforms.py, against torchvision
0.20.1). Outputs are channels-last float32 normalised with `data.transforms.normalize` (the
official ToTensor + Normalize up to float32 rounding, ~1e-7).
- `classif_train`: RandomResizedCrop(size, scale (0.08, 1), ratio (3/4, 4/3), bicubic), horizontal
  flip with probability 0.5 (`eval_classification.py` train transform).
- `classif_eval`: shorter side to size * 256 / 224 (bicubic), central size x size crop (Resize(256)
  + CenterCrop(224) at the official size).
- `seg_image`: squash to (size, size) (bicubic; the aspect ratio is *not* kept), as
  `eval_segmentation.py` and `eval_visualizations.py` do.
- `seg_target`: the mask as a palette image (`convert('P')`), squashed with NEAREST: uint8 labels.
"""

import numpy as np
from PIL import Image

from capi_jax.data import transforms as image_ops

CLASSIF_CROP_SCALE = (0.08, 1.0)  # torchvision's RandomResizedCrop default.


def classif_train(image: Image.Image, size: int, rng: np.random.Generator) -> np.ndarray:
  """A random resized crop, maybe flipped: float32 (size, size, 3)."""
  image = image_ops.random_resized_crop(image, size, CLASSIF_CROP_SCALE, rng)
  return image_ops.normalize(image_ops.random_flip(image, rng))


def classif_eval(image: Image.Image, size: int) -> np.ndarray:
  """Resize(size * 256 / 224) + CenterCrop(size), normalised: float32 (size, size, 3)."""
  return image_ops.eval_image(image, size)


def seg_image(image: Image.Image, size: int) -> np.ndarray:
  """Resize((size, size)) bicubic, normalised: float32 (size, size, 3)."""
  return image_ops.normalize(image_ops.resize(image.convert('RGB'), (size, size)))


def seg_target(mask: Image.Image, size: int) -> np.ndarray:
  """convert('P') then Resize((size, size), NEAREST): uint8 (size, size) labels."""
  return np.asarray(mask.convert('P').resize((size, size), Image.Resampling.NEAREST), np.uint8)


def denormalize_uint8(image: np.ndarray) -> np.ndarray:
  """A normalised float image (..., 3) back to uint8 pixels (rounded)."""
  pixels = (image * image_ops.IMAGENET_STD + image_ops.IMAGENET_MEAN) * 255
  return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)
