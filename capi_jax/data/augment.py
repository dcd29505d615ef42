"""timm 0.3.2's RandAugment ('rand-m9-mstd0.5-inc1') and RandomErasing, as BEiT / CAE v2 fine-tune.

RandAugment (timm `rand_augment_transform` with the "increasing" op set): per image, 2 ops drawn
uniformly with replacement from `INCREASING_OPS`; each applied with probability 0.5 at a
magnitude ~ N(9, 0.5) clipped to [0, 10]; the magnitude maps to the op's argument (`level_args`),
negated with probability 0.5 for the signed ops. Geometric ops resample bicubic and fill with the
ImageNet mean in uint8 ((124, 116, 104)); translations move by up to 0.45 of the image side. The
ops are PIL's (`ImageOps`, `ImageEnhance`, `Image.transform`) called with timm's arguments, so
the pixels are PIL's. Random numbers come from a numpy Generator (timm draws from Python's
`random` and numpy's global state); `draw_ops` returns the draws, `rand_augment` applies them, so
a recorded draw can be replayed.

RandomErasing (timm, `p=0.25, mode='pixel', max_count=1`), on the normalised (H, W, C) image:
with probability p, up to 10 tries of area ~ U(0.02, 1/3) x H W and log-uniform aspect in
(0.3, 1/0.3), h = round(sqrt(area * aspect)), w = round(sqrt(area / aspect)); the first box with
h < H and w < W at a uniform position gets per-pixel N(0, 1) values.
"""

import math
from typing import NamedTuple

import numpy as np
from PIL import Image
from PIL import ImageEnhance
from PIL import ImageOps

MAX_LEVEL = 10.0
# timm's _RAND_INCREASING_TRANSFORMS, by the name of the function each applies.
INCREASING_OPS = ('auto_contrast', 'equalize', 'invert', 'rotate', 'posterize', 'solarize',
                  'solarize_add', 'color', 'contrast', 'brightness', 'sharpness', 'shear_x',
                  'shear_y', 'translate_x_rel', 'translate_y_rel')
SIGNED_OPS = ('rotate', 'color', 'contrast', 'brightness', 'sharpness', 'shear_x', 'shear_y',
              'translate_x_rel', 'translate_y_rel')
IMAGENET_MEAN = (0.485, 0.456, 0.406)


class OpDraw(NamedTuple):
  """One RandAugment op of one image: its name, whether it applies, magnitude, sign."""
  op: str
  applied: bool
  magnitude: float = 0.0
  negate: bool = False


def fill_color(mean: tuple[float, ...] = IMAGENET_MEAN) -> tuple[int, ...]:
  """timm's `img_mean`: the mean in uint8 (min(255, round(255 x)))."""
  return tuple(min(255, round(255 * m)) for m in mean)


def level_args(op: str, magnitude: float, negate: bool = False,
               translate_pct: float = 0.45) -> tuple[float, ...]:
  """The op's argument at `magnitude` in [0, 10] (timm's `LEVEL_TO_ARG`, increasing variants)."""
  m = magnitude / MAX_LEVEL
  sign = -1.0 if negate else 1.0
  if op in ('auto_contrast', 'equalize', 'invert'):
    return ()
  if op == 'rotate':
    return (sign * m * 30.0,)
  if op == 'posterize':
    return (4 - int(m * 4),)
  if op == 'solarize':
    return (256 - int(m * 256),)
  if op == 'solarize_add':
    return (int(m * 110),)
  if op in ('color', 'contrast', 'brightness', 'sharpness'):
    return (1.0 + sign * m * 0.9,)
  if op in ('shear_x', 'shear_y'):
    return (sign * m * 0.3,)
  if op in ('translate_x_rel', 'translate_y_rel'):
    return (sign * m * translate_pct,)
  raise ValueError(f'Unknown RandAugment op {op!r}; known: {INCREASING_OPS}.')


def apply_op(image: Image.Image, op: str, args: tuple[float, ...],
             fill: tuple[int, ...] = fill_color(),
             resample: int = Image.BICUBIC) -> Image.Image:
  """One op on an RGB image, with PIL as timm calls it."""
  geometric = dict(resample=resample, fillcolor=fill)
  if op == 'auto_contrast':
    return ImageOps.autocontrast(image)
  if op == 'equalize':
    return ImageOps.equalize(image)
  if op == 'invert':
    return ImageOps.invert(image)
  if op == 'rotate':
    return image.rotate(args[0], **geometric)
  if op == 'posterize':
    # PIL's posterize lookup table; written out because PIL >= 10 refuses 0 bits (magnitude
    # 10 of the increasing variant), which older PIL turned into a black image.
    bits = int(args[0])
    if bits >= 8:
      return image
    mask = ~(2 ** (8 - bits) - 1)
    return image.point([i & mask for i in range(256)] * len(image.getbands()))
  if op == 'solarize':
    return ImageOps.solarize(image, args[0])
  if op == 'solarize_add':
    lut = [min(255, i + int(args[0])) if i < 128 else i for i in range(256)]
    return image.point(lut * len(image.getbands()))
  enhancers = dict(color=ImageEnhance.Color, contrast=ImageEnhance.Contrast,
                   brightness=ImageEnhance.Brightness, sharpness=ImageEnhance.Sharpness)
  if op in enhancers:
    return enhancers[op](image).enhance(args[0])
  w, h = image.size
  affine = dict(shear_x=(1, args[0], 0, 0, 1, 0) if op == 'shear_x' else None,
                shear_y=(1, 0, 0, args[0], 1, 0) if op == 'shear_y' else None,
                translate_x_rel=(1, 0, args[0] * w, 0, 1, 0) if op == 'translate_x_rel' else None,
                translate_y_rel=(1, 0, 0, 0, 1, args[0] * h) if op == 'translate_y_rel' else None)
  if op in affine:
    return image.transform(image.size, Image.AFFINE, affine[op], **geometric)
  raise ValueError(f'Unknown RandAugment op {op!r}; known: {INCREASING_OPS}.')


def draw_ops(rng: np.random.Generator, num_ops: int = 2, magnitude: float = 9.0,
             magnitude_std: float = 0.5, prob: float = 0.5) -> list[OpDraw]:
  """One image's RandAugment draws (ops with replacement, application, magnitude, sign)."""
  draws = []
  for op in rng.choice(len(INCREASING_OPS), num_ops, replace=True):
    name = INCREASING_OPS[int(op)]
    if rng.random() > prob:  # timm: skipped when random() > prob
      draws.append(OpDraw(name, False))
      continue
    m = float(rng.normal(magnitude, magnitude_std)) if magnitude_std > 0 else magnitude
    m = min(MAX_LEVEL, max(0.0, m))
    negate = bool(rng.random() > 0.5) if name in SIGNED_OPS else False
    draws.append(OpDraw(name, True, m, negate))
  return draws


def rand_augment(image: Image.Image, draws: list[OpDraw],
                 translate_pct: float = 0.45) -> Image.Image:
  """Applies `draws` (`draw_ops`, or a recorded draw) to an RGB image, in order."""
  for d in draws:
    if d.applied:
      image = apply_op(image, d.op, level_args(d.op, d.magnitude, d.negate, translate_pct))
  return image


def erase_box(rng: np.random.Generator, height: int, width: int, prob: float = 0.25,
              min_area: float = 0.02, max_area: float = 1 / 3, min_aspect: float = 0.3
              ) -> tuple[int, int, int, int] | None:
  """timm's RandomErasing box (top, left, h, w) for one image, or None (not erased)."""
  if rng.random() > prob:
    return None
  log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))
  for _ in range(10):
    area = rng.uniform(min_area, max_area) * height * width
    aspect = math.exp(rng.uniform(*log_aspect))
    h = int(round(math.sqrt(area * aspect)))
    w = int(round(math.sqrt(area / aspect)))
    if w < width and h < height:
      return (int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w)
  return None


def erase(x: np.ndarray, box: tuple[int, int, int, int] | None, values: np.ndarray) -> np.ndarray:
  """x (H, W, C) normalised float32 with box (top, left, h, w) replaced by values (h, w, C)."""
  if box is None:
    return x
  top, left, h, w = box
  out = x.copy()
  out[top:top + h, left:left + w] = values
  return out


def random_erasing(x: np.ndarray, rng: np.random.Generator, prob: float = 0.25) -> np.ndarray:
  """'pixel' mode RandomErasing of one normalised (H, W, C) float32 image."""
  box = erase_box(rng, x.shape[0], x.shape[1], prob)
  if box is None:
    return x
  values = rng.standard_normal((box[2], box[3], x.shape[2])).astype(x.dtype)
  return erase(x, box, values)
