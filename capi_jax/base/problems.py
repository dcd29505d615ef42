"""Collecting every invalid config value as one sentence each, without ever raising.

`Problems` is what the engine (`capi_jax.engine.config_checks`), each method
(`Method.config_problems`) and each evaluator check their config sections with: every check
records a sentence naming the key, its value and what is valid, and returns whether the value
was valid, so that checks depending on it run only then.
"""

from collections.abc import Sequence
import math
from typing import Any

import ml_collections


def is_int(x: Any) -> bool:
  return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _interval(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
  if low is not None and high is not None:
    return f'in {"(" if low_open else "["}{low}, {high}{")" if high_open else "]"}'
  if low is not None:
    return f'{">" if low_open else ">="} {low}'
  return f'{"<" if high_open else "<="} {high}'


class Problems:
  """Collects one sentence per invalid value; each check returns whether the value is valid
  (so that checks depending on it run only then, and never raise)."""

  def __init__(self):
    self.found: list[str] = []

  def check(self, ok: bool, message: str) -> bool:
    if not ok:
      self.found.append(message)
    return ok

  def number(self, key: str, value: Any, low: float | None = None, high: float | None = None,
             *, low_open: bool = False, high_open: bool = False, integer: bool = False) -> bool:
    """`value` is a finite number (an integer if `integer`) in the given interval."""
    # nan / inf fail every interval: say why (`inf >= 0` alone would read as satisfied).
    non_finite = isinstance(value, float) and not math.isfinite(value)
    what = ['an integer'] if integer else ['a finite number'] if non_finite else []
    if low is not None or high is not None:
      what.append(_interval(low, high, low_open, high_open))
    ok = is_int(value) if integer else _is_number(value)
    ok = ok and (low is None or (value > low if low_open else value >= low))
    ok = ok and (high is None or (value < high if high_open else value <= high))
    return self.check(ok, f'{key}={value!r} must be {" ".join(what) or "a number"}.')

  def choice(self, key: str, value: Any, options: Sequence[Any]) -> bool:
    return self.check(value in options, f'{key}={value!r} must be one of {tuple(options)}.')

  def boolean(self, key: str, value: Any) -> bool:
    return self.check(isinstance(value, bool), f'{key}={value!r} must be True or False.')

  def string(self, key: str, value: Any, nonempty: bool = True) -> bool:
    return self.check(isinstance(value, str) and (value or not nonempty),
                      f'{key}={value!r} must be a {"non-empty " if nonempty else ""}string.')

  def pair(self, key: str, value: Any, description: str) -> bool:
    """`value` is a pair of finite numbers; `description` says what else they must satisfy."""
    ok = (isinstance(value, (tuple, list)) and len(value) == 2
          and all(_is_number(v) for v in value))
    return self.check(ok, f'{key}={value!r} must be a pair of numbers ({description}).')

  def adamw(self, key: str, cfg: ml_collections.ConfigDict) -> None:
    """An AdamW section: `betas` in [0, 1), `eps` > 0, `weight_decay` >= 0."""
    if self.pair(f'{key}.betas', cfg.betas, 'each in [0, 1)'):
      self.check(all(0 <= b < 1 for b in cfg.betas),
                 f'{key}.betas={tuple(cfg.betas)} must each be in [0, 1).')
    self.number(f'{key}.eps', cfg.eps, 0, low_open=True)
    self.number(f'{key}.weight_decay', cfg.weight_decay, 0)

  def schedule(self, key: str, cfg: ml_collections.ConfigDict, total_iters: Any,
               high: float | None = None) -> None:
    """A `schedules.from_config` section: values in [0, high] (learning rates: >= 0)."""
    for name in ('base_value', 'final_value', 'start_warmup_value'):
      if name in cfg:
        self.number(f'{key}.{name}', cfg[name], 0, high)
    if is_int(total_iters) and total_iters >= 1:
      self.number(f'{key}.warmup_iters', cfg.warmup_iters, 0, total_iters, integer=True)
    if 'truncate_cos' in cfg:
      self.number(f'{key}.truncate_cos', cfg.truncate_cos, 0, 1)
