"""Checkpoints: round trip with the Grain iterator, atomicity, the config compatibility check, the
block-stack layouts."""

import shutil

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from capi_jax.base import interface
from capi_jax.base import sharding
from capi_jax.engine import checkpointing
from capi_jax.engine import pretrained
from capi_jax.models import stack
from test_train_step import micro_config


def _target(state):
  """Restore target placed like the live `state`."""
  return checkpointing.restore_target(state, jax.tree.map(lambda x: x.sharding, state))


def _state(mesh, value: float):
  tree = {'w': jnp.full((8, 4), value), 'b': jnp.arange(6.0) + value, 'step': jnp.int32(3)}
  shardings = sharding.tree_shardings(mesh, tree, (('.*', 'fsdp'),))
  return jax.device_put(tree, shardings)


def _iterator():
  return iter(grain.MapDataset.range(100).shuffle(seed=1).to_iter_dataset())


def test_round_trip_with_iterator_state(tmp_path):
  config = micro_config()
  mesh = sharding.make_mesh(config)
  ckpt = checkpointing.Checkpointer(tmp_path, config)
  state, it = _state(mesh, 1.0), _iterator()
  for _ in range(5):
    next(it)
  ckpt.save(5, state, it)
  ckpt.wait()
  upcoming = [next(it) for _ in range(3)]

  fresh = _iterator()
  restored = ckpt.restore(ckpt.latest_step(), _target(state), fresh)
  assert [next(fresh) for _ in range(3)] == upcoming
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored), jax.device_get(state))
  assert restored['w'].sharding == state['w'].sharding
  ckpt.close()


def test_max_to_keep_and_interrupted_save_is_ignored(tmp_path):
  config = micro_config()
  config.train.checkpointing.max_to_keep = 2
  mesh = sharding.make_mesh(config)
  ckpt = checkpointing.Checkpointer(tmp_path, config)
  it = _iterator()
  for step in (1, 2, 3):
    ckpt.save(step, _state(mesh, float(step)), it)
  ckpt.wait()
  assert ckpt.all_steps() == [2, 3]
  ckpt.close()
  # A save killed half-way: Orbax writes into a temporary directory and renames it when done.
  partial = tmp_path / '4.orbax-checkpoint-tmp-1234567'
  shutil.copytree(tmp_path / '3', partial)
  shutil.rmtree(partial / 'state')
  ckpt = checkpointing.Checkpointer(tmp_path, config)
  assert ckpt.latest_step() == 3
  restored = ckpt.restore(3, _target(_state(mesh, 0.0)), None)
  np.testing.assert_array_equal(restored['w'], np.full((8, 4), 3.0))
  ckpt.close()
  assert not partial.exists()  # Cleaned up on start.


def test_checkpoint_from_another_architecture_is_refused(tmp_path):
  config = micro_config()
  mesh = sharding.make_mesh(config)
  ckpt = checkpointing.Checkpointer(tmp_path, config)
  ckpt.save(1, _state(mesh, 1.0), _iterator())
  ckpt.close()

  other = micro_config()
  other.capi.model.embed_dim = 64
  other.capi.num_clusters = 32
  other.capi.model.drop_path_rate = 0.3  # Not architectural: never a reason to refuse.
  ckpt = checkpointing.Checkpointer(tmp_path, other)
  with pytest.raises(checkpointing.IncompatibleCheckpointError) as e:
    ckpt.restore(1, _target(_state(mesh, 0.0)), None)
  message = str(e.value)
  assert 'model.embed_dim: checkpoint 32 vs config 64' in message
  assert 'capi.num_clusters: checkpoint 16 vs config 32' in message
  assert 'drop_path_rate' not in message and 'new --workdir' in message
  ckpt.close()


@pytest.mark.parametrize('save_scanned', [False, True])
def test_checkpoint_moves_between_block_layouts(tmp_path, save_scanned):
  """efficiency.scan_layers changed between runs: the checkpoint is read in its own layout
  (per-block `blocks_i` or stacked `blocks`), converted, and placed like the target."""
  config = micro_config()
  mesh = sharding.make_mesh(config)
  block = lambda v: {'w': jnp.full((8, 4), v), 'b': jnp.full((4,), v)}
  loop = {'params': {'encoder': {'blocks_0': block(1.0), 'blocks_1': block(2.0)}},
          'opt_state': ({'mu': {'encoder': {'blocks_0': block(3.0), 'blocks_1': block(4.0)}}},),
          'step': jnp.int32(7)}
  place = lambda tree: jax.device_put(tree, sharding.tree_shardings(mesh, tree, (('.*', 'fsdp'),)))
  loop, scanned = place(loop), place(stack.to_scan_layout(loop))
  saved, wanted = (scanned, loop) if save_scanned else (loop, scanned)
  ckpt = checkpointing.Checkpointer(tmp_path, config)
  ckpt.save(1, saved, _iterator())
  ckpt.wait()
  restored = ckpt.restore(1, _target(wanted), None)
  assert jax.tree.structure(restored) == jax.tree.structure(wanted)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored), jax.device_get(wanted))
  jax.tree.map(lambda r, w: r.sharding.is_equivalent_to(w.sharding, r.ndim) or pytest.fail(
      f'{r.sharding} != {w.sharding}'), restored, wanted)
  ckpt.close()


def test_pretrained_weights_take_the_runs_block_layout():
  """A backbone or run written with the other `scan_layers` is converted for the method."""
  loop = {'encoder': {'blocks_0': {'w': np.ones((2, 3))}, 'blocks_1': {'w': np.zeros((2, 3))}}}
  scanned = stack.to_scan_layout(loop)
  run_vars = interface.Variables({'backbone': loop}, {}, {})
  found = pretrained._in_layout_of(
      interface.Pretrained(backbone=scanned, method='capi',
                           variables=interface.Variables({'backbone': scanned}, {}, {})),
      run_vars)
  jax.tree.map(np.testing.assert_array_equal, found.backbone, loop)
  jax.tree.map(np.testing.assert_array_equal, found.variables, run_vars)
  as_scanned = pretrained._in_layout_of(interface.Pretrained(backbone=loop),
                                        interface.Variables({'backbone': scanned}, {}, {}))
  assert as_scanned.backbone['encoder']['blocks']['w'].shape == (2, 2, 3)
  assert as_scanned.variables is None
