"""Weights from elsewhere: a finished run's variables, and what a new run starts from.

`restore_run` puts a training checkpoint of any method back together: the run's own config
(its newest record in WORKDIR/runs/, unless given) rebuilds its method, and the state is
restored, verified, onto a mesh or one device. Evaluation, conversion and pretrained starts all
use it.

`load` reads one of `Method.pretrained_paths()` into a `Pretrained`. A path may be
  - an official-format file (`weights.files.OFFICIAL_SUFFIXES`): its tensors under their
    official names, which the method converts with its model's converter;
  - the output directory of `python -m capi_jax.convert --to=capi_jax` (or its `params/`):
    its 'backbone';
  - a capi_jax training run of ANY method: a step folder (`WORKDIR/checkpoints/<step>`), the
    `checkpoints/` folder or the workdir (latest step), as `checkpointing.find_checkpoint`
    resolves them; the `Pretrained` carries that method's evaluation backbone (its EMA where it
    has one), its name and its whole variables.
`apply` calls the method's `from_pretrained` and checks that the variables keep their
structure, shapes and dtypes. A checkpoint that does not fit (another architecture, another
method's run) is refused in one line: the file, the first mismatching parameter with both
shapes, and the config keys to check (`Method.architecture_keys`).
"""

import os
from typing import Any, NamedTuple

from etils import epath
import jax
import ml_collections
import numpy as np

from capi_jax import methods
from capi_jax.base import interface
from capi_jax.base import sharding
from capi_jax.base import storage
from capi_jax.engine import checkpointing
from capi_jax.engine import runs
from capi_jax.engine import state as state_lib
from capi_jax.models import stack
from capi_jax.weights import files
from capi_jax.weights import rules

PyTree = Any


class RestoredRun(NamedTuple):
  """A training checkpoint put back together by `restore_run`."""
  config: ml_collections.ConfigDict
  method: interface.Method
  variables: interface.Variables
  step: int


def run_config(step_dir: epath.Path) -> ml_collections.ConfigDict:
  """The config of the run that wrote the step folder `step_dir` (WORKDIR/checkpoints/<step>)."""
  config = runs.latest_config(step_dir.parent.parent)
  if config is None:
    raise checkpointing.CheckpointNotFoundError(
        f'{step_dir} is a training checkpoint, but its run\'s config ('
        f'{step_dir.parent.parent / runs.RUNS_DIR}/*.json) is missing: it is needed to rebuild '
        'that run\'s model.')
  return config


def restore_run(step_dir: str | os.PathLike[str], config: ml_collections.ConfigDict | None = None,
                mesh: jax.sharding.Mesh | None = None) -> RestoredRun:
  """The training checkpoint in `step_dir`, verified, placed on `mesh` or on one device.

  Args:
    step_dir: a step folder (`WORKDIR/checkpoints/<step>`, or a copy of one).
    config: the run's config; by default its run's newest record (`run_config`).
    mesh: where to place the state, by `config.sharding`'s rules; None: this process's first device
      (variables returned as numpy trees).
  """
  step_dir = storage.path(step_dir)
  config = run_config(step_dir) if config is None else config
  method = methods.from_config(config)
  if mesh is None:
    device = jax.local_devices()[0]
    layout = state_lib.state_layout(config, method, sharding.make_mesh(config, [device]))
    target = checkpointing.restore_target(layout.abstract,
                                          jax.sharding.SingleDeviceSharding(device))
  else:
    layout = state_lib.state_layout(config, method, mesh)
    target = checkpointing.restore_target(layout.abstract, layout.shardings)
  state = checkpointing.restore_step_dir(step_dir, config, target)
  variables = state.variables if mesh is not None else jax.device_get(state.variables)
  return RestoredRun(config, method, variables, int(jax.device_get(state.step)))


def restore_backbone(path: str | os.PathLike[str]) -> PyTree:
  """The 'backbone' of a `capi_jax.convert` output (a params folder).

  Raises:
    CheckpointMismatchError: `path` holds no backbone.
  """
  parts = files.restore_params(path)
  if 'backbone' not in parts:
    raise rules.CheckpointMismatchError(
        f'{path} holds {sorted(parts)}, no backbone: pass the directory written by '
        '`python -m capi_jax.convert`.')
  return parts['backbone']


def load(path: str) -> interface.Pretrained:
  """The weights at `path` (see the module docstring), as numpy trees."""
  p = storage.path(path)
  if p.is_file() and p.suffix in files.OFFICIAL_SUFFIXES:
    return interface.Pretrained(state_dict=files.read_state_dict(p))
  if not p.is_dir():
    raise checkpointing.CheckpointNotFoundError(
        f'Pretrained checkpoint {path!r} is neither an official-format file '
        f'({", ".join(files.OFFICIAL_SUFFIXES)}) nor a directory (a capi_jax run, step folder or '
        '`capi_jax.convert` output).')
  found = checkpointing.find_checkpoint(p)
  if found.kind == 'params':
    return interface.Pretrained(backbone=restore_backbone(found.path))
  run = restore_run(found.path)
  return interface.Pretrained(backbone=run.method.eval_params(run.variables, 'ema'),
                              method=run.config.method, variables=run.variables)


def _layout(tree: PyTree) -> list[tuple[str, tuple[int, ...], str]]:
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return [(jax.tree_util.keystr(k), tuple(np.shape(v)), str(np.asarray(v).dtype))
          for k, v in leaves]


def _in_layout_of(pretrained: interface.Pretrained, variables: interface.Variables
                  ) -> interface.Pretrained:
  """`pretrained`'s capi_jax trees in the block-stack layout of `variables` (a run written with
  the other `efficiency.scan_layers`, a `convert` output of either)."""
  return pretrained._replace(
      backbone=stack.to_layout_of(pretrained.backbone, variables),
      variables=stack.to_layout_of(pretrained.variables, variables))


def _first_mismatch(problems: tuple[str, ...]) -> str:
  """The most telling of `problems`: a shape that differs, else a missing or extra name."""
  shapes = [p for p in problems if 'found (' in p]
  return (shapes or list(problems))[0]


def _refusal(error: ValueError, method: interface.Method, paths: dict[str, str]
             ) -> rules.CheckpointMismatchError:
  """`error` from `from_pretrained` as one line naming the file(s) and what to check."""
  which = ' / '.join(f'{path} ({role})' for role, path in paths.items())
  problems = getattr(error, 'problems', ())
  if not problems:
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return rules.CheckpointMismatchError(f'{which}: {first}')
  more = f' (and {len(problems) - 1} more)' if len(problems) > 1 else ''
  keys = ' / '.join(method.architecture_keys(role) for role in paths)
  return rules.CheckpointMismatchError(
      f'{which} does not fit the configured {method.name} model: {_first_mismatch(problems)}'
      f'{more}. Check {keys} against the checkpoint\'s architecture.', problems)


def apply(method: interface.Method, variables: interface.Variables) -> interface.Variables:
  """`variables` with the method's pretrained checkpoints put in (unchanged when it has none).

  Raises:
    CheckpointMismatchError: a checkpoint does not fit (one line: `_refusal`).
    ValueError: the method returned variables of another structure, shape or dtype.
  """
  paths = method.pretrained_paths()
  if not paths:
    return variables
  pretrained = {role: _in_layout_of(load(path), variables) for role, path in paths.items()}
  try:
    loaded = method.from_pretrained(jax.device_get(variables), pretrained)
  except ValueError as e:
    raise _refusal(e, method, paths) from e
  before, after = _layout(variables), _layout(loaded)
  if before != after:
    diffs = [f'{a} -> {b}' for a, b in zip(before, after) if a != b][:5]
    raise ValueError(f'{method.name}.from_pretrained changed the variables\' layout '
                     f'({len(before)} -> {len(after)} arrays; first differences: {diffs}).')
  return loaded
