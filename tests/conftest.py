"""Test setup: 8 fake CPU devices for the whole session (set before JAX is imported).

Single-device tests build their mesh from `jax.devices()[:1]`; sharded tests use all 8.
"""

import os
import pathlib

os.environ['XLA_FLAGS'] = (
    os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import pytest  # pylint: disable=g-import-not-at-top

import expected_skips  # pylint: disable=g-import-not-at-top
import gcs_netns  # pylint: disable=g-import-not-at-top

FIXTURE = pathlib.Path(__file__).parent / 'fixtures' / 'capi_reference' / 'capi_ref_small.npz'


@pytest.fixture(scope='session')
def fixture_path() -> pathlib.Path:
  """The official PyTorch release's numbers for a small random model (see fixtures/capi_reference/README.md)."""
  return FIXTURE


def pytest_configure(config: pytest.Config) -> None:
  # gs:// tests (marked `gcs`) run in one child pytest inside a loopback-only network namespace
  # beside fake-gcs-server: see gcs_netns.py.
  config.pluginmanager.register(gcs_netns, 'gcs_netns')
  # Under CAPI_STRICT_SKIPS=1 (CI) a skip not listed in expected_skips.py fails the session.
  config.pluginmanager.register(expected_skips, 'expected_skips')
