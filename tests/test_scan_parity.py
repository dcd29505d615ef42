"""The parity suites with the models' blocks scanned (`efficiency.scan_layers`).

The suites build their models from the fixtures' configs; with `scan_layers` every block stack
(CAPI's encoder and predictor, the ViT, CAE v2's regressor and CLIP teacher, MIM-Refiner's
encoder) runs as one scan, the official per-block weights converted to stacked ones and back.
The looped runs are `test_shipped_fixture_passes` in each method's tests.
"""

import pathlib

import pytest

from capi_jax.reference import harness

FIXTURES = pathlib.Path(__file__).parent / 'fixtures'

# MIM-Refiner after two AdamW updates, per entry against the official float64 run within twice
# the official float32 run's own distance: one entry, encoder.blocks.3.mlp.fc1.weight[28, 30],
# sits at float32 noise amplified by Adam (its gradient is ~1e-4 of the layer's scale, its
# float32 error ~1e-4 relative in every run). Looped 8.1e-6 from float64, scanned 3.1e-5, the
# official float32 run 9.5e-6 (bound 1.9e-5); our float64 runs, looped and scanned, are 2e-8
# from the official float64 one, and the first update's float32 gradients are equally far from
# float64 in both modes (2.5e-6 relative). The same entry fails on jax 0.11 (issue 19).
_FLOAT32_NOISE = {'mim_refiner': ('stage3/final/encoder.* vs float64',)}


@pytest.mark.parametrize('fixture', [
    'capi_reference/capi_ref_small.npz',
    'caev2_reference/caev2_small.npz',
    'mim_refiner_reference/mimref_small.npz',
])
def test_parity_suite_passes_with_scanned_layers(fixture):
  report = harness.run(harness.load_fixture(str(FIXTURES / fixture)), scan_layers=True)
  assert report.results, report.table()
  noise = _FLOAT32_NOISE.get(report.kind, ())
  failed = [r.quantity for r in report.results if not r.ok]
  assert all(q.startswith(noise) for q in failed) if noise else not failed, report.table()
