"""Run records carry what reproducing a run needs: git state, library versions, flags, devices."""

import pathlib
import shutil
import subprocess

import pytest

from capi_jax.engine import provenance

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which('git') is None or not (ROOT / '.git').exists(),
                    reason='needs git and a checkout')
def test_git_commit_and_dirty_flag_of_this_checkout():
  state = provenance.git_state()
  head = subprocess.run(['git', '-C', str(ROOT), 'rev-parse', 'HEAD'], capture_output=True,
                        text=True, check=True).stdout.strip()
  assert state['commit'] == head and isinstance(state['dirty'], bool)


def test_git_missing_or_no_checkout(tmp_path, monkeypatch):
  monkeypatch.setenv('PATH', str(tmp_path))  # No git on PATH.
  assert provenance.git_state() == {'commit': None, 'dirty': None,
                                    'note': 'git is not installed'}
  monkeypatch.undo()
  if shutil.which('git'):
    monkeypatch.setattr(provenance, '_SOURCE_ROOT', tmp_path)  # An installed copy.
    state = provenance.git_state()
    assert state['commit'] is None and 'is not a git checkout' in state['note']


def test_versions_and_flags(monkeypatch):
  monkeypatch.setenv('XLA_FLAGS', '--xla_force_host_platform_device_count=2')
  monkeypatch.setenv('LIBTPU_INIT_ARGS', '--xla_tpu_enable_async_all_gather=true')
  monkeypatch.setenv('HOME_SECRET_TOKEN', 'x')
  record = provenance.describe(None)
  assert record['environment']['XLA_FLAGS'] == '--xla_force_host_platform_device_count=2'
  assert record['environment']['LIBTPU_INIT_ARGS'] == '--xla_tpu_enable_async_all_gather=true'
  assert 'HOME_SECRET_TOKEN' not in record['environment']
  import jax  # pylint: disable=g-import-not-at-top
  assert record['versions']['jax'] == jax.__version__
  assert set(provenance.PACKAGES) == set(record['versions'])
  assert record['device_kind'] == jax.devices()[0].device_kind
  assert record['compiler_options'] == {}  # The train step's options are TPU-only.
