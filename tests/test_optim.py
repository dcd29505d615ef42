"""Parameter groups and AdamW vs PyTorch's AdamW step; several optimisers; the EMA."""

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


def test_capi_groups_follow_reference_rules():
  group = lambda name: capi_optim.param_group(
      name, patch_embed_lr_mult=0.2, rope_lr_mult=0.0, layernorm_wd_mult=0.1)
  assert group('backbone/patch_embed/kernel') == optim.Group(0.2, 1.0)
  assert group('backbone/patch_embed/bias') == optim.Group(0.2, 0.0)
  assert group('backbone/encoder/blocks_0/attn/rope/freqs') == optim.Group(0.0, 1.0)
  assert group('backbone/encoder/blocks_0/norm1/scale') == optim.Group(1.0, 0.1)
  assert group('backbone/encoder/blocks_0/ls1/gamma') == optim.Group(1.0, 0.0)
  assert group('backbone/encoder/blocks_0/mlp/fc1/kernel') == optim.Group(1.0, 1.0)
  assert group('backbone/mask_token') == optim.Group(1.0, 1.0)
  assert group('head/g') == optim.Group(1.0, 1.0)


def test_group_tree_passes_path_and_ndim():
  params = {'a': {'kernel': jnp.zeros((2, 3))}, 'b': jax.ShapeDtypeStruct((4,), jnp.float32)}
  seen = []
  tree = optim.group_tree(params, lambda path, ndim: seen.append((path, ndim)) or optim.Group())
  assert sorted(seen) == [('a/kernel', 2), ('b', 1)]
  assert jax.tree.structure(tree, is_leaf=lambda x: isinstance(x, optim.Group)) == (
      jax.tree.structure(params))


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
  groups = capi_optim.param_groups(params32, _optim_cfg())
  tx = optim.adamw(lr_fn, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, groups=groups)
  state = tx.init(params32)
  p = params32
  for g in grads:
    updates, state = tx.update(jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), g), state, p)
    p = jax.tree.map(lambda a, u: a + u, p, updates)

  for path, value in jax.tree_util.tree_leaves_with_path(params):
    name = optim.path_name(path)
    group = capi_optim.param_group(
        name, patch_embed_lr_mult=0.2, rope_lr_mult=0.0, layernorm_wd_mult=0.1)
    leaf_grads = [np.asarray(_get(g, path)) for g in grads]
    expected = _torch_adamw(value, leaf_grads, [lr * group.lr_mult for lr in lrs],
                            0.1 * group.wd_mult, (0.9, 0.95), 1e-8)
    # float32 arithmetic vs float64: a few ulps of the parameter scale.
    np.testing.assert_allclose(np.asarray(_get(p, path)), expected, atol=2e-6, err_msg=name)
  np.testing.assert_array_equal(p['rope']['freqs'], params32['rope']['freqs'])


def test_adamw_groups_match_torch_param_groups():
  """Two steps against torch.optim.AdamW itself, one torch param group per `Group`."""
  torch = pytest.importorskip('torch')
  rng = np.random.default_rng(1)
  shapes = {'decayed': (3, 4), 'slow': (5,), 'no_decay': (2, 2), 'frozen': (3,)}
  groups = {'decayed': optim.Group(), 'slow': optim.Group(lr_mult=0.25, wd_mult=0.5),
            'no_decay': optim.Group(lr_mult=2.0, wd_mult=0.0), 'frozen': optim.Group(frozen=True)}
  params = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
  grads = [{k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
           for _ in range(2)]
  lr, wd, betas, eps = 1e-2, 0.05, (0.9, 0.95), 1e-8

  tensors = {k: torch.nn.Parameter(torch.tensor(v)) for k, v in params.items()}
  tensors['frozen'].requires_grad_(False)
  torch_opt = torch.optim.AdamW(
      [{'params': [tensors[k]], 'lr': lr * g.lr_mult, 'weight_decay': wd * g.wd_mult}
       for k, g in groups.items() if not g.frozen], betas=betas, eps=eps)
  for g in grads:
    for k, t in tensors.items():
      t.grad = None if groups[k].frozen else torch.tensor(g[k])
    torch_opt.step()

  tx = optim.adamw(lambda step: jnp.float32(lr), betas=betas, eps=eps, weight_decay=wd,
                   groups=groups, state_labels=optim.STATE_LABELS)
  p = jax.tree.map(jnp.asarray, params)
  state = tx.init(p)
  for g in grads:
    updates, state = tx.update(jax.tree.map(jnp.asarray, g), state, p)
    p = optax.apply_updates(p, updates)
  for k, t in tensors.items():
    # float32 both: optax's bias corrections and torch's differ by rounding only.
    np.testing.assert_allclose(p[k], t.detach().numpy(), rtol=0, atol=1e-6, err_msg=k)
  np.testing.assert_array_equal(p['frozen'], params['frozen'])


def test_frozen_leaf_gets_no_state_and_no_update():
  params = {'trained': jnp.ones((2, 3)), 'frozen': jnp.full((4,), 2.0)}
  groups = {'trained': optim.Group(), 'frozen': optim.Group(frozen=True)}
  tx = optim.adamw(lambda step: jnp.float32(0.1), betas=(0.9, 0.999), eps=1e-8,
                   weight_decay=0.5, groups=groups, state_labels=('on', 'off'))
  state = tx.init(params)
  # Adam's mu and nu of the trained leaf, Adam's and the schedule's step counters: nothing else.
  assert sum(x.size for x in jax.tree.leaves(state)) == 2 * 6 + 2
  assert set(state.inner_states) == {'on', 'off'}
  assert not jax.tree.leaves(state.inner_states['off'])
  updates, _ = tx.update({'trained': jnp.ones((2, 3)), 'frozen': jnp.ones(4)}, state, params)
  np.testing.assert_array_equal(updates['frozen'], np.zeros(4))
  assert np.all(np.asarray(updates['trained']) < 0)


def test_frozen_groups_need_state_labels():
  groups = {'a': optim.Group(frozen=True)}
  with pytest.raises(ValueError, match='state_labels'):
    optim.adamw(lambda step: 0.1, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, groups=groups)
  with pytest.raises(ValueError, match='pass groups'):
    optim.adamw(lambda step: 0.1, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                state_labels=optim.STATE_LABELS)


def test_ema_update_averages_in_dtype_and_copies_frozen_leaves():
  average = {'a': jnp.array([1.0, 2.0], jnp.bfloat16), 'f': jnp.array([0.0])}
  new = {'a': jnp.array([3.0, 4.0]), 'f': jnp.array([5.0])}
  out = optim.ema_update(average, new, 0.75)
  assert out['a'].dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out['a'], np.float32), [1.5, 2.5])
  np.testing.assert_allclose(out['f'], [1.25])
  groups = {'a': optim.Group(), 'f': optim.Group(frozen=True)}
  out = optim.ema_update(average, new, jnp.float32(0.75), groups)
  np.testing.assert_array_equal(out['f'], [5.0])
  np.testing.assert_allclose(np.asarray(out['a'], np.float32), [1.5, 2.5])


def _get(tree, path):
  for key in path:
    tree = tree[key.key]
  return tree


def test_partition_steps_each_optimizer_on_its_own_parts():
  params = {'a': jnp.ones(3), 'b': jnp.ones(2), 'c': jnp.ones(1)}
  grads = {'a': jnp.ones(3), 'b': jnp.ones(2), 'c': jnp.ones(1)}
  tx = optim.partition({'first': (('a', 'b'), optax.sgd(1.0)),
                        'second': (('c',), optax.sgd(0.5))})
  updates, state = tx.update(grads, tx.init(params), params)
  np.testing.assert_array_equal(updates['a'], -np.ones(3))
  np.testing.assert_array_equal(updates['c'], [-0.5])
  assert set(state.inner) == {'first', 'second'}


def test_partition_needs_every_part_in_exactly_one_optimizer():
  tx = optim.partition({'first': (('a',), optax.sgd(1.0))})
  with pytest.raises(ValueError, match='every part needs exactly one optimiser'):
    tx.init({'a': jnp.ones(1), 'b': jnp.ones(1)})
