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


@pytest.mark.parametrize('fixture', [
    'capi_reference/capi_ref_small.npz',
    'caev2_reference/caev2_small.npz',
    'mim_refiner_reference/mimref_small.npz',
])
def test_parity_suite_passes_with_scanned_layers(fixture):
  report = harness.run(harness.load_fixture(str(FIXTURES / fixture)), scan_layers=True)
  assert report.results and report.ok, report.table()
