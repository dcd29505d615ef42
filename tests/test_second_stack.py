"""Every parity fixture on the GPU machines' stack too (Python 3.12, jax 0.11.x, flax 0.12.12).

`.ci/run` builds that stack in `.venv312` (`VENV=.venv312 PYTHON=python3.12 PINS=...
bash launch/setup_env.sh`); this suite runs `check_reference` with it on every fixture (the methods' looped and
scanned), so a
change of the XLA:CPU code generation between jaxlib releases that moves a result out of
tolerance fails here. Without `.venv312` (a developer machine) the tests skip, saying how to
build it.
"""

import pathlib
import subprocess

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
PYTHON = REPO / '.venv312' / 'bin' / 'python'
FIXTURES = sorted([*(REPO / 'tests' / 'fixtures').glob('*_reference/*.npz'),
                   *(REPO / 'tests' / 'fixtures').glob('*_eval/*.npz')])
# Read by their own tests, not by check_reference: the ViT-conversion fixtures
# (tests/test_vit.py) and CAPI's masks and crops (tests/test_capi_data_parity.py: numpy on the
# host, no XLA code generation to move between jaxlib releases).
FIXTURES = [f for f in FIXTURES if f.parent.name not in ('vit_reference', 'capi_data_reference')]


@pytest.fixture(scope='module')
def python312() -> pathlib.Path:
  if not PYTHON.exists():
    pytest.skip(f'{PYTHON} is missing: build it with VENV=.venv312 PYTHON=python3.12 '
                "PINS='jax==0.11.2 jaxlib==0.11.2 flax==0.12.12' bash launch/setup_env.sh")
  return PYTHON


def test_the_second_stack_is_the_gpu_machines(python312):
  out = subprocess.run([python312, '-c', 'import sys, jax, flax; print(sys.version_info[:2], '
                        'jax.__version__, flax.__version__)'], capture_output=True, text=True,
                       check=True).stdout
  assert out.startswith('(3, 12) 0.11.'), out


# The methods' suites build block stacks: run them looped and scanned.
_STACKS = ('capi_reference', 'mim_refiner_reference', 'caev2_reference')
CASES = [(f, scan) for f in FIXTURES
         for scan in ((False, True) if f.parent.name in _STACKS else (False,))]


@pytest.mark.parametrize('fixture,scan_layers', CASES,
                         ids=[f.name + ('-scan' if s else '') for f, s in CASES])
def test_fixture_passes_on_the_second_stack(python312, fixture, scan_layers):
  args = [python312, '-m', 'capi_jax.check_reference', str(fixture)]
  proc = subprocess.run(args + ['--scan_layers'] * scan_layers, cwd=REPO,
                        capture_output=True, text=True, env={'JAX_PLATFORMS': 'cpu', 'PATH': ''})
  assert proc.returncode == 0 and proc.stdout.rstrip().endswith('PASS'), (
      proc.stdout[-3000:] + proc.stderr[-2000:])
