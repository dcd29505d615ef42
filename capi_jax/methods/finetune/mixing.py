"""timm's Mixup / CutMix ('batch' mode) with label smoothing: draws on the host, mixing on device.

As timm 0.3.2 `Mixup(mode='batch')` does it (CAE v2's / BEiT's fine-tuning): per batch, with
probability `prob` the batch is mixed with its reverse (`x.flip(0)`); when both alphas are > 0,
CutMix is chosen with probability `switch_prob`, else Mixup; lam ~ Beta(alpha, alpha). CutMix
pastes the reversed batch into a box of side int(side * sqrt(1 - lam)) centred at a uniform
pixel, clipped to the image, and corrects lam to 1 - box area / image area. Targets:
lam * smooth(y) + (1 - lam) * smooth(y reversed), smooth = one-hot with on 1 - s + s/C, off s/C.

`draw` runs on the host from a seeded numpy Generator (so a run is reproducible and a reference's
recorded draws can be replayed: build `MixParams` from them); `mix` is pure jnp, run in the
jitted step on the batch's `MixParams`.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


class MixParams(NamedTuple):
  """One batch's draw. lam: float32 () the weight of the batch itself (after CutMix's correction;
  1: no mixing); cutmix: bool (); box: int32 (4,) (top, bottom, left, right), rows top:bottom and
  columns left:right take the reversed batch (all 0 for Mixup)."""
  lam: np.ndarray
  cutmix: np.ndarray
  box: np.ndarray


def params(lam: float, cutmix: bool = False, box: tuple[int, int, int, int] = (0, 0, 0, 0)
           ) -> MixParams:
  return MixParams(np.float32(lam), np.bool_(cutmix), np.asarray(box, np.int32))


def cutmix_box(rng: np.random.Generator, height: int, width: int, lam: float
               ) -> tuple[tuple[int, int, int, int], float]:
  """timm's `rand_bbox` + lam correction: ((top, bottom, left, right), corrected lam)."""
  ratio = np.sqrt(1.0 - lam)
  cut_h, cut_w = int(height * ratio), int(width * ratio)
  cy, cx = int(rng.integers(0, height)), int(rng.integers(0, width))
  top, bottom = np.clip(cy - cut_h // 2, 0, height), np.clip(cy + cut_h // 2, 0, height)
  left, right = np.clip(cx - cut_w // 2, 0, width), np.clip(cx + cut_w // 2, 0, width)
  box = (int(top), int(bottom), int(left), int(right))
  return box, corrected_lam(box, height, width)


def corrected_lam(box: tuple[int, int, int, int], height: int, width: int) -> float:
  """1 - box area / image area (CutMix's lam after clipping, `correct_lam=True`)."""
  top, bottom, left, right = box
  return 1.0 - (bottom - top) * (right - left) / float(height * width)


def draw(rng: np.random.Generator, height: int, width: int, *, mixup_alpha: float,
         cutmix_alpha: float, prob: float = 1.0, switch_prob: float = 0.5) -> MixParams:
  """One batch's Mixup / CutMix parameters, timm's `_params_per_batch` order of decisions."""
  if mixup_alpha <= 0 and cutmix_alpha <= 0:
    raise ValueError('Mixup needs mixup_alpha > 0 or cutmix_alpha > 0.')
  if rng.random() >= prob:
    return params(1.0)
  if mixup_alpha > 0 and cutmix_alpha > 0:
    use_cutmix = bool(rng.random() < switch_prob)
  else:
    use_cutmix = cutmix_alpha > 0
  alpha = cutmix_alpha if use_cutmix else mixup_alpha
  lam = float(rng.beta(alpha, alpha))
  if not use_cutmix:
    return params(lam)
  box, lam = cutmix_box(rng, height, width, lam)
  return params(lam, True, box)


def smooth_one_hot(labels: Array, num_classes: int, smoothing: float) -> Array:
  """(batch,) int -> (batch, C) float32: on 1 - s + s/C, off s/C (timm's `one_hot`)."""
  off = smoothing / num_classes
  on = 1.0 - smoothing + off
  return jnp.where(jax.nn.one_hot(labels, num_classes, dtype=jnp.bool_), jnp.float32(on),
                   jnp.float32(off))


def mix(images: Array, labels: Array, p: MixParams, num_classes: int, smoothing: float
        ) -> tuple[Array, Array]:
  """Mixes a batch with its reverse; images (B, H, W, 3), labels (B,) -> (images, soft targets).

  Returns images in their dtype and (B, C) float32 targets. Needs an even batch (timm asserts
  it: with an odd one the middle sample is mixed with itself).
  """
  flipped = images[::-1]
  h, w = images.shape[1:3]
  rows = jnp.arange(h)[:, None]
  cols = jnp.arange(w)[None, :]
  top, bottom, left, right = p.box[0], p.box[1], p.box[2], p.box[3]
  in_box = (rows >= top) & (rows < bottom) & (cols >= left) & (cols < right)
  lam = jnp.asarray(p.lam, jnp.float32)
  # CutMix copies pixels (weight 0 or 1, exact); Mixup weighs every pixel by lam.
  weight = jnp.where(p.cutmix, jnp.where(in_box, 0.0, 1.0), lam)[None, :, :, None]
  weight = weight.astype(images.dtype)
  mixed = images * weight + flipped * (1 - weight)
  one_hot = smooth_one_hot(labels, num_classes, smoothing)
  targets = one_hot * lam + one_hot[::-1] * (1 - lam)
  return mixed.astype(images.dtype), targets


def draw_device(key: jax.Array, height: int, width: int, *, mixup_alpha: float,
                cutmix_alpha: float, prob: float = 1.0, switch_prob: float = 0.5) -> MixParams:
  """`draw` traced, from a JAX key (the training step's): the same distributions and box rule.

  Static choices (which alphas are on) stay Python; lam, the switch and the box are arrays.
  """
  if mixup_alpha <= 0 and cutmix_alpha <= 0:
    raise ValueError('Mixup needs mixup_alpha > 0 or cutmix_alpha > 0.')
  k_apply, k_switch, k_mix, k_cut, k_y, k_x = jax.random.split(key, 6)
  if mixup_alpha > 0 and cutmix_alpha > 0:
    use_cutmix = jax.random.uniform(k_switch) < switch_prob
  else:
    use_cutmix = jnp.asarray(cutmix_alpha > 0)
  lam_mixup = jax.random.beta(k_mix, mixup_alpha, mixup_alpha) if mixup_alpha > 0 else 1.0
  lam_cut = jax.random.beta(k_cut, cutmix_alpha, cutmix_alpha) if cutmix_alpha > 0 else 1.0
  ratio = jnp.sqrt(1.0 - jnp.asarray(lam_cut, jnp.float32))
  cut_h = jnp.floor(height * ratio).astype(jnp.int32)
  cut_w = jnp.floor(width * ratio).astype(jnp.int32)
  cy = jax.random.randint(k_y, (), 0, height)
  cx = jax.random.randint(k_x, (), 0, width)
  box = jnp.stack([jnp.clip(cy - cut_h // 2, 0, height), jnp.clip(cy + cut_h // 2, 0, height),
                   jnp.clip(cx - cut_w // 2, 0, width), jnp.clip(cx + cut_w // 2, 0, width)])
  area = ((box[1] - box[0]) * (box[3] - box[2])).astype(jnp.float32)
  lam = jnp.where(use_cutmix, 1.0 - area / (height * width), lam_mixup)
  applied = jax.random.uniform(k_apply) < prob
  return MixParams(jnp.where(applied, lam, 1.0).astype(jnp.float32), use_cutmix & applied,
                   jnp.where(applied & use_cutmix, box, 0).astype(jnp.int32))
