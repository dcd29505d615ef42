"""CI's skips are the expected ones only: a pytest plugin (registered by tests/conftest.py).

With CAPI_STRICT_SKIPS=1 (`.ci/run` sets it), a skip that is not listed in EXPECTED_SKIPS fails
the session (exit status 1) and the summary names it: a dependency that did not install, a
fixture that went missing, a device count that changed can no longer turn tests into skips
unseen. Without it (developer machines) skips only show in pytest's summary, as usual.
"""

from __future__ import annotations

import os

import pytest

STRICT_ENV = 'CAPI_STRICT_SKIPS'
# (test id prefix, words of the skip reason): every skip CI is expected to report, with why.
EXPECTED_SKIPS = (
    # Regenerating the torchvision fixture needs torchvision, which CI does not install (the
    # fixture itself is checked by test_operations_match_torchvision, never skipped).
    ('tests/test_transforms.py::test_fixture_regenerates_with_torchvision',
     'torchvision is not installed'),
) + ((
    # .ci/run could not install JAX's CUDA plugin (it says so in its log and sets the variable).
    ('tests/test_aot.py::test_small_config_compiles_for_h100_nodes_with_cudnn_attention',
     "JAX's CUDA plugin is not installed"),
) if os.environ.get('CAPI_CUDA_PLUGIN_UNAVAILABLE') == '1' else ()) + ((
    # .ci/run found no Python 3.12 to build the second stack with (it says so in its log).
    ('tests/test_second_stack.py::', '.venv312'),
) if os.environ.get('CAPI_SECOND_STACK_UNAVAILABLE') == '1' else ())


def unexpected(skips: list[tuple[str, str]]) -> list[tuple[str, str]]:
  """The (test id, reason) pairs of `skips` that EXPECTED_SKIPS does not list."""
  return [(nodeid, reason) for nodeid, reason in skips
          if not any(nodeid.startswith(prefix) and words in reason
                     for prefix, words in EXPECTED_SKIPS)]


_skips: list[tuple[str, str]] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
  if report.skipped and not hasattr(report, 'wasxfail'):
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    _skips.append((report.nodeid, reason.removeprefix('Skipped: ')))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
  if os.environ.get(STRICT_ENV) == '1' and unexpected(_skips) and exitstatus == 0:
    session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
  del exitstatus, config
  bad = unexpected(_skips)
  if os.environ.get(STRICT_ENV) == '1' and bad:
    terminalreporter.section('unexpected skips (tests/expected_skips.py)', red=True)
    for nodeid, reason in bad:
      terminalreporter.line(f'{nodeid}: {reason}')
    terminalreporter.line(f'{len(bad)} skips that CI does not expect: install what they name, '
                          'or list them in tests/expected_skips.py with the reason.')
