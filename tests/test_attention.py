"""`layers.attention`'s implementations: the choice per platform, the fallback, the kernels'
padding and masking (checked on CPU against XLA's attention). A TPU step compiled with splash:
test_aot.py."""

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from capi_jax.engine import config_checks
from capi_jax.models import encoder_decoder
from capi_jax.models import layers
from configs import tiny


@pytest.fixture
def platform(monkeypatch):
  """Sets the platform `layers.attention` sees; fallback reports start afresh."""
  monkeypatch.setattr(layers, '_reported_fallbacks', set())

  def set_platform(name: str) -> None:
    monkeypatch.setattr(layers, '_platform', lambda: name)

  return set_platform


def _qkv(n_q: int, n_k: int, layout: str, dtype=jnp.float32, batch: int = 2, heads: int = 2,
         head_dim: int = 64):
  keys = jax.random.split(jax.random.key(0), 3)
  shape = lambda n: (batch, heads, n, head_dim) if layout == 'heads_major' else (
      batch, n, heads, head_dim)
  return (jax.random.normal(keys[0], shape(n_q), dtype),
          jax.random.normal(keys[1], shape(n_k), dtype),
          jax.random.normal(keys[2], shape(n_k), dtype))


def test_choice_per_platform_and_size(platform):
  choose = lambda impl, n_k=197, dtype=jnp.bfloat16, head_dim=64: layers.choose_attention(
      impl, 8, n_k, head_dim, dtype)
  platform('cpu')
  assert [choose(i) for i in ('xla', 'auto', 'cudnn', 'splash')] == ['xla'] * 4
  platform('gpu')
  assert (choose('auto'), choose('cudnn'), choose('splash')) == ('cudnn', 'cudnn', 'xla')
  assert choose('cudnn', dtype=jnp.float32) == 'xla'  # cuDNN takes bf16 / fp16 only.
  assert choose('auto', head_dim=136) == 'xla'
  platform('tpu')
  assert (choose('splash'), choose('cudnn')) == ('splash', 'xla')
  # 'auto' follows the measured memory: XLA at ViT-B/16's 197 tokens, splash from 257.
  assert (choose('auto', 197), choose('auto', layers.SPLASH_MIN_KEYS)) == ('xla', 'splash')
  with pytest.raises(ValueError, match='must be one of'):
    choose('flash')


def test_a_fallback_is_logged_once(platform, caplog):
  platform('cpu')
  q, k, v = _qkv(5, 5, 'tokens_major')
  with caplog.at_level(logging.WARNING), jax.set_mesh(jax.make_mesh((1,), ('fsdp',))):
    for _ in range(3):
      out = layers.attention(q, k, v, 'tokens_major', 'splash')
  messages = [r.getMessage() for r in caplog.records if 'falls back' in r.getMessage()]
  assert messages == ["Attention falls back to XLA: 'splash' needs a TPU (platform: cpu)."]
  np.testing.assert_array_equal(out, layers.attention(q, k, v, 'tokens_major'))


def test_config_check_refuses_unknown_implementations():
  config = tiny.get_config()
  with config.unlocked():
    config.efficiency.attention = 'flash'
  found = config_checks.problems(config, 1)
  assert any("efficiency.attention='flash' must be one of" in p for p in found), found


def _loss(fn, q, k, v):
  return jnp.sum(jnp.sin(fn(q, k, v)))


@pytest.mark.parametrize('n_q, n_k, layout', [(13, 20, 'heads_major'), (7, 128, 'tokens_major')])
def test_splash_padding_and_mask_match_xla(platform, monkeypatch, n_q, n_k, layout):
  """Pallas's interpreter runs the kernel on CPU (as if on a TPU): padded keys never receive
  weight, padded queries are dropped, forward and gradients match XLA's attention."""
  platform('tpu')
  monkeypatch.setattr(layers, 'attention_splash',
                      functools.partial(layers.attention_splash, interpret=True))
  q, k, v = _qkv(n_q, n_k, layout)
  splash = jax.jit(functools.partial(layers.attention, layout=layout, implementation='splash'))
  xla = jax.jit(functools.partial(layers.attention, layout=layout))
  np.testing.assert_allclose(splash(q, k, v), xla(q, k, v), atol=2e-6)
  grads = lambda fn: jax.jit(jax.grad(functools.partial(_loss, fn), argnums=(0, 1, 2)))(q, k, v)
  for got, want in zip(grads(splash), grads(xla)):
    np.testing.assert_allclose(got, want, atol=5e-6)
  assert not layers._reported_fallbacks


def test_cudnn_padding_matches_xla(monkeypatch):
  """The cuDNN path's padding to even lengths and its sequence-length mask, run by JAX's XLA
  implementation of the same call (same semantics; no GPU here)."""
  xla_impl = jax.nn.dot_product_attention

  def as_xla(*args, implementation=None, **kwargs):
    assert implementation == 'cudnn'
    return xla_impl(*args, implementation='xla', **kwargs)

  monkeypatch.setattr(jax.nn, 'dot_product_attention', as_xla)
  q, k, v = _qkv(13, 21, 'tokens_major')  # Both odd: both padded.
  cudnn = jax.jit(layers.attention_cudnn)
  xla = jax.jit(functools.partial(layers.attention, layout='tokens_major'))
  np.testing.assert_allclose(cudnn(q, k, v), xla(q, k, v), atol=2e-6)
  grads = lambda fn: jax.jit(jax.grad(functools.partial(_loss, fn), argnums=(0, 1, 2)))(q, k, v)
  for got, want in zip(grads(cudnn), grads(xla)):
    np.testing.assert_allclose(got, want, atol=5e-6)


def test_rotary_attention_gives_cudnn_its_tokens_major_layout(platform, monkeypatch):
  """CAPI's rotary attention hands cuDNN q, k, v tokens-major as projected (no transposes to
  heads-major and back): on a GPU, with JAX's XLA implementation of the cuDNN call standing in
  for the kernel (no GPU here), the cross-attention equals the 'xla' implementation's."""
  xla_impl = jax.nn.dot_product_attention
  layouts = []

  def as_xla(q, k, v, *args, implementation=None, **kwargs):
    assert implementation == 'cudnn'
    layouts.append(q.shape)
    return xla_impl(q, k, v, *args, implementation='xla', **kwargs)

  monkeypatch.setattr(jax.nn, 'dot_product_attention', as_xla)
  platform('gpu')
  b, n_q, n_k, dim, heads = 2, 6, 10, 128, 2
  keys = jax.random.split(jax.random.key(1), 4)
  x = jax.random.normal(keys[0], (b, n_q, dim), jnp.bfloat16)
  context = jax.random.normal(keys[1], (b, n_k, dim), jnp.bfloat16)
  coords = jax.random.uniform(keys[2], (b, n_q, 2), minval=-1, maxval=1)
  context_coords = jax.random.uniform(keys[3], (b, n_k, 2), minval=-1, maxval=1)
  make = lambda impl: encoder_decoder.make_attention(heads, dtype=jnp.bfloat16,
                                                     implementation=impl)
  args = (x, coords, context, context_coords)
  params = make('xla').init(jax.random.key(2), *args)
  want = make('xla').apply(params, *args)
  got = make('cudnn').apply(params, *args)
  assert layouts and layouts[0][1:] == (n_q + n_q % 2, heads, dim // heads)  # Tokens-major.
  # No transposes around the kernel (there were 8: q, k, v and the output, there and back).
  transposes = lambda fn, *a: str(jax.make_jaxpr(fn)(*a)).count('transpose[')
  q, k, v = _qkv(n_q, n_k, 'tokens_major', jnp.bfloat16, b, heads, dim // heads)
  assert transposes(make('cudnn').apply, params, *args) == transposes(layers.attention_cudnn,
                                                                       q, k, v)
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                             atol=2e-2)


def test_splash_keeps_heads_split_over_tensor(platform, monkeypatch):
  """On a mesh with a 'tensor' axis, splash runs each device's heads (split over 'tensor', as
  the projections leave them) of its batch shard, in Pallas's interpreter on 8 CPU devices:
  forward and gradients match XLA's attention."""
  platform('tpu')
  monkeypatch.setattr(layers, 'attention_splash',
                      functools.partial(layers.attention_splash, interpret=True))
  mesh = jax.make_mesh((4, 2), ('fsdp', 'tensor'))
  spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('fsdp', 'tensor'))
  q, k, v = (jax.device_put(t, spec) for t in _qkv(7, 20, 'heads_major', batch=4, heads=4))
  splash = jax.jit(functools.partial(layers.attention, implementation='splash'))
  xla = jax.jit(layers.attention)
  with jax.set_mesh(mesh):
    np.testing.assert_allclose(splash(q, k, v), xla(q, k, v), atol=2e-6)
    grads = lambda fn: jax.jit(jax.grad(functools.partial(_loss, fn), argnums=(0, 1, 2)))(
        q, k, v)
    for got, want in zip(grads(splash), grads(xla)):
      np.testing.assert_allclose(got, want, atol=5e-6)
  assert not layers._reported_fallbacks
