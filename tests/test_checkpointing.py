"""Checkpoints: round trip with the Grain iterator, atomicity, the config compatibility check."""

import shutil

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from capi_jax.base import sharding
from capi_jax.engine import checkpointing
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
  other.model.embed_dim = 64
  other.capi.num_clusters = 32
  other.model.drop_path_rate = 0.3  # Not architectural: never a reason to refuse.
  ckpt = checkpointing.Checkpointer(tmp_path, other)
  with pytest.raises(checkpointing.IncompatibleCheckpointError) as e:
    ckpt.restore(1, _target(_state(mesh, 0.0)), None)
  message = str(e.value)
  assert 'model.embed_dim: checkpoint 32 vs config 64' in message
  assert 'capi.num_clusters: checkpoint 16 vs config 32' in message
  assert 'drop_path_rate' not in message and 'new --workdir' in message
  ckpt.close()
