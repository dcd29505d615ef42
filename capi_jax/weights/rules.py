"""Official state dicts <-> capi_jax parameter trees, by rule: names and layouts, bit for bit.

A rule maps one capi_jax leaf path (and its ndim) to its official name and the two layout
functions between them (`Rule`); `to_flax` fills a parameter tree of the expected structure from
an official state dict, checking every name, shape and value, and `to_official` goes back.
Layouts: linear `weight (out, in)` <-> `kernel (in, out)`, conv `weight (out, in, kh, kw)` <->
`kernel (kh, kw, in, out)`; transposes only, so official -> capi_jax -> official is exact.
Official checkpoints are per block; scanned capi_jax trees (`models.stack`, stacked block
parameters) are converted through the per-block layout, both ways.
The models' own rules live beside their converters (`weights/vit.py`, each method's
`convert.py`).
"""

from collections.abc import Callable, Mapping, Sequence
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from capi_jax.base import errors
from capi_jax.models import stack

Params = Any
StateDict = dict[str, np.ndarray]

_MAX_PROBLEMS_SHOWN = 30


class CheckpointMismatchError(errors.UserError, ValueError):
  """A checkpoint does not fit the architecture it is loaded into.

  `problems` lists the mismatches one by one ('parameter NAME: expected shape A, found B'), so
  that a caller can report the first one alone.
  """

  def __init__(self, message: str, problems: Sequence[str] = ()):
    super().__init__(message)
    self.problems = tuple(problems)


# ---------------------------------------------------------------------------- leaf layouts
# ---------------------------------------------------------------------------- leaf layouts
def linear_to_official(x: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(x.T)


def conv_to_official(x: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(x.transpose(3, 2, 0, 1))  # (kh, kw, in, out) -> (out, in, kh, kw)


def conv_to_flax(x: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(x.transpose(2, 3, 1, 0))  # (out, in, kh, kw) -> (kh, kw, in, out)


def identity(x: np.ndarray) -> np.ndarray:
  return x

# (official name, to_official, to_flax) for one capi_jax leaf path.
Rule = tuple[str, Callable[[np.ndarray], np.ndarray], Callable[[np.ndarray], np.ndarray]]


def dotted_rule(path: tuple[str, ...], ndim: int) -> Rule:
  """The naming of modules written after their official counterparts (CAPI's backbone, CAE v2's
  regressor): `<x>blocks_<i>` <-> `<x>blocks.<i>`, `/` <-> `.`, conv / linear `kernel` and norm
  `scale` <-> `weight`, with the layouts above."""
  parts = [re.sub(r'^(\w*blocks)_(\d+)$', r'\1.\2', p) for p in path]
  leaf = parts[-1]
  if leaf == 'kernel' and ndim == 4:
    return '.'.join(parts[:-1] + ['weight']), conv_to_official, conv_to_flax
  if leaf == 'kernel':
    return '.'.join(parts[:-1] + ['weight']), linear_to_official, linear_to_official
  if leaf == 'scale':
    return '.'.join(parts[:-1] + ['weight']), identity, identity
  return '.'.join(parts), identity, identity


def _path_keys(path) -> tuple[str, ...]:
  return tuple(k.key for k in path)


# ---------------------------------------------------------------------------- conversion
# ---------------------------------------------------------------------------- conversion
def to_official(params: Params, rule_fn: Callable[[tuple[str, ...], int], Rule]) -> StateDict:
  """capi_jax params (either stack layout) -> {official name: array}, each leaf laid out by
  `rule_fn(path, ndim)` of its per-block path."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(stack.to_loop_layout(params))[0]:
    leaf = np.asarray(leaf)
    name, leaf_to_official, _ = rule_fn(_path_keys(path), leaf.ndim)
    out[name] = leaf_to_official(leaf)
  return out


def _value_problem(value: np.ndarray) -> str | None:
  """Why `value` cannot be a weight (not floating point, or NaN/inf), or None."""
  if not jnp.issubdtype(value.dtype, jnp.floating):
    return f'dtype {value.dtype}, expected a floating-point dtype'
  bad = int(value.size - np.count_nonzero(np.isfinite(value.astype(np.float32))))
  if bad:
    return f'{bad} of its {value.size} values are NaN or inf'
  return None


def to_flax(state_dict: Mapping[str, Any], expected: Params,
            rule_fn: Callable[[tuple[str, ...], int], Rule], what: str,
            fix: str = 'check the config\'s architecture against the checkpoint') -> Params:
  """Converts `state_dict` into the structure of `expected`, checking every name and shape.

  Args:
    state_dict: {official name: array}.
    expected: the capi_jax parameter tree (arrays or ShapeDtypeStructs) to fill, in either stack
      layout (the result has the same).
    rule_fn: (per-block leaf path, ndim) -> (official name, to_official, to_flax) layouts.
    what: names the checkpoint in errors.
    fix: what the error tells the user to do.

  Raises:
    CheckpointMismatchError: listing every missing, unexpected, misshaped, non-float or
      non-finite parameter.
  """
  leaves, treedef = jax.tree_util.tree_flatten_with_path(stack.to_loop_layout(expected))
  problems, converted = [], []
  expected_names = set()
  for path, spec in leaves:
    name, leaf_to_official, leaf_to_flax = rule_fn(_path_keys(path), len(spec.shape))
    expected_names.add(name)
    official_shape = leaf_to_official(np.empty(spec.shape, np.int8)).shape
    if name not in state_dict:
      problems.append(f'missing parameter {name!r}: expected shape {official_shape}, found none')
      continue
    value = np.asarray(state_dict[name])
    if value.shape != official_shape:
      problems.append(f'parameter {name!r}: expected shape {official_shape}, found {value.shape}')
      continue
    problem = _value_problem(value)
    if problem:
      problems.append(f'parameter {name!r}: {problem}')
      continue
    converted.append(leaf_to_flax(value))
  for name in sorted(set(state_dict) - expected_names):
    problems.append(f'unexpected parameter {name!r} (shape {np.shape(state_dict[name])}): '
                    'not part of this architecture')
  if problems:
    shown = problems[:_MAX_PROBLEMS_SHOWN]
    if len(problems) > len(shown):
      shown.append(f'... and {len(problems) - len(shown)} more')
    raise CheckpointMismatchError(
        f'The {what} checkpoint does not fit the configured architecture '
        f'({len(problems)} problem(s)); {fix}:\n  ' + '\n  '.join(shown), problems)
  return stack.to_layout_of(jax.tree_util.tree_unflatten(treedef, converted), expected)
