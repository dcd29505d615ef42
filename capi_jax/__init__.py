"""capi_jax: CAPI (Cluster and Predict Latent Patches) pretraining in JAX/Flax.

From Python: `encoder = capi_jax.load(source)` then `encoder(images)` (see `capi_jax.api`).
"""

import importlib
from typing import Any

from capi_jax.base import platforms

# Before jax starts (every command imports this package first): no libtpu noise without a TPU.
platforms.quiet_libtpu_without_tpu()

_API = ('load', 'Encoder', 'read_config', 'UserError')


def __getattr__(name: str) -> Any:
  # `capi_jax.api` (jax, the engine) is imported on first use, not with the package: every
  # command imports the package first and sets the process up (huge pages, logging, libtpu's
  # settings) before jax starts.
  if name in _API:
    return getattr(importlib.import_module('capi_jax.api'), name)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


def __dir__() -> list[str]:
  return sorted([*globals(), *_API])
