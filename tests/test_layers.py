"""The transformer parts every backbone shares (models/layers.py, models/stack.py), each against
a plain float64 reference."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from capi_jax.models import layers
from capi_jax.models import stack

# float32 against float64 on values of order 1.
TOL = 2e-5


class ScaleByPosition(nn.Module):
  """A toy rotary hook: tokens at position p are multiplied by (1 + p); no parameters."""
  head_dim: int

  def __call__(self, positions):
    scale = 1.0 + positions[:, :, None, :1]  # (batch or 1, n, 1, 1): broadcasts over heads.
    return lambda t: t * scale


def _random_params(module, *args, seed=0, **kwargs):
  """Every parameter random (biases included, which initialise at zero)."""
  shapes = jax.eval_shape(module.init, jax.random.key(0), *args, **kwargs)['params']
  leaves, treedef = jax.tree.flatten(shapes)
  rng = np.random.default_rng(seed)
  return jax.tree.unflatten(
      treedef, [(0.3 * rng.normal(size=x.shape)).astype(np.float32) for x in leaves])


def _reference_attention(params, x, context, value, num_heads, projections, qkv_bias,
                         rotate_q=None, rotate_k=None):
  """softmax(q k^T / sqrt(head_dim)) v with every projection written out, float64."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  x = np.asarray(x, np.float64)
  kv_in = x if context is None else np.asarray(context, np.float64)
  v_in = kv_in if value is None else np.asarray(value, np.float64)
  dim = x.shape[-1]
  head_dim = dim // num_heads
  inner = head_dim * num_heads
  if len(projections) == 1:
    w = p[projections[0]]['kernel']
    b = p[projections[0]].get('bias', np.zeros(3 * inner))
    layer = lambda t, j: t @ w[:, j * inner:(j + 1) * inner] + b[j * inner:(j + 1) * inner]
    q, k, v = layer(x, 0), layer(kv_in, 1), layer(v_in, 2)
  else:
    layer = lambda name, t: t @ p[name]['kernel'] + p[name].get('bias', 0.0)
    q, k, v = (layer(n, t) for n, t in zip(projections, (x, kv_in, v_in)))
  if qkv_bias == 'q_v':
    q, v = q + p['q_bias'], v + p['v_bias']
  heads = lambda t: t.reshape(t.shape[0], t.shape[1], num_heads, head_dim).transpose(0, 2, 1, 3)
  q, k, v = heads(q), heads(k), heads(v)
  if rotate_q is not None:
    q, k = rotate_q(q), rotate_k(k)
  logits = q @ k.transpose(0, 1, 3, 2) / np.sqrt(head_dim)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  out = (probs @ v).transpose(0, 2, 1, 3).reshape(x.shape[0], x.shape[1], inner)
  return out @ p['proj']['kernel'] + p['proj'].get('bias', 0.0)


@pytest.mark.parametrize('qkv_bias', ['full', 'q_v', 'none'])
def test_fused_self_attention_matches_reference(qkv_bias):
  """The standard ViT's attention: one `qkv` layer, rows [q; k; v]."""
  attn = layers.Attention(4, qkv_bias=qkv_bias)
  x = jax.random.normal(jax.random.key(1), (2, 7, 32))
  params = _random_params(attn, x)
  expected_names = {'qkv', 'proj'} | ({'q_bias', 'v_bias'} if qkv_bias == 'q_v' else set())
  assert set(params) == expected_names
  assert ('bias' in params['qkv']) == (qkv_bias == 'full')
  assert params['qkv']['kernel'].shape == (32, 96)
  got = attn.apply({'params': params}, x)
  np.testing.assert_allclose(
      got, _reference_attention(params, x, None, None, 4, ('qkv',), qkv_bias), atol=TOL, rtol=TOL)


def test_separate_cross_attention_with_value_input_matches_reference():
  """CAE v2's regressor: q, k, v from three inputs, q_bias and v_bias, heads narrower than
  dim / num_heads would need (inner width 30 < dim 32)."""
  attn = layers.Attention(3, projections=('q', 'k', 'v'), qkv_bias='q_v')
  x = jax.random.normal(jax.random.key(1), (2, 5, 32))
  context = jax.random.normal(jax.random.key(2), (2, 9, 32))
  value = jax.random.normal(jax.random.key(3), (2, 9, 32))
  params = _random_params(attn, x, context=context, value=value)
  assert set(params) == {'q', 'k', 'v', 'q_bias', 'v_bias', 'proj'}
  assert params['q']['kernel'].shape == (32, 30) and params['proj']['kernel'].shape == (30, 32)
  assert 'bias' not in params['k'] and 'bias' in params['proj']
  got = attn.apply({'params': params}, x, context=context, value=value)
  expected = _reference_attention(params, x, context, value, 3, ('q', 'k', 'v'), 'q_v')
  np.testing.assert_allclose(got, expected, atol=TOL, rtol=TOL)


@pytest.mark.parametrize('cross', [False, True])
def test_rotary_attention_rotates_q_and_k_at_their_positions(cross):
  """CAPI's layout: bias-free q_proj / k_proj / v_proj / proj on 2-D tokens, a rotary hook,
  self-attention or cross-attention on a context with its own positions."""
  attn = layers.Attention(2, projections=('q_proj', 'k_proj', 'v_proj'), qkv_bias='none',
                          out_bias=False, rotary=ScaleByPosition, flat_tokens=True)
  x = jax.random.normal(jax.random.key(1), (2, 5, 16))
  positions = jax.random.uniform(jax.random.key(2), (1, 5, 2))
  context = jax.random.normal(jax.random.key(3), (2, 6, 16)) if cross else None
  context_positions = jax.random.uniform(jax.random.key(4), (2, 6, 2)) if cross else None
  args = (x, positions, context, context_positions)
  params = _random_params(attn, *args)
  assert set(params) == {'q_proj', 'k_proj', 'v_proj', 'proj'}
  assert all(set(params[n]) == {'kernel'} for n in params)
  got = attn.apply({'params': params}, *args)
  # The reference rotates heads-major (batch, heads, n, head_dim) tokens.
  hook = lambda pos: (lambda t: t * (1.0 + np.asarray(pos, np.float64)[:, None, :, :1]))
  expected = _reference_attention(params, x, context, None, 2, ('q_proj', 'k_proj', 'v_proj'),
                                  'none', hook(positions),
                                  hook(context_positions if cross else positions))
  np.testing.assert_allclose(got, expected, atol=TOL, rtol=TOL)


def test_fused_projection_refuses_a_context():
  attn = layers.Attention(2)
  x = jnp.ones((1, 3, 8))
  with pytest.raises(ValueError, match='fused'):
    attn.init(jax.random.key(0), x, context=x)


def test_attention_rejects_an_unknown_bias_kind():
  with pytest.raises(ValueError, match='qkv_bias'):
    layers.Attention(2, qkv_bias='k').init(jax.random.key(0), jnp.ones((1, 3, 8)))


def test_drop_path_keeps_whole_samples_and_the_mean():
  x = jnp.ones((4000, 2, 3))
  y = np.asarray(layers.drop_path(x, 0.25, False, lambda _: jax.random.key(0)))
  per_sample = y.reshape(4000, -1)
  assert set(np.unique(per_sample).tolist()) == {0.0, float(np.float32(1) / np.float32(0.75))}
  assert np.all(per_sample == per_sample[:, :1])
  assert abs(y.mean() - 1.0) < 0.05


def test_drop_path_draws_only_when_it_can_drop():
  """Deterministic or a Python rate of 0: x itself, no rng asked; a traced rate of 0 (per layer
  under a scan) draws and keeps everything, scaled by exactly 1."""
  x = jax.random.normal(jax.random.key(0), (6, 4))

  def no_rng(_):
    raise AssertionError('asked for an rng')

  assert layers.drop_path(x, 0.5, True, no_rng) is x
  assert layers.drop_path(x, 0.0, False, no_rng) is x
  traced = jax.jit(lambda r: layers.drop_path(x, r, False, lambda _: jax.random.key(1)))
  np.testing.assert_array_equal(traced(0.0), x)
  assert np.any(np.asarray(traced(0.5)) == 0)


def test_layer_norm_is_torchs_two_pass_layer_norm():
  """Large means make E[x^2] - E[x]^2 lose digits; the centred variance does not."""
  x = 1000.0 + jax.random.normal(jax.random.key(0), (3, 64))
  norm = layers.layer_norm(1e-6)
  params = _random_params(norm, x)
  got = norm.apply({'params': params}, x)
  x64 = np.asarray(x, np.float64)
  centred = x64 - x64.mean(-1, keepdims=True)
  expected = centred / np.sqrt((centred ** 2).mean(-1, keepdims=True) + 1e-6)
  expected = expected * params['scale'] + params['bias']
  np.testing.assert_allclose(got, expected, atol=1e-3, rtol=1e-4)


class AddBlock(nn.Module):
  """x + w * offset + layer_value, with one parameter w (dim,)."""
  layer_value: float = 0.0

  @nn.compact
  def __call__(self, x, offset):
    w = self.param('w', nn.initializers.ones, (x.shape[-1],))
    return x + w * offset + self.layer_value


class Owner(nn.Module):
  """Holds a stack of 4 AddBlocks in its own scope."""
  n_run: int | None = None
  remat_policy: str = 'none'
  scan: bool = False
  keep: tuple[int, ...] = (0, 2)

  @nn.compact
  def __call__(self, x, offset):
    return stack.block_stack(AddBlock, {}, x, offset, depth=4, name='blocks',
                             remat_policy=self.remat_policy,
                             layer_fields={'layer_value': (0.0, 10.0, 20.0, 30.0)},
                             n_run=self.n_run, keep=self.keep, scan=self.scan)


@pytest.mark.parametrize('scan', [False, True])
@pytest.mark.parametrize('policy', layers.REMAT_POLICIES)
def test_block_stack_runs_named_blocks_in_order_and_keeps_outputs(policy, scan):
  x, offset = jnp.zeros((2, 3)), jnp.ones((2, 3))
  owner = Owner(remat_policy=policy, scan=scan)
  variables = owner.init(jax.random.key(0), x, offset)
  if scan:
    assert jax.tree.map(np.shape, variables['params']) == {'blocks': {'w': (4, 3)}}
  else:
    assert set(variables['params']) == {'blocks_0', 'blocks_1', 'blocks_2', 'blocks_3'}
  out, kept = owner.apply(variables, x, offset)
  np.testing.assert_array_equal(out, np.full((2, 3), 4 + 60.0))
  assert sorted(kept) == [0, 2]
  np.testing.assert_array_equal(kept[0], np.full((2, 3), 1.0))
  np.testing.assert_array_equal(kept[2], np.full((2, 3), 3 + 30.0))
  grads = jax.grad(lambda v: jnp.sum(owner.apply(v, x, offset)[0]))(variables)
  assert all(np.all(g == 2.0) for g in jax.tree.leaves(grads))


@pytest.mark.parametrize('scan', [False, True])
def test_block_stack_runs_only_the_first_n_run_blocks(scan):
  x, offset = jnp.zeros((2, 3)), jnp.ones((2, 3))
  variables = Owner(scan=scan).init(jax.random.key(0), x, offset)
  out, kept = Owner(n_run=1, scan=scan).apply(variables, x, offset)
  np.testing.assert_array_equal(out, np.ones((2, 3)))
  assert sorted(kept) == [0]
  out, kept = Owner(n_run=0, scan=scan).apply(variables, x, offset)
  assert out is x and not kept


def test_scanned_stack_equals_the_loop_on_converted_parameters():
  """Random per-block parameters, loop vs scan on `to_scan_layout` of them; no kept outputs
  too (no buffer is carried then)."""
  x, offset = jax.random.normal(jax.random.key(0), (2, 3)), jnp.ones((2, 3))
  loop = Owner(keep=())
  params = jax.tree.map(lambda w: w * np.float32(np.random.default_rng(0).normal()),
                        loop.init(jax.random.key(0), x, offset)['params'])
  scanned = stack.to_scan_layout(params)
  assert jax.tree.map(np.shape, scanned) == {'blocks': {'w': (4, 3)}}
  got = Owner(keep=(), scan=True).apply({'params': scanned}, x, offset)
  np.testing.assert_allclose(got[0], loop.apply({'params': params}, x, offset)[0], rtol=1e-6)
  assert got[1] == {}


def test_block_stack_rejects_an_unknown_remat_policy():
  with pytest.raises(ValueError, match='remat_policy'):
    Owner(remat_policy='all').init(jax.random.key(0), jnp.zeros((1, 2)), jnp.ones((1, 2)))


class Sowing(nn.Module):
  """Sows its input, then runs a stack of two Dense blocks."""

  @nn.compact
  def __call__(self, x):
    self.sow('intermediates', 'input', x)
    return stack.block_stack(nn.Dense, {'features': 3}, x, depth=2)[0]


def test_block_stack_applies_with_a_mutable_collection():
  """Gathered blocks read their parameters also when another collection is mutable (CAE v2's
  regressor sows its intermediates)."""
  x = jnp.ones((2, 3))
  variables = Sowing().init(jax.random.key(0), x)
  out, state = Sowing().apply(variables, x, mutable=['intermediates'])
  np.testing.assert_array_equal(out, Sowing().apply(variables, x))
  assert list(state['intermediates']) == ['input']


# ---------------------------------------------------------------------------- layouts
def _loop_tree():
  block = lambda i: {'attn': {'kernel': np.full((2, 3), i, np.float32)},
                     'norm': {'scale': np.full((3,), i, np.float32)}}
  return {'encoder': {'blocks_0': block(0), 'blocks_1': block(1), 'other_0': {'b': np.ones(1)}},
          'regresser': {'regressor_blocks_0': block(5)}, 'head': {'Dense_0': {'b': np.ones(2)}}}


def test_layouts_round_trip_and_leave_other_names_alone():
  loop = _loop_tree()
  scanned = stack.to_scan_layout(loop)
  assert jax.tree.map(np.shape, scanned) == {
      'encoder': {'blocks': {'attn': {'kernel': (2, 2, 3)}, 'norm': {'scale': (2, 3)}},
                  'other_0': {'b': (1,)}},
      'regresser': {'regressor_blocks': {'attn': {'kernel': (1, 2, 3)}, 'norm': {'scale': (1, 3)}}},
      'head': {'Dense_0': {'b': (2,)}}}
  np.testing.assert_array_equal(scanned['encoder']['blocks']['norm']['scale'][1], np.ones(3))
  assert stack.is_scanned(scanned) and not stack.has_loop_stack(scanned)
  assert stack.has_loop_stack(loop) and not stack.is_scanned(loop)
  back = stack.to_loop_layout(scanned)
  assert jax.tree.structure(back) == jax.tree.structure(loop)
  jax.tree.map(np.testing.assert_array_equal, back, loop)
  assert stack.to_layout_of(loop, scanned)['encoder']['blocks']['attn']['kernel'].shape == (2, 2, 3)
  assert stack.to_layout_of(scanned, loop).keys() == loop.keys()
  assert stack.to_layout_of(loop, loop) is loop
  assert stack.to_layout_of(loop, {'head': {}}) is loop  # A target without stacks.


def test_layouts_go_through_states_and_keep_shardings():
  """Optimiser states (NamedTuples, None), abstract leaves with their shardings (the layer
  axis never sharded), per-leaf settings that every block shares."""
  mesh = jax.make_mesh((1,), ('fsdp',), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=jax.devices()[:1])
  spec = lambda *s: jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*s))
  leaf = lambda: jax.ShapeDtypeStruct((4, 8), jnp.float32, sharding=spec(None, 'fsdp'))
  state = ({'blocks_0': {'w': leaf()}, 'blocks_1': {'w': leaf()}},
           (None, {'mu': {'blocks_0': {'w': leaf()}, 'blocks_1': {'w': leaf()}}}),
           {'blocks_0': {'w': 0.5}, 'blocks_1': {'w': 0.5}})
  scanned = stack.to_scan_layout(state)
  stacked = scanned[0]['blocks']['w']
  assert stacked.shape == (2, 4, 8)
  assert stacked.sharding.spec == jax.sharding.PartitionSpec(None, None, 'fsdp')
  assert scanned[1][0] is None and scanned[1][1]['mu']['blocks']['w'].shape == (2, 4, 8)
  assert scanned[2] == {'blocks': {'w': 0.5}}
  back = stack.to_loop_layout(scanned[:2])
  assert back[0]['blocks_1']['w'].sharding.spec == jax.sharding.PartitionSpec(None, 'fsdp')
  with pytest.raises(ValueError, match='no layer count'):
    stack.to_loop_layout(scanned[2])
  with pytest.raises(ValueError, match='different settings'):
    stack.to_scan_layout({'blocks_0': {'w': 0.5}, 'blocks_1': {'w': 1.0}})


def test_block_ndim_counts_per_block_dims():
  assert stack.block_ndim('encoder/blocks/norm/bias', 2) == 1
  assert stack.block_ndim('encoder/blocks_3/norm/bias', 1) == 1
  assert stack.block_ndim('regresser/regressor_blocks/q_bias', 2) == 1
  assert stack.block_ndim('mask_token', 3) == 3


def test_weight_gradients_in_reduce_dtype_match_the_usual_ones():
  """Under a mesh, `reduce_gradients_in(float32)` gives bfloat16 Dense layers float32 weight
  gradients (their cross-device sums run in float32); values as the usual path's, the
  forward unchanged."""
  mlp = layers.Mlp(2, dtype=jnp.bfloat16)
  x = jax.random.normal(jax.random.key(0), (8, 5, 16), jnp.bfloat16)
  params = mlp.init(jax.random.key(1), x)
  loss = lambda p: jnp.sum(mlp.apply(p, x).astype(jnp.float32) ** 2)
  with jax.set_mesh(jax.make_mesh((2,), ('fsdp',))):
    usual_loss, usual = jax.jit(jax.value_and_grad(loss))(params)
    with layers.reduce_gradients_in(jnp.float32):
      assert layers.dense_options(jnp.bfloat16)
      reduced_loss, reduced = jax.jit(jax.value_and_grad(loss))(params)
  assert reduced_loss == usual_loss
  for got, want in zip(jax.tree.leaves(reduced), jax.tree.leaves(usual)):
    assert got.dtype == want.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=2e-2, atol=1e-2 * float(jnp.abs(want).max()))
  assert not layers.dense_options(jnp.bfloat16)  # Outside the context.
