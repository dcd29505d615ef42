"""check_reference on the evaluation fixture: the shipped one passes; a wrong number fails; a
variant with other label values and feature widths (official numbers carried over exactly)
passes too, so nothing is tied to the shipped sizes."""

import json
import pathlib

import numpy as np
import pytest

from capi_jax import check_reference
from capi_jax.reference import harness

FIXTURE = (pathlib.Path(__file__).parent / 'fixtures' / 'capi_eval_reference' /
           'capi_eval_small.npz')


@pytest.fixture(scope='module')
def arrays() -> dict[str, np.ndarray]:
  return harness.load_fixture(str(FIXTURE))


def _run(arrays, names):
  suite = harness.suite('capi_eval')
  return harness.run(arrays, 'capi_eval',
                             [c for c in suite.comparisons if c.name in names])


def test_shipped_fixture_passes(capsys):
  assert check_reference.main(['check_reference', str(FIXTURE)]) == 0
  out = capsys.readouterr().out
  for quantity in ('seg/knn/f32/k30_L2/pred_test', 'seg/pipeline/labels_logreg_mIoU',
                   'seg/logreg/coef', 'cls/run/batches', 'cls/run/final[patch]',
                   'cls/run/test2 accuracy', 'cls/transform_example/output_uint8',
                   'viz/joint/rgb'):
    assert quantity in out
  assert 'FAIL' not in out and 'skipped' not in out and out.rstrip().endswith('PASS')


def test_a_wrong_vote_fails(arrays):
  bad = dict(arrays)
  key = 'seg/knn/f32/k3_cosine/pred_val'
  bad[key] = arrays[key].copy()
  bad[key][5, 7] = (bad[key][5, 7] + 1) % 6
  report = _run(bad, ('seg k-NN',))
  assert not report.ok
  assert [r.quantity for r in report.results if not r.ok] == [key]


def _variant(arrays: dict[str, np.ndarray], extra_dims: int) -> dict[str, np.ndarray]:
  """The segmentation part with labels shifted by one (255 stays: labels now start at 1) and
  `extra_dims` zero feature channels: every official output carries over (votes and the
  logistic regression keep their order; zero channels change no distance and get zero
  weights)."""
  meta = json.loads(str(arrays['meta_json']))
  shift = lambda a: np.where(a == 255, 255, a + 1).astype(a.dtype)
  pad = lambda a: np.concatenate([a, np.zeros(a.shape[:-1] + (extra_dims,), a.dtype)], -1)
  out = {'meta_json': np.array(json.dumps({'seg': meta['seg'], 'cls': meta['cls']}))}
  for key, value in arrays.items():
    if not key.startswith('seg/') or key.startswith('seg/standardize/') or 'transform' in key:
      continue
    if 'labels' in key or 'pred' in key or 'metric_cases' in key or key == 'seg/logreg/train_y':
      value = shift(value)
    if key.startswith(('seg/features/', 'seg/std_features/')) or key.endswith('coef'):
      value = pad(value)
    out[key] = value
  return out


def test_variant_with_other_labels_and_widths_passes(arrays):
  report = _run(_variant(arrays, extra_dims=9), ('seg held-out split', 'seg patch-label rows',
                                                 'seg k-NN', 'seg logistic regression',
                                                 'seg metrics', 'seg pipeline'))
  assert report.ok, report.table()
  assert any(r.quantity == 'seg/pipeline/labels_knn_mIoU' for r in report.results)
