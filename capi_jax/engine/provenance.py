"""What a run record needs to reproduce a run: code, libraries, flags, devices, mesh.

`describe(mesh)` gives the git commit and dirty flag of the checkout capi_jax runs from (None,
with the reason, when it runs from an installed copy, or git is missing or slow: no network is
used), the versions of the libraries in the training step's path (None when not installed), the
environment variables that change what XLA / libtpu / NCCL do, the options the train step asks
the TPU compiler for (`step.TPU_COMPILER_OPTIONS`; a libtpu may refuse them, with a warning in
the log), and the devices and mesh.
"""

import importlib.metadata
import os
import pathlib
import subprocess
from typing import Any

import jax

from capi_jax.engine import step as step_lib

# Distribution names, as pip knows them.
PACKAGES = ('jax', 'jaxlib', 'flax', 'optax', 'orbax-checkpoint', 'grain', 'numpy',
            'ml-collections', 'tensorboardX', 'libtpu', 'libtpu-nightly', 'jax-cuda12-plugin',
            'jax-cuda12-pjrt', 'jax-cuda13-plugin', 'jax-cuda13-pjrt', 'nvidia-cudnn-cu12',
            'nvidia-nccl-cu12')
# Variables recorded when set: these prefixes configure the compilers and runtimes.
_ENV_PREFIXES = ('XLA_', 'LIBTPU_', 'JAX_', 'NCCL_', 'MEGASCALE_', 'TPU_', 'CUDA_VISIBLE_')
_GIT_TIMEOUT_S = 10
# The checkout capi_jax runs from, if it runs from one: capi_jax/engine/provenance.py -> root.
_SOURCE_ROOT = pathlib.Path(__file__).resolve().parents[2]


def versions() -> dict[str, str | None]:
  """Installed version of each of PACKAGES; None when not installed."""
  found = {}
  for name in PACKAGES:
    try:
      found[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      found[name] = None
  return found


def _git(*args: str) -> str:
  return subprocess.run(
      ['git', '-C', str(_SOURCE_ROOT), *args], capture_output=True, text=True, check=True,
      timeout=_GIT_TIMEOUT_S, env={**os.environ, 'GIT_OPTIONAL_LOCKS': '0'}).stdout.strip()


def git_state() -> dict[str, Any]:
  """{'commit', 'dirty'} of the checkout holding capi_jax, or Nones and a 'note' saying why."""
  try:
    top = _git('rev-parse', '--show-toplevel')
    if pathlib.Path(top).resolve() != _SOURCE_ROOT:  # Installed inside some other repository.
      raise subprocess.CalledProcessError(1, 'git', stderr='not the checkout of capi_jax')
    commit = _git('rev-parse', 'HEAD')
    # Changes to tracked files only: untracked outputs (workdirs, caches) do not make it dirty.
    dirty = bool(_git('status', '--porcelain', '--untracked-files=no'))
  except FileNotFoundError:
    return {'commit': None, 'dirty': None, 'note': 'git is not installed'}
  except subprocess.TimeoutExpired:
    return {'commit': None, 'dirty': None, 'note': f'git took over {_GIT_TIMEOUT_S} s'}
  except subprocess.CalledProcessError as e:
    return {'commit': None, 'dirty': None,
            'note': f'{_SOURCE_ROOT} is not a git checkout ({(e.stderr or "").strip()[:200]})'}
  return {'commit': commit, 'dirty': dirty}


def environment() -> dict[str, str]:
  """The set variables that configure XLA, libtpu, JAX, NCCL and multi-slice runs."""
  return {k: v for k, v in sorted(os.environ.items()) if k.startswith(_ENV_PREFIXES)}


def describe(mesh: jax.sharding.Mesh | None) -> dict[str, Any]:
  """Run-record fields: git, versions, environment, compiler options, devices, mesh."""
  device = jax.devices()[0]
  return {
      'git': git_state(), 'versions': versions(), 'environment': environment(),
      'compiler_options': (dict(step_lib.TPU_COMPILER_OPTIONS) if device.platform == 'tpu'
                           else {}),
      'device_kind': device.device_kind,
      'local_device_count': jax.local_device_count(),
      'mesh': None if mesh is None else {k: int(v) for k, v in mesh.shape.items()},
  }
