"""Orbax checkpoints of the whole TrainState plus the Grain iterator state, with a config check.

Layout: `WORKDIR/checkpoints/<step>/{state, data_iter, config}`.
  - `state`: the TrainState, each process writing its shards (restored straight into the target
    shardings, so a resumed model is born sharded too);
  - `data_iter`: each process's Grain iterator state, so a resumed run reads exactly the batches
    an uninterrupted one would;
  - `config`: the architecture-relevant part of the config (`architecture`), checked on restore.
Saves are asynchronous (the device-to-host copy blocks, the writes do not) and atomic: Orbax
writes into a temporary directory and renames it when complete, so `latest_step` never sees a
checkpoint cut short by a kill; leftovers are removed on the next start.
"""

import json
import logging
import pathlib
from typing import Any

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp

from capi_jax import methods

PyTree = Any
logger = logging.getLogger(__name__)

_STATE, _DATA, _CONFIG = 'state', 'data_iter', 'config'


class IncompatibleCheckpointError(ValueError):
  """The checkpoint in the workdir was written by a run with a different architecture."""


def architecture(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """What decides the TrainState's structure and shapes (JSON-normalised): the method's
  signature (`Method.architecture`) plus the method's name and the parameters' dtype."""
  arch = {'method': config.method, **methods.from_config(config).architecture(),
          'efficiency.param_dtype': config.efficiency.param_dtype}
  return json.loads(json.dumps(arch))


def _differences(saved: dict[str, Any], current: dict[str, Any], prefix: str = '') -> list[str]:
  diffs = []
  for key in sorted(set(saved) | set(current)):
    a, b = saved.get(key, '<missing>'), current.get(key, '<missing>')
    if isinstance(a, dict) and isinstance(b, dict):
      diffs += _differences(a, b, f'{prefix}{key}.')
    elif a != b:
      diffs.append(f'{prefix}{key}: checkpoint {a!r} vs config {b!r}')
  return diffs


class Checkpointer:
  """Periodic, async, atomic checkpoints of (TrainState, Grain iterator) in one directory."""

  def __init__(self, directory: str | pathlib.Path, config: ml_collections.ConfigDict):
    ckpt_cfg = config.train.checkpointing
    self.directory = pathlib.Path(directory).absolute()
    self._architecture = architecture(config)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=ckpt_cfg.max_to_keep,
        enable_async_checkpointing=ckpt_cfg.async_save,
        # Interrupted saves leave temporary directories; they are never restored, only removed.
        cleanup_tmp_directories=True,
    )
    self.manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={
            _STATE: ocp.StandardCheckpointHandler(),
            _DATA: grain.checkpoint.CheckpointHandler(),
            _CONFIG: ocp.JsonCheckpointHandler(),
        })

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state: PyTree, data_iter: Any) -> None:
    """Starts an async save of `state` and the iterator position at `step` (steps done)."""
    # A save at a step that already has a checkpoint (e.g. final == periodic) is a no-op.
    if step in self.manager.all_steps():
      return
    self.manager.save(step, args=ocp.args.Composite(**{
        _STATE: ocp.args.StandardSave(state),
        _DATA: grain.checkpoint.CheckpointSave(data_iter),
        _CONFIG: ocp.args.JsonSave(self._architecture),
    }), force=True)

  def check_compatible(self, step: int) -> None:
    """Raises IncompatibleCheckpointError if checkpoint `step` has another architecture."""
    saved = self.manager.restore(
        step, args=ocp.args.Composite(**{_CONFIG: ocp.args.JsonRestore()}))[_CONFIG]
    diffs = _differences(saved, self._architecture)
    if diffs:
      raise IncompatibleCheckpointError(
          f'The checkpoint at {self.directory / str(step)} was written with another model '
          'config, so it cannot be resumed:\n  ' + '\n  '.join(diffs) +
          '\nUse a new --workdir for this config, or pass the config the checkpoint was '
          'trained with (its full config is in the workdir\'s config.json).')

  def restore(self, step: int, abstract_state: PyTree, data_iter: Any | None) -> PyTree:
    """The TrainState at `step`, placed like `abstract_state` (ShapeDtypeStructs with shardings).

    The iterator, if given, is moved to the saved position in place.
    """
    self.check_compatible(step)
    items = {_STATE: ocp.args.StandardRestore(abstract_state)}
    if data_iter is not None:
      items[_DATA] = grain.checkpoint.CheckpointRestore(data_iter)
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    logger.info('Restored checkpoint %s/%d.', self.directory, step)
    return restored[_STATE]

  def wait(self) -> None:
    """Blocks until the pending async save is complete on disk."""
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()


def restore_target(abstract_state: PyTree, shardings: PyTree | jax.sharding.Sharding) -> PyTree:
  """Orbax's restore target: `abstract_state`'s shapes and dtypes placed by `shardings`.

  `shardings` is a tree shaped like the state, or one Sharding for every leaf.
  """
  if isinstance(shardings, jax.sharding.Sharding):
    shardings = jax.tree.map(lambda _: shardings, abstract_state)
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract_state, shardings)
