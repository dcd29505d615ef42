"""AdamW with parameter groups vs a float64 transcription of PyTorch's AdamW step."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from capi_jax.base import optim
from capi_jax.methods.capi import optim as capi_optim


def _optim_cfg():
  return ml_collections.ConfigDict(dict(
      patch_embed_lr_mult=0.2, rope_lr_mult=0.0, layernorm_wd_mult=0.1))


def test_group_multipliers_follow_reference_rules():
  mults = lambda name: capi_optim.group_multipliers(
      name, patch_embed_lr_mult=0.2, rope_lr_mult=0.0, layernorm_wd_mult=0.1)
  assert mults('backbone/patch_embed/kernel') == (0.2, 1.0)
  assert mults('backbone/patch_embed/bias') == (0.2, 0.0)
  assert mults('backbone/encoder/blocks_0/attn/rope/freqs') == (0.0, 1.0)
  assert mults('backbone/encoder/blocks_0/norm1/scale') == (1.0, 0.1)
  assert mults('backbone/encoder/blocks_0/ls1/gamma') == (1.0, 0.0)
  assert mults('backbone/encoder/blocks_0/mlp/fc1/kernel') == (1.0, 1.0)
  assert mults('backbone/mask_token') == (1.0, 1.0)
  assert mults('head/g') == (1.0, 1.0)


def _torch_adamw(p, grads, lr, wd, betas, eps):
  """PyTorch's AdamW (foreach=False, amsgrad=False) over several steps, in float64."""
  b1, b2 = betas
  m, v = np.zeros_like(p), np.zeros_like(p)
  for t, g in enumerate(grads, start=1):
    p = p * (1 - lr[t - 1] * wd)
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    denom = np.sqrt(v) / np.sqrt(1 - b2**t) + eps
    p = p - lr[t - 1] / (1 - b1**t) * m / denom
  return p


def test_adamw_matches_pytorch_per_group():
  rng = np.random.default_rng(0)
  params = {
      'patch_embed': {'kernel': rng.normal(size=(4, 3)), 'bias': rng.normal(size=(3,))},
      'norm': {'scale': rng.normal(size=(3,))},
      'rope': {'freqs': rng.normal(size=(2, 4))},
      'w': rng.normal(size=(5, 2)),
  }
  params32 = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
  grads = [jax.tree.map(lambda x: rng.normal(size=x.shape), params) for _ in range(3)]
  lrs = [1e-2, 2e-2, 3e-2]
  lr_fn = lambda step: jnp.asarray(lrs)[step]
  lr_mults, wd_mults = capi_optim.param_group_trees(params32, _optim_cfg())
  tx = optim.adamw(lr_fn, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1,
                   lr_mults=lr_mults, wd_mults=wd_mults)
  state = tx.init(params32)
  p = params32
  for g in grads:
    updates, state = tx.update(jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), g), state, p)
    p = jax.tree.map(lambda a, u: a + u, p, updates)

  for path, value in jax.tree_util.tree_leaves_with_path(params):
    name = optim.path_name(path)
    lr_mult, wd_mult = capi_optim.group_multipliers(
        name, patch_embed_lr_mult=0.2, rope_lr_mult=0.0, layernorm_wd_mult=0.1)
    leaf_grads = [np.asarray(_get(g, path)) for g in grads]
    expected = _torch_adamw(value, leaf_grads, [lr * lr_mult for lr in lrs], 0.1 * wd_mult,
                            (0.9, 0.95), 1e-8)
    # float32 arithmetic vs float64: a few ulps of the parameter scale.
    np.testing.assert_allclose(np.asarray(_get(p, path)), expected, atol=2e-6, err_msg=name)
  np.testing.assert_array_equal(p['rope']['freqs'], params32['rope']['freqs'])


def _get(tree, path):
  for key in path:
    tree = tree[key.key]
  return tree


def test_partition_steps_each_group_on_its_own_parts():
  params = {'a': jnp.ones(3), 'b': jnp.ones(2), 'c': jnp.ones(1)}
  grads = {'a': jnp.ones(3), 'b': jnp.ones(2), 'c': jnp.ones(1)}
  tx = optim.partition({'first': (('a', 'b'), optax.sgd(1.0)),
                        'second': (('c',), optax.sgd(0.5))})
  updates, state = tx.update(grads, tx.init(params), params)
  np.testing.assert_array_equal(updates['a'], -np.ones(3))
  np.testing.assert_array_equal(updates['c'], [-0.5])
  assert set(state.inner) == {'first', 'second'}


def test_partition_needs_every_part_in_exactly_one_group():
  tx = optim.partition({'first': (('a',), optax.sgd(1.0))})
  with pytest.raises(ValueError, match='every part needs exactly one group'):
    tx.init({'a': jnp.ones(1), 'b': jnp.ones(1)})
