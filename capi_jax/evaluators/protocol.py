"""The protocol interface: a protocol's config section is the keyword arguments of its class.

`config.evals.<name>` is passed as keyword arguments to the `Protocol` subclass registered as
<name> (`capi_jax.evaluators`), as big_vision's evaluators take their config section
(`evaluators/common.py`). A subclass declares its keys as (keyword-only) dataclass fields,
records every bad value in `check` (one sentence each, never raising) and evaluates a backbone
in `run`. Every protocol has a `period`: during training the student is evaluated every
`period` steps (0: never).

What a protocol needs besides its section comes from the engine: the evaluated model's
`ModelShape` (for checks such as "a multiple of the patch size", from `Method.eval_model()`),
and at run time the `Backbone` and an `Environment` (data root, reader processes, seed).
"""

import abc
from collections.abc import Callable, Sequence
import dataclasses
import pathlib
from typing import Any, ClassVar

import ml_collections

from capi_jax.base import problems as problems_lib
from capi_jax.evaluators import backbone as backbone_lib

Problems = problems_lib.Problems
Log = Callable[[str], None]


@dataclasses.dataclass(frozen=True)
class ModelShape:
  """The evaluated model as the protocols' checks see it.

  Attributes:
    patch_size: pixels per patch side (feature maps are (H / p, W / p)).
    embed_dim: feature width D.
  """
  patch_size: int
  embed_dim: int


@dataclasses.dataclass(frozen=True)
class Environment:
  """What a run gives every protocol besides its own section.

  Attributes:
    data_dir: root that relative dataset names resolve against (`config.data.data_dir`).
    num_workers: Grain reader processes per host (`config.data.num_workers`; 0: this one).
    seed: probe initialisation and augmentation (`config.train.seed`).
  """
  data_dir: str = ''
  num_workers: int = 0
  seed: int = 0


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class Protocol(abc.ABC):
  """Base class of evaluation protocols; the dataclass fields are the config keys.

  Subclasses set `name` (their key in `config.evals`), `official` (False for capi_jax's extras,
  whose numbers are reported as 'extra/...') and implement `check` and `run`. Fields hold the
  section's values as given: construction never validates, `problems` does.
  """
  name: ClassVar[str]
  official: ClassVar[bool] = True

  period: int  # Training steps between evaluations of the student (0: only the final one).

  @classmethod
  def keys(cls) -> list[str]:
    """The keys of the config section, in declaration order."""
    return [f.name for f in dataclasses.fields(cls)]

  @classmethod
  def problems(cls, section: Any, model: ModelShape | None) -> list[str]:
    """Every invalid value of `config.evals.<name>`, one sentence each; never raises.

    Args:
      section: the config section.
      model: the evaluated model's shape, or None when unknown (checks needing it are relaxed).
    """
    p = Problems()
    key = f'evals.{cls.name}'
    if not check_keys(p, key, section, cls.keys()):
      return p.found
    try:
      protocol = cls(**{k: section[k] for k in cls.keys()})
      p.number(f'{key}.period', protocol.period, 0, integer=True)
      protocol.check(p, key, model)
    except Exception as e:  # pylint: disable=broad-except  (sentences, never an exception)
      p.found.append(f'{key} could not be checked ({type(e).__name__}: {e}); compare it with '
                     'the evals section of configs/vitl.py.')
    return p.found

  @abc.abstractmethod
  def check(self, p: Problems, key: str, model: ModelShape | None) -> None:
    """Records every invalid value of this section in `p` (keys named `key`.<field>)."""

  @abc.abstractmethod
  def run(self, backbone: backbone_lib.Backbone, env: Environment, out_dir: pathlib.Path,
          log: Log) -> tuple[dict[str, float], dict[str, Any]]:
    """Evaluates `backbone`: ({result name: number}, details for results.json)."""


# ----------------------------------------------------------------------------------------------
# Checks shared by protocols (each records one sentence per bad value and returns whether the
# value was valid).


def check_keys(p: Problems, key: str, section: Any, known: Sequence[str],
               optional: Sequence[str] = (), required: Sequence[str] | None = None) -> bool:
  """`section` is a ConfigDict with no unknown key; returns whether none is missing.

  A misspelt key is an error rather than a silently ignored value.
  """
  if not isinstance(section, ml_collections.ConfigDict):
    p.found.append(f'{key} must be a ConfigDict section, got {section!r}.')
    return False
  required = [k for k in (known if required is None else required) if k not in optional]
  unknown = sorted(set(section.keys()) - set(known))
  missing = sorted(set(required) - set(section.keys()))
  p.check(not unknown, f'{key} has unknown keys {unknown}; known: {sorted(known)}.')
  return p.check(not missing, f'{key} lacks {missing} (see configs/vitl.py).')


def check_resolution(p: Problems, key: str, value: Any, model: ModelShape | None) -> bool:
  """An image side the model splits into whole patches."""
  if model is None:
    return p.number(key, value, 1, integer=True)
  patch = model.patch_size
  return p.check(problems_lib.is_int(value) and value > 0 and value % patch == 0,
                 f'{key}={value!r} must be a positive multiple of model.patch_size={patch}.')


def check_numbers(p: Problems, key: str, values: Any, ok: Callable[[Any], bool],
                  what: str) -> bool:
  """A non-empty sequence of numbers, each satisfying `ok` (`what` says how, in words)."""
  return p.check(isinstance(values, Sequence) and not isinstance(values, str) and len(values) > 0
                 and all(is_number(v) and ok(v) for v in values),
                 f'{key}={values!r} must be a non-empty sequence of {what}.')


def check_names(p: Problems, key: str, values: Any, options: Sequence[str]) -> bool:
  """A non-empty sequence of names from `options`."""
  return p.check(isinstance(values, Sequence) and not isinstance(values, str) and len(values) > 0
                 and all(v in options for v in values),
                 f'{key}={values!r} must be a non-empty tuple of '
                 f'{", ".join(repr(o) for o in options)}.')


def is_number(x: Any) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool)
