r"""Weighted mixtures of sources (`mix:`), random access like their components.

  mix:0.7*wds:/data/a/{0000..0099}.tar|0.3*folder:/data/b

An epoch has as many records as the components together (N = sum of their lengths); component
k fills round(w_k * N) of them (weights normalised), interleaved evenly in the record order
(the pipeline shuffles them anyway). A component with fewer records than its share repeats
them; one with more contributes a fixed random subset of its records (drawn once, seeded by its
position in the mixture), the same every epoch: the mixture is a map-style dataset, so the
pipeline's per-record determinism, exact resume and per-host slices hold unchanged.
"""

from collections.abc import Sequence
from typing import Any

import numpy as np

from capi_jax.base import errors


class MixtureError(errors.UserError, ValueError):
  """A `mix:` string or weight is unusable."""


def parse(spec: str) -> list[tuple[float, str]]:
  """'0.7*wds:A|0.3*folder:B' -> [(0.7, 'wds:A'), (0.3, 'folder:B')] (weights not normalised)."""
  parts = []
  for item in spec.split('|'):
    weight, star, dataset = item.strip().partition('*')
    try:
      value = float(weight) if star else float('nan')
    except ValueError:
      value = float('nan')
    if not star or not dataset or not value > 0:
      raise MixtureError(f'mix:{spec}: each component is WEIGHT*DATASET with a positive weight, '
                         f'joined by | (e.g. mix:0.7*wds:A/{{0000..0009}}.tar|0.3*folder:B); '
                         f'got {item!r}.')
    parts.append((value, dataset))
  if len(parts) < 2:
    raise MixtureError(f'mix:{spec} has one component: use it directly.')
  return parts


def _shares(weights: Sequence[float], total: int) -> list[int]:
  """Records per component: proportional to `weights`, summing to `total` (largest remainders)."""
  w = np.asarray(weights, np.float64) / np.sum(weights)
  exact = w * total
  shares = np.floor(exact).astype(np.int64)
  for k in np.argsort(-(exact - shares), kind='stable')[:total - int(shares.sum())]:
    shares[k] += 1
  return shares.tolist()


class MixtureSource:
  """Records of several sources in set proportions (see the module docstring)."""

  def __init__(self, components: Sequence[tuple[float, Any]], spec: str):
    self.components = [source for _, source in components]
    lengths = [len(s) for s in self.components]
    shares = _shares([w for w, _ in components], sum(lengths))
    # Slot j of component k sits at time (j + 0.5) / share_k: sorting the times interleaves
    # the components evenly.
    times = np.concatenate([(np.arange(n) + 0.5) / n for n in shares])
    owner = np.concatenate([np.full(n, k, np.int32) for k, n in enumerate(shares)])
    slot = np.concatenate([np.arange(n, dtype=np.int64) for n in shares])
    order = np.argsort(times, kind='stable')
    self._owner, self._slot = owner[order], slot[order]
    self._perm = [np.random.default_rng([k, length]).permutation(length)
                  for k, length in enumerate(lengths)]
    names = [list(s.class_names) for s in self.components]
    self.class_names = names[0] if all(n == names[0] for n in names) else []
    self.num_classes = len(self.class_names) or max(s.num_classes for s in self.components)
    described = ', '.join(f'{n} of {s.description}' for n, s in zip(shares, self.components))
    self.description = f'mix:{spec} ({len(self)} records per epoch: {described})'

  def __len__(self) -> int:
    return len(self._owner)

  def __getitem__(self, index: int) -> dict[str, Any]:
    k = int(self._owner[index])
    perm = self._perm[k]
    return self.components[k][int(perm[self._slot[index] % len(perm)])]
