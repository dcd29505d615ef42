"""Image transforms shared by the methods' training transforms and the evaluations.

torchvision semantics where the releases use torchvision: `sample_crop_box` is
RandomResizedCrop.get_params, `resized_crop` / `random_resized_crop` crop then resize, `eval_image`
is Resize(int) + CenterCrop, `color_jitter` / `grayscale` are ColorJitter / Grayscale on PIL.
Images are PIL in, NHWC numpy out.

Every resize goes through `resize`: torchvision resizes a PIL image with one `Image.resize` call,
whose pixels depend on the Pillow version (Pillow 13 changed the order of its two passes; see
`resize`). `resize` gives the pixels of the Pillow versions the releases ran (<= 12) on any
Pillow, checked bit-exact against torchvision in tests/test_transforms.py.

Training images travel to the accelerator as uint8 pixels (a quarter of float32's bytes, and no
host time spent normalising); the method normalises them inside its jitted step with
`normalize_on_device`, with the mean/std its release uses. Evaluation images are normalised on
the host (`normalize`, `eval_image`). Both give the same float32 numbers.
"""

from collections.abc import Mapping, Sequence
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image
from PIL import ImageEnhance

# Per-channel RGB statistics in [0, 1] units, as torchvision's Normalize takes them.
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
# OpenAI CLIP's input statistics (its `_transform`; CAE v2's teacher view).
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)
NORMALIZATIONS = {'imagenet': (IMAGENET_MEAN, IMAGENET_STD), 'clip': (CLIP_MEAN, CLIP_STD)}
CROP_RATIO = (3 / 4, 4 / 3)


def _scale_and_offset(mean: np.ndarray, std: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """float32 (3,) pair with pixel * scale + offset == (pixel / 255 - mean) / std.

  One multiply-add per pixel instead of a divide, a subtract and a divide; host and device use
  the same two constants so that they round alike.
  """
  mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
  return (1 / (255 * std)).astype(np.float32), (-mean / std).astype(np.float32)


_IMAGENET_SCALE, _IMAGENET_OFFSET = _scale_and_offset(IMAGENET_MEAN, IMAGENET_STD)


def sample_crop_box(height: int, width: int, scale: tuple[float, float],
                    ratio: tuple[float, float],
                    rng: np.random.Generator) -> tuple[int, int, int, int]:
  """torchvision's RandomResizedCrop.get_params: (top, left, h, w).

  Ten tries at a random area fraction in `scale` and log-uniform aspect ratio (w / h) in `ratio`;
  if none fits, the largest centred crop with an aspect ratio inside `ratio`.
  """
  area = height * width
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target_area = area * rng.uniform(scale[0], scale[1])
    aspect_ratio = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
    w = int(round(math.sqrt(target_area * aspect_ratio)))
    h = int(round(math.sqrt(target_area / aspect_ratio)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return top, left, h, w
  in_ratio = width / height
  if in_ratio < min(ratio):
    w, h = width, int(round(width / min(ratio)))
  elif in_ratio > max(ratio):
    h, w = height, int(round(height * max(ratio)))
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


def normalize(image: Image.Image | np.ndarray) -> np.ndarray:
  """On the host: RGB image or uint8 array (..., 3) -> float32 (..., 3), ImageNet mean/std
  normalised."""
  pixels = np.array(image, dtype=np.float32)  # Always a copy, so the in-place ops below are safe.
  pixels *= _IMAGENET_SCALE  # In place: this runs for every pixel of every image.
  pixels += _IMAGENET_OFFSET
  return pixels


def normalize_on_device(images: jax.Array, mean: np.ndarray = IMAGENET_MEAN,
                        std: np.ndarray = IMAGENET_STD) -> jax.Array:
  """In a jitted step: uint8 pixels (..., 3) -> float32 (..., 3) normalised with mean/std.

  Args:
    images: uint8 RGB pixels, e.g. a training batch (batch, height, width, 3).
    mean, std: per-channel statistics in [0, 1] units, shape (3,) (ImageNet's by default).

  Returns:
    float32 (..., 3): (pixel / 255 - mean) / std, equal to `normalize` on the host up to float32
    rounding.
  """
  if images.dtype != jnp.uint8:
    raise ValueError(f'Images must be uint8 pixels, got {images.dtype}; emit np.uint8 arrays '
                     'from the training transform.')
  scale, offset = _scale_and_offset(mean, std)
  return images.astype(jnp.float32) * scale + offset


# Modes that PIL resizes premultiplied (Image.resize converts them and back around the passes).
_PREMULTIPLIED = {'LA': 'La', 'RGBA': 'RGBa'}


def resize(image: Image.Image, size: tuple[int, int],
           resample: Image.Resampling = Image.Resampling.BICUBIC) -> Image.Image:
  """`image.resize(size, resample)` as Pillow <= 12 computes it, on every Pillow version.

  That is torchvision's Resize / resized_crop on a PIL image in the releases' environments
  (CAPI pins torchvision 0.20.1 and Pillow 10.4 / 11.0). PIL resamples separably: a horizontal
  pass, then a vertical one, each with its own support (scaled by its own axis' reduction), and
  the image between them is rounded and clipped to the mode's pixels (uint8 for RGB). Pillow 13
  runs the vertical pass first when the height loses more than twice as many pixels as the width
  (any height reduction while the width grows); the clipped intermediate then differs, by up to
  25 / 255 per bicubic pixel (0.44 after ImageNet normalisation), 1 / 255 bilinear. Two calls,
  the horizontal pass alone then the vertical pass alone, are the <= 12 order on every version.

  Args:
    image: any mode PIL resizes (NEAREST and modes '1' / 'P' are one pass: no order to fix).
    size: (width, height), PIL's order.
    resample: PIL's filter.

  Returns:
    a new image of `size`.
  """
  width, height = size
  if (width, height) == image.size or resample == Image.Resampling.NEAREST or image.mode in (
      '1', 'P'):
    return image.resize(size, resample)
  if image.mode in _PREMULTIPLIED:  # as Image.resize does, around both passes (not each)
    premultiplied = image.convert(_PREMULTIPLIED[image.mode])
    return resize(premultiplied, size, resample).convert(image.mode)
  if width != image.width:
    image = image.resize((width, image.height), resample)  # horizontal pass only
  if height != image.height:
    image = image.resize((width, height), resample)  # vertical pass only
  return image


def resize_shorter_side(image: Image.Image, size: int,
                        resample: Image.Resampling = Image.Resampling.BICUBIC) -> Image.Image:
  """torchvision's Resize(size) (bicubic): the shorter side becomes `size`, aspect kept."""
  width, height = image.size
  if width <= height:
    new_size = (size, int(size * height / width))
  else:
    new_size = (int(size * width / height), size)
  return resize(image, new_size, resample)


def center_crop(image: Image.Image, size: int) -> Image.Image:
  """torchvision's CenterCrop(size) of an image at least `size` on both sides."""
  if min(image.size) < size:
    raise ValueError(f'A {image.width}x{image.height} image has no central {size}x{size} crop.')
  top = int(round((image.height - size) / 2.0))
  left = int(round((image.width - size) / 2.0))
  return image.crop((left, top, left + size, top + size))


def eval_image(image: Image.Image, image_size: int) -> np.ndarray:
  """The reference evaluation transform: float32 (image_size, image_size, 3).

  Resize the shorter side to image_size * 256 / 224 (bicubic), centre-crop image_size
  (torchvision's Resize(int) + CenterCrop rounding), normalise.
  """
  image = resize_shorter_side(image, int(image_size * 256 / 224))
  return normalize(center_crop(image, image_size))


def resized_crop(image: Image.Image, box: tuple[int, int, int, int], size: int,
                 resample: Image.Resampling = Image.Resampling.BICUBIC) -> Image.Image:
  """torchvision's resized_crop: the (top, left, height, width) box, resized to size x size."""
  top, left, h, w = box
  # crop, then resize: torchvision's order (resizing with a box would read pixels outside it).
  return resize(image.crop((left, top, left + w, top + h)), (size, size), resample)


def random_resized_crop(image: Image.Image, size: int, scale: tuple[float, float],
                        rng: np.random.Generator, ratio: tuple[float, float] = CROP_RATIO
                        ) -> Image.Image:
  """torchvision's RandomResizedCrop(size, scale, ratio, bicubic) on a PIL image."""
  return resized_crop(image, sample_crop_box(image.height, image.width, scale, ratio, rng), size)


def random_flip(image: Image.Image, rng: np.random.Generator) -> Image.Image:
  """Horizontal flip with probability 0.5."""
  return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else image


def image_shape(config: ml_collections.ConfigDict) -> tuple[int, int]:
  """(height, width) of the training images, from `config.data.image_size` (int or pair)."""
  size = config.data.image_size
  return (size, size) if isinstance(size, int) else tuple(size)


# Colour jitter operations, indexed as torchvision's ColorJitter (and kappadata's permutation).
BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)


def adjust_hue(image: Image.Image, factor: float) -> Image.Image:
  """torchvision's PIL hue shift: the HSV hue byte + int(255 factor), wrapping mod 256."""
  if not -0.5 <= factor <= 0.5:
    raise ValueError(f'hue factor {factor} is not in [-0.5, 0.5].')
  h, s, v = image.convert('HSV').split()
  shifted = (np.asarray(h, np.int32) + int(factor * 255)) % 256
  hsv = Image.merge('HSV', (Image.fromarray(shifted.astype(np.uint8), 'L'), s, v))
  return hsv.convert(image.mode)


def color_jitter(image: Image.Image, order: Sequence[int],
                 factors: Mapping[int, float]) -> Image.Image:
  """Applies the jitter operations in `order`; an operation without a factor is skipped.

  Args:
    image: RGB image.
    order: a permutation of (BRIGHTNESS, CONTRAST, SATURATION, HUE).
    factors: operation -> factor (brightness / contrast / saturation: 1 is the identity; hue:
      a shift in [-0.5, 0.5]).
  """
  enhancers = {BRIGHTNESS: ImageEnhance.Brightness, CONTRAST: ImageEnhance.Contrast,
               SATURATION: ImageEnhance.Color}
  for op in order:
    if op not in factors:
      continue
    image = (adjust_hue(image, factors[op]) if op == HUE
             else enhancers[op](image).enhance(factors[op]))
  return image


def grayscale(image: Image.Image) -> Image.Image:
  """torchvision's rgb_to_grayscale with 3 output channels on PIL: 'L' luma, repeated."""
  return image.convert('L').convert('RGB')
