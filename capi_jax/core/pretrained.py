"""Weights a new run starts from: `Method.pretrained_paths()` read into `Pretrained`s.

A path may be
  - an official-format file (`.pth`, `.pt` TorchScript, `.th`, `.npz`): its tensors under their
    official names, which the method converts with its model's converter;
  - the output directory of `python -m capi_jax.convert --to=capi_jax` (or its `params/`):
    its 'backbone';
  - a capi_jax training run of ANY method: a step folder (`WORKDIR/checkpoints/<step>`), the
    `checkpoints/` folder or the workdir (latest step), as `checkpointing.find_checkpoint`
    resolves them. The source run's own config (its newest record in WORKDIR/runs/) rebuilds
    its method, the state is restored (verified) on one device, and the `Pretrained` carries
    that method's evaluation backbone (its EMA where it has one), its name and its whole
    variables.
`apply` calls the method's `from_pretrained` and checks that the variables keep their
structure, shapes and dtypes.
"""

import pathlib
from typing import Any

import jax
import ml_collections
import numpy as np

from capi_jax import methods
from capi_jax.methods import base

PyTree = Any
_OFFICIAL_SUFFIXES = ('.pth', '.pt', '.th', '.npz')


def _run_config(step_dir: pathlib.Path) -> ml_collections.ConfigDict:
  from capi_jax.core import checkpointing  # pylint: disable=g-import-not-at-top
  from capi_jax.core import runs  # pylint: disable=g-import-not-at-top
  config = runs.latest_config(step_dir.parent.parent)
  if config is None:
    raise checkpointing.CheckpointNotFoundError(
        f'{step_dir} is a training checkpoint, but its run\'s config ('
        f'{step_dir.parent.parent / runs.RUNS_DIR}/*.json) is missing: it is needed to rebuild '
        'that run\'s model.')
  return config


def _from_training_run(step_dir: pathlib.Path) -> base.Pretrained:
  # The engine's state modules need the method registry; imported here, as only this path
  # restores a whole training state.
  from capi_jax.core import checkpointing  # pylint: disable=g-import-not-at-top
  from capi_jax.core import sharding  # pylint: disable=g-import-not-at-top
  from capi_jax.core import state as state_lib  # pylint: disable=g-import-not-at-top
  config = _run_config(step_dir)
  method = methods.from_config(config)
  device = jax.devices()[0]
  layout = state_lib.state_layout(config, method, sharding.make_mesh(config, [device]))
  target = checkpointing.restore_target(layout.abstract,
                                        jax.sharding.SingleDeviceSharding(device))
  state = checkpointing.restore_step_dir(step_dir, config, target)
  variables = jax.device_get(state.variables)
  return base.Pretrained(backbone=method.eval_params(variables, 'ema'), method=config.method,
                         variables=variables)


def load(path: str) -> base.Pretrained:
  """The weights at `path` (see the module docstring), as numpy trees."""
  from capi_jax import convert  # pylint: disable=g-import-not-at-top
  from capi_jax.core import checkpointing  # pylint: disable=g-import-not-at-top
  p = pathlib.Path(path)
  if p.is_file() and p.suffix in _OFFICIAL_SUFFIXES:
    return base.Pretrained(state_dict=convert.read_state_dict(p))
  if not p.is_dir():
    raise checkpointing.CheckpointNotFoundError(
        f'Pretrained checkpoint {path!r} is neither an official-format file '
        f'({", ".join(_OFFICIAL_SUFFIXES)}) nor a directory (a capi_jax run, step folder or '
        '`capi_jax.convert` output).')
  found = checkpointing.find_checkpoint(p)
  if found.kind == 'training':
    return _from_training_run(found.path)
  return base.Pretrained(backbone=convert.restore_backbone(found.path))


def _layout(tree: PyTree) -> list[tuple[str, tuple[int, ...], str]]:
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return [(jax.tree_util.keystr(k), tuple(np.shape(v)), str(np.asarray(v).dtype))
          for k, v in leaves]


def apply(method: base.Method, variables: base.Variables) -> base.Variables:
  """`variables` with the method's pretrained checkpoints put in (unchanged when it has none).

  Raises:
    ValueError: the method returned variables of another structure, shape or dtype.
  """
  paths = method.pretrained_paths()
  if not paths:
    return variables
  pretrained = {role: load(path) for role, path in paths.items()}
  loaded = method.from_pretrained(jax.device_get(variables), pretrained)
  before, after = _layout(variables), _layout(loaded)
  if before != after:
    diffs = [f'{a} -> {b}' for a, b in zip(before, after) if a != b][:5]
    raise ValueError(f'{method.name}.from_pretrained changed the variables\' layout '
                     f'({len(before)} -> {len(after)} arrays; first differences: {diffs}).')
  return loaded
