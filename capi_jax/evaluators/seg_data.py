r"""Segmentation datasets from their released folder layouts: (image, mask) pairs by index.

`make_seg_set(spec, split)` understands:
- `ade20k:ROOT`: ADEChallengeData2016 (ROOT is it or holds it): `images/{training,validation}/
  *.jpg` with `annotations/<split>/<stem>.png`. Labels 0 ("other") and 1..150. Sorted by file
  name (the official reader takes the file system's unsorted glob order, which decides which
  images its held-out split draws; sorting is the reproducible choice).
- `voc2012:ROOT`: the official download layout, `ROOT/original/VOCdevkit/VOC2012` and the SBD
  release `ROOT/aug/benchmark_RELEASE/dataset` (also found directly under ROOT). Splits 'train',
  'val' and 'trainaug' = VOC train + SBD train + SBD val, concatenated as the official reader
  does (duplicates kept; SBD val overlaps VOC val). VOC masks are palette PNGs; SBD's
  `cls/<id>.mat` masks are read with scipy (`GTcls.Segmentation`). 255 marks boundaries.
- `cityscapes:ROOT`: `leftImg8bit/<split>/<city>/*_leftImg8bit.png` with
  `gtFine/<split>/<city>/*_gtFine_labelIds.png`, mapped to the 19 train ids (others 255). The
  official release has no Cityscapes reader.
- `folder:ROOT`: any image + mask folder in the ADE20K layout, `images/<split>/*.{jpg,png}` with
  `annotations/<split>/<stem>.png` holding one label per pixel.
- `fashion_mnist_scenes[:DIR]`: scenes composed offline from Fashion-MNIST items (`compose_scenes`),
  splits 'train' and 'test'; label 0 is background, items carry their class + 1.
Masks are returned as PIL images; the protocol applies the official target transform.
Every ROOT may be local or gs:// (`base.storage`): each folder is listed once (one paged listing on
GCS, not a request per file), files are read whole.
"""

from collections.abc import Sequence
import dataclasses
import io
import os
import typing

from etils import epath
import numpy as np
from PIL import Image

from capi_jax.base import storage
from capi_jax.data import sources
from capi_jax.evaluators import datasets
from capi_jax.evaluators import transforms

IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png')
# Cityscapes labelIds -> trainIds (cityscapesScripts' labels.py); every other id is ignored.
CITYSCAPES_TRAIN_IDS = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10,
                        24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
MASK_THRESHOLD = 25  # uint8 intensity: Fashion-MNIST backgrounds are exactly 0, items > ~30.
SCENES = {'train': (500, 0), 'test': (150, 1)}  # Scenes per split and their seed.
SCENE_SIZE = 56  # Twice Fashion-MNIST's side: items at about their pretraining size.


@dataclasses.dataclass(frozen=True)
class SegSet:
  """Images and masks by index: `set[i] -> (RGB PIL image, PIL mask)`."""
  name: str
  image_paths: Sequence[str]
  mask_paths: Sequence[str]

  def __len__(self) -> int:
    return len(self.image_paths)

  def __getitem__(self, index: int) -> tuple[Image.Image, Image.Image]:
    return self.image(index), _open_mask(self.mask_paths[index])

  def image(self, index: int) -> Image.Image:
    return Image.open(_readable(self.image_paths[index])).convert('RGB')


def _readable(path: str) -> str | typing.BinaryIO:
  """What PIL and scipy open: a local path as is, a gs:// object's bytes."""
  return io.BytesIO(storage.path(path).read_bytes()) if storage.is_gcs(path) else path


def _open_mask(path: str) -> Image.Image:
  if path.endswith('.mat'):
    import scipy.io  # pylint: disable=g-import-not-at-top
    mat = scipy.io.loadmat(_readable(path))
    return Image.fromarray(mat['GTcls'][0]['Segmentation'][0].astype(np.uint8))
  if path.endswith('_gtFine_labelIds.png'):
    ids = np.asarray(Image.open(_readable(path)))
    table = np.full(256, 255, np.uint8)
    for label_id, train_id in CITYSCAPES_TRAIN_IDS.items():
      table[label_id] = train_id
    return Image.fromarray(table[ids])
  return Image.open(_readable(path))


class ArraySegSet:
  """In-memory scenes: uint8 images (n, H, W) or (n, H, W, 3) and masks (n, H, W)."""

  def __init__(self, name: str, images: np.ndarray, masks: np.ndarray):
    self.name, self.images, self.masks = name, images, masks

  def __len__(self) -> int:
    return len(self.images)

  def image(self, index: int) -> Image.Image:
    return Image.fromarray(self.images[index]).convert('RGB')

  def __getitem__(self, index: int) -> tuple[Image.Image, Image.Image]:
    return self.image(index), Image.fromarray(self.masks[index])


def _files(directory: epath.Path, what: str) -> list[str]:
  """The files below `directory` ('/'-separated, relative, sorted); an error if it is no folder."""
  names = list(storage.list_files(directory))
  if not names:
    raise FileNotFoundError(f'{what}: {directory} is not a folder or holds no file. Check the '
                            'dataset root and the split name (see '
                            'capi_jax/evaluators/seg_data.py for the layouts).')
  return names


def _without_file(paths: Sequence[epath.Path], top: epath.Path) -> list[epath.Path]:
  """The `paths` (below `top`) that are no file, from one listing of `top`."""
  present = set(storage.list_files(top))
  return [p for p in paths if os.fspath(p)[len(os.fspath(top)) + 1:] not in present]


def _paired(image_dir: epath.Path, mask_dir: epath.Path, name: str,
            mask_suffix: str = '.png') -> SegSet:
  """Every image directly in image_dir (sorted) with mask_dir/<stem><mask_suffix>."""
  images = [image_dir / f for f in _files(image_dir, name)
            if '/' not in f and os.path.splitext(f)[1].lower() in IMAGE_SUFFIXES]
  if not images:
    raise FileNotFoundError(f'{name}: no {"/".join(IMAGE_SUFFIXES)} image in {image_dir}.')
  masks = [mask_dir / (p.stem + mask_suffix) for p in images]
  missing = _without_file(masks, mask_dir)
  if missing:
    raise FileNotFoundError(f'{name}: {len(missing)} images have no mask, e.g. {missing[0]}.')
  return SegSet(name, [os.fspath(p) for p in images], [os.fspath(m) for m in masks])


def ade20k(root: str, split: str) -> SegSet:
  base = storage.path(root)
  if (base / 'ADEChallengeData2016').is_dir():
    base = base / 'ADEChallengeData2016'
  return _paired(base / 'images' / split, base / 'annotations' / split, f'ade20k:{split}')


def _find(root: epath.Path, relative: str) -> epath.Path:
  for candidate in (root / relative, root / 'original' / relative, root / 'aug' / relative):
    if candidate.is_dir():
      return candidate
  raise FileNotFoundError(f'No {relative} under {root} (or its original/ and aug/ folders, the '
                          'official download layout).')


def voc2012(root: str, split: str) -> SegSet:
  base = storage.path(root)
  voc = _find(base, 'VOCdevkit/VOC2012')
  ids = lambda path: path.read_text().split()
  voc_split = lambda s: [(voc / 'JPEGImages' / f'{i}.jpg', voc / 'SegmentationClass' / f'{i}.png')
                         for i in ids(voc / 'ImageSets' / 'Segmentation' / f'{s}.txt')]
  if split in ('train', 'val'):
    pairs = voc_split(split)
  elif split == 'trainaug':
    sbd = _find(base, 'benchmark_RELEASE/dataset')
    pairs = voc_split('train') + [(sbd / 'img' / f'{i}.jpg', sbd / 'cls' / f'{i}.mat')
                                  for s in ('train', 'val') for i in ids(sbd / f'{s}.txt')]
  else:
    raise ValueError(f"VOC2012 has splits 'train', 'val' and 'trainaug', not {split!r}.")
  return SegSet(f'voc2012:{split}', [os.fspath(i) for i, _ in pairs],
                [os.fspath(m) for _, m in pairs])


def cityscapes(root: str, split: str) -> SegSet:
  base = storage.path(root)
  image_root, mask_root = base / 'leftImg8bit' / split, base / 'gtFine' / split
  found = [f.split('/') for f in _files(image_root, f'cityscapes:{split}')]
  images = [image_root / city / name for city, name in sorted(  # by city, then name
      f for f in found if len(f) == 2 and f[1].endswith('_leftImg8bit.png'))]
  if not images:
    raise FileNotFoundError(f'cityscapes:{split}: no */*_leftImg8bit.png under {image_root}.')
  masks = [mask_root / p.parent.name /
           p.name.replace('_leftImg8bit.png', '_gtFine_labelIds.png') for p in images]
  missing = _without_file(masks, mask_root)
  if missing:
    raise FileNotFoundError(f'cityscapes:{split}: {len(missing)} images have no gtFine labelIds '
                            f'mask, e.g. {missing[0]}.')
  return SegSet(f'cityscapes:{split}', [os.fspath(p) for p in images],
                [os.fspath(m) for m in masks])


def folder(root: str, split: str) -> SegSet:
  base = storage.path(root)
  return _paired(base / 'images' / split, base / 'annotations' / split, f'folder:{split}')


def compose_scenes(items: np.ndarray, item_labels: np.ndarray, *, n_scenes: int, canvas: int,
                   seed: int, items_per_scene: tuple[int, int] = (1, 3),
                   item_scale: tuple[float, float] = (0.4, 0.6)) -> tuple[np.ndarray, np.ndarray]:
  """Scenes of Fashion-MNIST items on a black canvas, with per-pixel labels.

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
      item = np.asarray(Image.fromarray(items[i]).resize((side, side), Image.Resampling.BILINEAR))
      y, x = rng.integers(0, canvas - side + 1, size=2)
      mask = item > MASK_THRESHOLD
      images[s, y:y + side, x:x + side][mask] = item[mask]
      labels[s, y:y + side, x:x + side][mask] = item_labels[i] + 1
  return images, labels


def fashion_mnist_scenes(directory: str, split: str) -> ArraySegSet:
  if split not in SCENES:
    raise ValueError(f'fashion_mnist_scenes has splits {sorted(SCENES)}, not {split!r}.')
  items = sources.FashionMnistSource(directory or sources.FASHION_MNIST_DIR, split)
  n_scenes, seed = SCENES[split]
  images, masks = compose_scenes(items.images, items.labels, n_scenes=n_scenes,
                                 canvas=SCENE_SIZE, seed=seed)
  return ArraySegSet(f'fashion_mnist_scenes:{split}', images, masks)


READERS = {'ade20k': ade20k, 'voc2012': voc2012, 'cityscapes': cityscapes, 'folder': folder,
           'fashion_mnist_scenes': fashion_mnist_scenes}


def make_seg_set(spec: str, split: str) -> SegSet | ArraySegSet:
  """The segmentation set named by `spec` ('<reader>:<root>', see the module docstring)."""
  kind, _, root = spec.partition(':')
  if kind not in READERS or (not root and kind != 'fashion_mnist_scenes'):
    raise ValueError(f'Unknown segmentation dataset {spec!r}: use one of ade20k:ROOT, '
                     'voc2012:ROOT, cityscapes:ROOT, folder:ROOT, fashion_mnist_scenes[:DIR].')
  return READERS[kind](root, split)


@dataclasses.dataclass(frozen=True)
class _Transformed:
  """Position -> {'images': official image transform, 'labels': official target transform,
  'index', 'valid'}; position -1 (padding) gives a blank invalid row."""
  dataset: SegSet | ArraySegSet
  resolution: int
  with_masks: bool

  def __call__(self, position: int) -> dict[str, np.ndarray]:
    r = self.resolution
    if position < 0:
      out = {'images': np.zeros((r, r, 3), np.float32), 'index': np.int64(-1),
             'valid': np.bool_(False)}
      return {**out, 'labels': np.zeros((r, r), np.uint8)} if self.with_masks else out
    out = {'index': np.int64(position), 'valid': np.bool_(True)}
    if not self.with_masks:
      return {'images': transforms.seg_image(self.dataset.image(position), r), **out}
    image, mask = self.dataset[position]
    return {'images': transforms.seg_image(image, r), 'labels': transforms.seg_target(mask, r),
            **out}


def batches(dataset: SegSet | ArraySegSet, positions: Sequence[int], resolution: int,
            global_batch: int, *, num_workers: int, with_masks: bool = True
            ) -> datasets.Batches:
  """This process's rows of the global batches of `positions` (`datasets.batches`): {'images'
  (b, R, R, 3) float32, ['labels' (b, R, R) uint8], 'index' (b,), 'valid' (b,)}, for
  `Backbone.extract`."""
  return datasets.batches(dataset.name, np.asarray(positions, np.int64), global_batch,
                          _Transformed(dataset, resolution, with_masks),
                          num_workers=num_workers)
