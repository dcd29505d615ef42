"""Parity check against numbers produced by the official PyTorch releases.

A fixture is an `.npz` of arrays plus a `meta_json` string, made by running an official release
(see each `tests/fixtures/<kind>/README.md`). Its kind is recognised from its arrays; each kind
has a suite of named comparisons (`Suite`) in the module listed in `SUITES`. Every comparison
reads its sizes from the fixture (never from the shipped one), runs capi_jax's code on the
fixture's inputs and compares with the official outputs. The report is a table

  quantity | max abs err | max rel err | tolerance | ok

and the exit status is non-zero if any quantity is out of tolerance, or if nothing at all could
be compared (a fixture that holds no comparable arrays checks nothing, and says so). A
comparison whose arrays are missing is listed as skipped with the reason, never silently.
Computation is float32 with 'highest' matmul precision.
"""

from collections.abc import Callable, Mapping, Sequence
import dataclasses
import importlib
from typing import Any

import jax
import numpy as np

Arrays = Mapping[str, np.ndarray]

# Fixture kind -> module defining `SUITE` (imported only when that kind is checked).
SUITES = {
    'capi': 'capi_jax.reference.capi',
    'mim_refiner': 'capi_jax.reference.mim_refiner',
    'caev2': 'capi_jax.reference.caev2',
    'capi_eval': 'capi_jax.reference.capi_eval',
    'mim_refiner_eval': 'capi_jax.reference.mim_refiner_eval',
    'caev2_eval': 'capi_jax.reference.caev2_eval',
}


class Skipped(Exception):
  """A comparison that this fixture (or this checkout) cannot run; the message says why."""


@dataclasses.dataclass(frozen=True)
class Result:
  """One compared quantity. It passes when max_abs <= tolerance * max(1, scale) unless
  `absolute`, then when max_abs <= tolerance."""
  quantity: str
  max_abs: float
  scale: float  # max |reference|
  tolerance: float
  absolute: bool = False

  @property
  def max_rel(self) -> float:
    if self.scale > 0:
      return self.max_abs / self.scale
    return 0.0 if self.max_abs == 0 else float('inf')

  @property
  def ok(self) -> bool:
    # NaN compares False, so a NaN anywhere fails.
    bound = self.tolerance if self.absolute else self.tolerance * max(1.0, self.scale)
    return self.max_abs <= bound


def compare(quantity: str, ours: Any, ref: Any, tolerance: float,
            absolute: bool = False) -> Result:
  """Errors of `ours` against `ref` (same shape) as a `Result`."""
  ours = np.asarray(ours, np.float64)
  ref = np.asarray(ref, np.float64)
  if ours.shape != ref.shape:
    raise ValueError(f'{quantity}: shape {ours.shape} differs from the reference {ref.shape}.')
  max_abs = float(np.max(np.abs(ours - ref))) if ours.size else 0.0
  scale = float(np.max(np.abs(ref))) if ref.size else 0.0
  return Result(quantity, max_abs, scale, tolerance, absolute)


@dataclasses.dataclass(frozen=True)
class Comparison:
  name: str
  requires: tuple[str, ...]
  fn: Callable[[Any], list[Result]]


@dataclasses.dataclass
class Suite:
  """The comparisons of one fixture kind.

  Attributes:
    kind: the name in `SUITES`.
    matches: whether a fixture's arrays are of this kind.
    make_context: (arrays, scan_layers) -> the object every comparison receives (derived
      once); scan_layers: the models' blocks as one scan (`efficiency.scan_layers`).
    comparisons: added with `@suite.register(name, requires=...)`.
  """
  kind: str
  matches: Callable[[Arrays], bool]
  make_context: Callable[[Arrays, bool], Any]
  comparisons: list[Comparison] = dataclasses.field(default_factory=list)

  def register(self, name: str, requires: Sequence[str] = ()) -> Callable[..., Any]:
    """Adds a comparison `fn(ctx) -> [Result]`, skipped when a `requires` key is missing."""

    def wrap(fn: Callable[[Any], list[Result]]) -> Callable[[Any], list[Result]]:
      self.comparisons.append(Comparison(name, tuple(requires), fn))
      return fn

    return wrap


def suite(kind: str) -> Suite:
  if kind not in SUITES:
    raise ValueError(f'Unknown fixture kind {kind!r}; known: {sorted(SUITES)}.')
  return importlib.import_module(SUITES[kind]).SUITE


def detect(arrays: Arrays) -> Suite:
  """The suite whose fixture format `arrays` is in."""
  found = [s for s in map(suite, SUITES) if s.matches(arrays)]
  if len(found) != 1:
    what = 'no known fixture format' if not found else f'several formats {[s.kind for s in found]}'
    raise ValueError(f'The fixture matches {what}; pass --kind (one of {sorted(SUITES)}).')
  return found[0]


@dataclasses.dataclass
class Report:
  kind: str
  results: list[Result]
  skipped: list[tuple[str, str]]

  @property
  def ok(self) -> bool:
    """All compared quantities within tolerance, and at least one compared."""
    return bool(self.results) and all(r.ok for r in self.results)

  def table(self) -> str:
    header = ('quantity', 'max abs err', 'max rel err', 'tolerance', 'ok')
    rows = [(r.quantity, f'{r.max_abs:.3g}', f'{r.max_rel:.3g}',
             f'{r.tolerance:.1e}' + (' abs' if r.absolute else ''), 'ok' if r.ok else 'FAIL')
            for r in self.results]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = [' | '.join(c.ljust(w) for c, w in zip(row, widths)) for row in [header, *rows]]
    lines.insert(1, '-+-'.join('-' * w for w in widths))
    lines += [f'skipped: {name}: {reason}' for name, reason in self.skipped]
    return '\n'.join(lines)

  def verdict(self) -> str:
    if not self.results:
      return (f'FAIL: nothing was compared: this {self.kind} fixture has none of the arrays '
              'any comparison needs (see the skips above)')
    return 'PASS' if self.ok else 'FAIL: some quantities are out of tolerance'


def run(arrays: Arrays, kind: str | None = None,
        comparisons: Sequence[Comparison] | None = None, scan_layers: bool = False) -> Report:
  """Runs every comparison of the fixture's suite that its arrays allow, the models' blocks
  looped or (`scan_layers`) scanned."""
  the_suite = detect(arrays) if kind is None else suite(kind)
  ctx = the_suite.make_context(arrays, scan_layers)
  report = Report(the_suite.kind, [], [])
  with jax.default_matmul_precision('highest'):
    for comparison in the_suite.comparisons if comparisons is None else comparisons:
      missing = [k for k in comparison.requires if k not in arrays]
      if missing:
        report.skipped.append((comparison.name, f'the fixture has no {", ".join(missing)}'))
        continue
      try:
        report.results.extend(comparison.fn(ctx))
      except Skipped as e:
        report.skipped.append((comparison.name, str(e)))
  return report


def one_device_mesh() -> jax.sharding.Mesh:
  """A ('batch',) mesh of the first device: the suites run everything on one device."""
  return jax.make_mesh((1,), ('batch',), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=jax.devices()[:1])


def load_fixture(path: str) -> dict[str, np.ndarray]:
  with np.load(path) as f:
    return {k: f[k] for k in f.files}
