"""CAE v2's evaluation protocols' parity suite (work in progress)."""

from collections.abc import Mapping

import numpy as np

from capi_jax.reference import harness


def _matches(arrays: Mapping[str, np.ndarray]) -> bool:
  return (any(k.startswith('lp/params/') for k in arrays)
          and any(k.startswith('ft/params/') for k in arrays))


SUITE = harness.Suite('caev2_eval', _matches, lambda arrays: arrays)
