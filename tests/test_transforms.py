"""Image transforms against torchvision's on PIL images, bit for bit.

The expected pixels come from torchvision 0.20.1 with Pillow 11.0.0 (the official CAPI release's
pins), run by tests/fixtures/torchvision_transforms/make_fixture.py; the inputs are rebuilt here
from that file's integer formula. Pillow 10.4 and 12.0 give the same file; Pillow 13 (the
project's) would not: see `transforms.resize`.
"""

import importlib.util
import json
import pathlib

import numpy as np
import PIL
from PIL import Image
import pytest

from capi_jax.data import transforms
from capi_jax.evaluators import transforms as eval_transforms

_DIR = pathlib.Path(__file__).parent / 'fixtures' / 'torchvision_transforms'
_spec = importlib.util.spec_from_file_location('tv_fixture', _DIR / 'make_fixture.py')
tv_fixture = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tv_fixture)
FIXTURE = _DIR / 'torchvision_transforms.npz'
# After normalisation, official floats vs ours (ToTensor divides, we multiply-add): ~1e-7.
NORMALISED_ATOL = 1e-5


@pytest.fixture(scope='module')
def expected() -> dict[str, np.ndarray]:
  with np.load(FIXTURE) as data:
    return dict(data)


def _image(h, w, kind, seed) -> Image.Image:
  return Image.fromarray(tv_fixture.make_image(int(h), int(w), int(kind), int(seed)))


def _worst(pairs) -> float:
  """Largest absolute difference over (ours, expected) pairs (0 when all are equal)."""
  return max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max()
             for a, b in pairs)


def _official_normalised(table: np.ndarray, pixels: np.ndarray) -> np.ndarray:
  """torchvision's ToTensor + Normalize of uint8 pixels (..., 3), from the per-value table."""
  return table[0][pixels, np.arange(3)]


def test_square_resize_of_any_aspect_ratio_is_torchvision_exact(expected):
  pairs, normalised = [], []
  for i, (h, w, size, f, kind, seed) in enumerate(expected['square/params']):
    image = _image(h, w, kind, seed)
    pairs.append((np.asarray(transforms.resize(image, (size, size), Image.Resampling(f))),
                  expected[f'square/{i}']))
    if f == tv_fixture.BICUBIC:  # the segmentation image transform, Resize((R, R)) bicubic
      normalised.append((eval_transforms.seg_image(image, int(size)),
                         _official_normalised(expected['normalize/table'], expected[f'square/{i}'])))
  assert _worst(pairs) == 0
  assert _worst(normalised) < NORMALISED_ATOL


def test_shorter_side_resize_and_centre_crop_are_torchvision_exact(expected):
  pairs, normalised = [], []
  for i, (h, w, resize, crop, f, kind, seed) in enumerate(expected['shorter/params']):
    image = _image(h, w, kind, seed)
    out = transforms.center_crop(
        transforms.resize_shorter_side(image, int(resize), Image.Resampling(f)), int(crop))
    pairs.append((np.asarray(out), expected[f'shorter/{i}']))
    if f == tv_fixture.BICUBIC:  # classification's eval transform, Resize(256) + CenterCrop(224)
      normalised.append((eval_transforms.classif_eval(image, int(crop)),
                         _official_normalised(expected['normalize/table'],
                                              expected[f'shorter/{i}'])))
  assert _worst(pairs) == 0
  assert _worst(normalised) < NORMALISED_ATOL


def test_resized_crop_given_the_box_is_torchvision_exact(expected):
  pairs = []
  for i, (h, w, top, left, bh, bw, size, f, kind, seed) in enumerate(expected['crop/params']):
    out = transforms.resized_crop(_image(h, w, kind, seed), (top, left, bh, bw), int(size),
                                  Image.Resampling(f))
    pairs.append((np.asarray(out), expected[f'crop/{i}']))
  assert _worst(pairs) == 0


def test_official_pipelines_whole(expected):
  table = expected['normalize/table']
  ramp = np.repeat(np.arange(256, dtype=np.uint8)[None, :, None], 3, axis=2)
  assert _worst([(transforms.normalize(ramp), table)]) < NORMALISED_ATOL
  for i, (h, w, size, kind, seed) in enumerate(expected['pipeline/seg/params']):
    out = eval_transforms.seg_image(_image(h, w, kind, seed), int(size))
    np.testing.assert_allclose(out, expected[f'pipeline/seg/{i}'], rtol=0, atol=NORMALISED_ATOL)
  for i, (h, w, _, crop, kind, seed) in enumerate(expected['pipeline/classif_eval/params']):
    out = eval_transforms.classif_eval(_image(h, w, kind, seed), int(crop))
    np.testing.assert_allclose(out, expected[f'pipeline/classif_eval/{i}'], rtol=0,
                               atol=NORMALISED_ATOL)
  for i, (h, w, size, n_labels, seed) in enumerate(expected['pipeline/seg_target/params']):
    mask = Image.fromarray(tv_fixture.label_map(int(h), int(w), int(n_labels), int(seed)), 'L')
    np.testing.assert_array_equal(eval_transforms.seg_target(mask, int(size)),
                                  expected[f'pipeline/seg_target/{i}'])


def _height_pass_first_in_pillow_13(in_hw, out_hw) -> bool:
  """Pillow 13's rule (ImagingResampleInner): the vertical pass first."""
  lost_h, lost_w = in_hw[0] - out_hw[0], in_hw[1] - out_hw[1]
  return lost_h > 0 and lost_h > 2 * lost_w


def test_the_fixture_exercises_both_pass_orders(expected):
  """Cases where Pillow 13 changes the order (one axis shrinking while the other grows among
  them) and cases where it does not, for each transform."""
  square = [((h, w), (s, s)) for h, w, s, *_ in expected['square/params']]
  shorter = [((h, w), (int(r * h / w), r) if w <= h else (r, int(r * w / h)))
             for h, w, r, *_ in expected['shorter/params']]
  crop = [((bh, bw), (s, s)) for *_, bh, bw, s, _, _, _ in expected['crop/params']]
  for cases in (square, shorter, crop):
    flipped = [_height_pass_first_in_pillow_13(*c) for c in cases]
    assert 5 <= sum(flipped) <= len(cases) - 5
  assert sum(h > s and w < s for (h, w), (s, _) in square) >= 10


@pytest.mark.parametrize('mode', ['L', 'RGB', 'RGBA', 'LA', 'I;16', 'I', 'F'])
def test_resize_is_pils_own_where_pillow_keeps_the_order(mode):
  # The width loses more than the height: every Pillow runs the horizontal pass first, so
  # `resize` must be exactly one `Image.resize` call (premultiplied alpha, 16-bit, float modes).
  pixels = tv_fixture.make_image(37, 53, tv_fixture.NOISE, 9, channels=4)
  image = Image.fromarray(pixels, 'RGBA').convert(mode)
  for size in ((20, 30), (19, 44), (53, 37), (53, 30), (11, 37)):
    for f in (Image.Resampling.BICUBIC, Image.Resampling.BILINEAR, Image.Resampling.LANCZOS):
      ours, pils = transforms.resize(image, size, f), image.resize(size, f)
      assert ours.mode == pils.mode and ours.size == pils.size
      np.testing.assert_array_equal(np.asarray(ours), np.asarray(pils))
  assert transforms.resize(image, image.size) is not image


def test_fixture_regenerates_with_torchvision(expected):
  """Where torchvision imports, beside Pillow <= 12 (the order the file records), every key is
  rebuilt and compared: the formulas and parameters here are the ones the file was made from."""
  if importlib.util.find_spec('torchvision') is None:
    pytest.skip('torchvision is not installed')
  if int(PIL.__version__.split('.')[0]) >= 13:
    pytest.skip(f'Pillow {PIL.__version__} resizes in another pass order than the fixture '
                'records (made with Pillow 11.0.0)')
  rebuilt = tv_fixture.build()
  assert sorted(rebuilt) == sorted(expected)
  for key in expected:
    if key != 'meta_json':
      np.testing.assert_array_equal(rebuilt[key], expected[key], err_msg=key)
  assert json.loads(str(expected['meta_json']))['pillow'] == '11.0.0'
