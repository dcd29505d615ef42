"""Semantic segmentation protocol on frozen patch features, and the data it runs on.

Protocol (`evaluate_segmentation`), as in the paper: features are per patch, labels per pixel.
- Training targets per patch are the class fractions of its valid pixels (ignore labels dropped);
  patches with no valid pixel are left out. This is what a per-pixel loss on nearest-upsampled
  patch logits would see, at a fraction of the cost.
- k-NN: every test patch gets the (soft) votes of its k nearest training patches, cosine
  (temperature-weighted) or L2 (uniform); linear: softmax regression over the lr x wd grid.
- Predictions: patch scores are bilinearly upsampled to pixels, argmax over the non-ignored
  classes; mIoU (mean over classes present in labels or predictions) and pixel accuracy are
  computed on pixels whose label is not ignored.
- Hyper-parameters (k x metric for k-NN, lr x wd for linear) are chosen on a held-out fraction of
  the training images; the chosen one is reported on test.

Data:
- `compose_scenes`: real-pixel scenes built offline from Fashion-MNIST items pasted on a black
  canvas, deterministic from a seed. Label 0 is background and item pixels (intensity above
  `MASK_THRESHOLD`) carry their class + 1, the topmost item winning where items overlap. With the
  default `seg_ignore_labels = (0, 255)` background is ignored, as ADE20K's "other" label 0 is:
  the task is to name the garment under each of its pixels.
- `load_folder`: an image + mask folder in the ADE20K layout (`images/<split>/*.jpg|png` and
  `annotations/<split>/<same stem>.png`, one class index per pixel).
"""

from collections.abc import Sequence
import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from capi_jax.evaluators import probes

MASK_THRESHOLD = 25  # uint8 intensity: Fashion-MNIST backgrounds are exactly 0, items > ~30.
FASHION_MNIST_SEG_CLASSES = 11  # Background 0 + the ten Fashion-MNIST classes.


# ----------------------------------------------------------------------------------------------
# Data.


def _resize(image: np.ndarray, size: tuple[int, int], resample: int) -> np.ndarray:
  """uint8 image (H, W[, C]) -> (size[0], size[1][, C])."""
  return np.asarray(Image.fromarray(image).resize((size[1], size[0]), resample))


def compose_scenes(items: np.ndarray, item_labels: np.ndarray, *, n_scenes: int,
                   canvas: int, seed: int, items_per_scene: tuple[int, int] = (2, 4),
                   item_scale: tuple[float, float] = (0.35, 0.6)) -> tuple[np.ndarray, np.ndarray]:
  """Scenes of several Fashion-MNIST items on a black canvas, with per-pixel labels.

  Args:
    items: (n_items, 28, 28) uint8 grey items (white on black).
    item_labels: (n_items,) int classes in [0, 10).
    n_scenes: scenes to make.
    canvas: side of the square scenes in pixels.
    seed: everything (items drawn, sizes, positions) follows from it.
    items_per_scene: inclusive range of the number of items in a scene.
    item_scale: range of an item's side as a fraction of the canvas side.

  Returns:
    (images (n_scenes, canvas, canvas) uint8, labels (n_scenes, canvas, canvas) uint8 with 0 for
    background and class + 1 on item pixels; later items are pasted over earlier ones).
  """
  rng = np.random.default_rng(seed)
  images = np.zeros((n_scenes, canvas, canvas), np.uint8)
  labels = np.zeros((n_scenes, canvas, canvas), np.uint8)
  for s in range(n_scenes):
    for _ in range(rng.integers(items_per_scene[0], items_per_scene[1] + 1)):
      i = rng.integers(len(items))
      side = int(round(canvas * rng.uniform(*item_scale)))
      item = _resize(items[i], (side, side), Image.BILINEAR)
      y, x = rng.integers(0, canvas - side + 1, size=2)
      mask = item > MASK_THRESHOLD
      images[s, y:y + side, x:x + side][mask] = item[mask]
      labels[s, y:y + side, x:x + side][mask] = item_labels[i] + 1
  return images, labels


def _split_dir(parent: pathlib.Path, split: str) -> pathlib.Path:
  # ADE20K names its splits 'training' and 'validation'; other folders use 'train'/'val'/'test'.
  aliases = {'train': ('train', 'training'), 'validation': ('validation', 'val', 'test'),
             'test': ('test', 'validation', 'val')}
  for name in aliases.get(split, (split,)):
    if (parent / name).is_dir():
      return parent / name
  raise FileNotFoundError(f'No {split!r} split under {parent}: expected one of the folders '
                          f'{aliases.get(split, (split,))}.')


def _resize_crop(image: np.ndarray, size: int, resample: int) -> np.ndarray:
  """Shorter side to `size`, then the central size x size crop."""
  h, w = image.shape[:2]
  scale = size / min(h, w)
  nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
  image = _resize(image, (nh, nw), resample)
  top, left = (nh - size) // 2, (nw - size) // 2
  return image[top:top + size, left:left + size]


def load_folder(root: str, split: str, image_size: int,
                max_images: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Images and masks of an ADE20K-style folder, resized and centre-cropped to image_size.

  Args:
    root: folder holding `images/<split>/` and `annotations/<split>/`.
    split: 'train' or 'validation' (ADE20K's 'training' / 'validation' are found too).
    image_size: output side; images resize bilinearly, masks with nearest neighbour.
    max_images: keep the first max_images (sorted by name); 0 = all.

  Returns:
    (images (n, image_size, image_size, 3) uint8, labels (n, image_size, image_size) uint8).
  """
  root_path = pathlib.Path(root)
  image_dir = _split_dir(root_path / 'images', split)
  mask_dir = _split_dir(root_path / 'annotations', split)
  paths = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in ('.jpg', '.jpeg', '.png'))
  if max_images:
    paths = paths[:max_images]
  if not paths:
    raise FileNotFoundError(f'No .jpg/.png images in {image_dir}.')
  images, labels = [], []
  for path in paths:
    mask_path = mask_dir / (path.stem + '.png')
    if not mask_path.exists():
      raise FileNotFoundError(f'Image {path} has no mask {mask_path}.')
    images.append(_resize_crop(np.asarray(Image.open(path).convert('RGB')), image_size,
                               Image.BILINEAR))
    labels.append(_resize_crop(np.asarray(Image.open(mask_path)), image_size, Image.NEAREST))
  return np.stack(images), np.stack(labels)


# ----------------------------------------------------------------------------------------------
# Protocol.


def _valid(labels: np.ndarray, num_classes: int, ignore_labels: Sequence[int]) -> np.ndarray:
  return (labels < num_classes) & ~np.isin(labels, np.asarray(ignore_labels))


def patch_targets(labels: np.ndarray, grid: tuple[int, int], num_classes: int,
                  ignore_labels: Sequence[int]) -> np.ndarray:
  """Class fractions of the valid pixels under each patch.

  Args:
    labels: (n, H, W) int pixel labels; H, W multiples of the grid.
    grid: (h, w) patches.
    num_classes: label values are in [0, num_classes) (others must be ignored).
    ignore_labels: labels that count for nothing.

  Returns:
    (n, h, w, num_classes) float32; all zeros where a patch has no valid pixel.
  """
  n, height, width = labels.shape
  h, w = grid
  if height % h or width % w:
    raise ValueError(f'Label size {height}x{width} is not a multiple of the patch grid {h}x{w}.')
  patch_row = np.arange(height) // (height // h)
  patch_col = np.arange(width) // (width // w)
  patch = (np.arange(n)[:, None, None] * h + patch_row[None, :, None]) * w + patch_col[None, None]
  valid = _valid(labels, num_classes, ignore_labels)
  counts = np.bincount(patch[valid] * num_classes + labels[valid].astype(np.int64),
                       minlength=n * h * w * num_classes).reshape(n, h, w, num_classes)
  total = counts.sum(-1, keepdims=True)
  return (counts / np.maximum(total, 1)).astype(np.float32)


@functools.partial(jax.jit, static_argnames=('size',))
def _upsampled_argmax(scores: jax.Array, class_ok: jax.Array, *, size: tuple[int, int]
                      ) -> jax.Array:
  """Patch scores (n, h, w, C) -> pixel predictions (n, *size), never an ignored class."""
  scores = scores / jnp.maximum(scores.sum(-1, keepdims=True), 1e-12)
  up = jax.image.resize(scores, (scores.shape[0], *size, scores.shape[-1]), 'bilinear')
  return jnp.where(class_ok, up, -jnp.inf).argmax(-1)


def confusion(scores: np.ndarray, labels: np.ndarray, num_classes: int,
              ignore_labels: Sequence[int]) -> np.ndarray:
  """(num_classes, num_classes) pixel confusion counts [label, prediction] over valid pixels.

  Args:
    scores: (n, h, w, num_classes) non-negative patch scores (votes or probabilities).
    labels: (n, H, W) pixel labels.
    num_classes: classes.
    ignore_labels: labels never predicted and not counted.
  """
  class_ok = ~np.isin(np.arange(num_classes), np.asarray(ignore_labels))
  pred = np.asarray(_upsampled_argmax(jnp.asarray(scores), jnp.asarray(class_ok),
                                      size=labels.shape[1:]))
  valid = _valid(labels, num_classes, ignore_labels)
  return np.bincount(labels[valid].astype(np.int64) * num_classes + pred[valid],
                     minlength=num_classes ** 2).reshape(num_classes, num_classes)


def scores_from_confusion(conf: np.ndarray) -> dict[str, float]:
  """{'miou', 'pixel_acc'} from confusion counts; mIoU over classes in labels or predictions."""
  tp = np.diag(conf).astype(np.float64)
  union = conf.sum(0) + conf.sum(1) - tp
  present = union > 0
  return {'miou': float((tp[present] / union[present]).mean()) if present.any() else 0.0,
          'pixel_acc': float(tp.sum() / max(conf.sum(), 1))}


def _chunked_confusion(score_fn, features: np.ndarray, labels: np.ndarray, num_classes: int,
                       ignore_labels: Sequence[int], chunk: int) -> np.ndarray:
  """Sum of confusions of score_fn(features chunk) -> (n, h, w, C), `chunk` images at a time."""
  conf = 0
  for start in range(0, len(features), chunk):
    conf = conf + confusion(score_fn(features[start:start + chunk]), labels[start:start + chunk],
                            num_classes, ignore_labels)
  return conf


def _knn_search(fit_x: np.ndarray, fit_t: np.ndarray, held_feats: np.ndarray,
                held_labels: np.ndarray, test_feats: np.ndarray, test_labels: np.ndarray, *,
                num_classes: int, ignore_labels: Sequence[int], ks: Sequence[int],
                temperature: float, chunk: int) -> dict[str, float]:
  """k-NN over ks x {cosine, l2}: chosen on held-out mIoU, reported on test."""
  ks = tuple(k for k in ks if k <= len(fit_x))

  def confusions(index, feats, labels):
    """(len(ks), C, C): one k-NN search gives the votes of every k."""
    total = 0
    for start in range(0, len(feats), chunk):
      f = feats[start:start + chunk]
      votes = index(f.reshape(-1, f.shape[-1])).reshape(len(ks), *f.shape[:-1], num_classes)
      total = total + np.stack([confusion(v, labels[start:start + chunk], num_classes,
                                          ignore_labels) for v in votes])
    return total

  best = None
  for metric in ('cosine', 'l2'):
    index = probes.knn_index(fit_x, fit_t, ks=ks, num_classes=num_classes,
                             temperature=temperature, metric=metric)
    for k, conf in zip(ks, confusions(index, held_feats, held_labels)):
      held = scores_from_confusion(conf)['miou']
      if best is None or held > best[0]:
        best = (held, metric, k, index)
  held, metric, k, index = best
  test_conf = confusions(index, test_feats, test_labels)[ks.index(k)]
  return {**scores_from_confusion(test_conf), 'held_out_miou': held, 'k': k, 'metric': metric}


def _linear_search(fit_x: np.ndarray, fit_t: np.ndarray, held_feats: np.ndarray,
                   held_labels: np.ndarray, test_feats: np.ndarray, test_labels: np.ndarray, *,
                   num_classes: int, ignore_labels: Sequence[int], lrs: Sequence[float],
                   wds: Sequence[float], iters: int, batch_size: int, seed: int,
                   chunk: int) -> dict[str, float]:
  """Softmax regression over the lr x wd grid: chosen on held-out mIoU, reported on test."""
  grid, norm, grid_lr, grid_wd = probes.fit_grid(
      probes.linear_apply, probes.linear_init(fit_x.shape[-1], num_classes), fit_x, fit_t,
      lrs=lrs, wds=wds, iters=iters, batch_size=batch_size, seed=seed)

  def probabilities(g):
    params = jax.tree.map(lambda p: p[g], grid)
    return lambda f: np.asarray(jax.nn.softmax(probes.linear_apply(params, norm(f))))

  held = [scores_from_confusion(_chunked_confusion(
      probabilities(g), held_feats, held_labels, num_classes, ignore_labels, chunk))['miou']
          for g in range(len(grid_lr))]
  best = int(np.argmax(held))
  test_conf = _chunked_confusion(probabilities(best), test_feats, test_labels, num_classes,
                                 ignore_labels, chunk)
  return {**scores_from_confusion(test_conf), 'held_out_miou': held[best],
          'lr': float(grid_lr[best]), 'wd': float(grid_wd[best])}


def evaluate_segmentation(train_feats: np.ndarray, train_labels: np.ndarray,
                          test_feats: np.ndarray, test_labels: np.ndarray, *, num_classes: int,
                          ignore_labels: Sequence[int], knn_ks: Sequence[int],
                          lrs: Sequence[float], wds: Sequence[float], iters: int,
                          batch_size: int, held_out_fraction: float, seed: int = 0,
                          temperature: float = 0.07, max_train_patches: int = 500_000,
                          chunk: int = 64) -> dict[str, dict[str, float]]:
  """k-NN and linear segmentation of patch features, chosen on held-out train, scored on test.

  Args:
    train_feats: (n_train, h, w, dim) patch features.
    train_labels: (n_train, H, W) pixel labels, H and W multiples of h and w.
    test_feats: (n_test, h, w, dim).
    test_labels: (n_test, H, W).
    num_classes: label values used are in [0, num_classes).
    ignore_labels: pixel labels that are neither trained on nor scored (e.g. (0, 255)).
    knn_ks: neighbour counts tried.
    lrs, wds: the linear classifier's grid.
    iters, batch_size: the linear classifier's AdamW steps and patches per step.
    held_out_fraction: fraction of the training images used to choose hyper-parameters.
    seed: held-out split, key subsampling and minibatches.
    temperature: cosine k-NN vote temperature.
    max_train_patches: at most this many training patches (random) serve as k-NN keys and
      linear training samples, which bounds the cost on large datasets.
    chunk: images scored at once.

  Returns:
    {'knn': {'miou', 'pixel_acc', 'held_out_miou', 'k', 'metric'},
     'linear': {'miou', 'pixel_acc', 'held_out_miou', 'lr', 'wd'}}, mIoU and accuracy in [0, 1].
  """
  fit, held = probes.held_out_split(len(train_feats), held_out_fraction, seed)
  targets = patch_targets(train_labels[fit], train_feats.shape[1:3], num_classes, ignore_labels)
  fit_x = train_feats[fit].reshape(-1, train_feats.shape[-1])
  fit_t = targets.reshape(-1, num_classes)
  keep = np.flatnonzero(fit_t.sum(-1) > 0)
  if len(keep) > max_train_patches:
    keep = np.sort(np.random.default_rng(seed).choice(keep, max_train_patches, replace=False))
  if not len(keep):
    raise ValueError('No training patch has a non-ignored pixel: check seg_ignore_labels and '
                     'the label values of the segmentation set.')
  fit_x, fit_t = fit_x[keep], fit_t[keep]
  common = dict(num_classes=num_classes, ignore_labels=ignore_labels, chunk=chunk)
  splits = (fit_x, fit_t, train_feats[held], train_labels[held], test_feats, test_labels)
  return {
      'knn': _knn_search(*splits, ks=knn_ks, temperature=temperature, **common),
      'linear': _linear_search(*splits, lrs=lrs, wds=wds, iters=iters, batch_size=batch_size,
                               seed=seed, **common),
  }
