"""Layers and initialisers that several backbones share, each matching its PyTorch original.

Images are NHWC and linear kernels (in, out) here (PyTorch: NCHW, weights (out, in)).

Sharding (FSDP, see `capi_jax/base/sharding.py`): parameters are stored sharded; `gathered`
wraps a block class so that its weights are gathered whole where the block runs (one block at a
time, and again in the backward pass under remat) and its input and output stay split along the
batch. Both constraints refer to the mesh in context (`jax.sharding.get_abstract_mesh()`, set
by the train step); without one they do nothing, so single-device code is unchanged.
"""

from collections.abc import Callable
import functools
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
DType = Any


# The name under which attention outputs (either `layers.attention` layout) are saved by remat
# policies.
ATTENTION_OUT = 'attention_out'
_policies = jax.checkpoint_policies
# What each block keeps for its backward pass (`efficiency.remat_policy`); the rest is recomputed.
# None: no rematerialisation, every activation is kept (fastest, most memory).
REMAT = {
    'none': None,
    # The release's default (`efficiency.rematerialization`): matmul and attention outputs are
    # kept, pointwise ops (norms, RoPE, GELU, softmax, residual adds) recomputed. The attention
    # backward recomputes q k^T and the softmax, as a flash-attention backward does.
    'dots_and_attention': _policies.save_from_both_policies(
        _policies.dots_with_no_batch_dims_saveable,
        _policies.save_only_these_names(ATTENTION_OUT)),
    # Weight-matmul outputs only: attention is recomputed whole.
    'dots': _policies.dots_with_no_batch_dims_saveable,
    # Each block's input only: the whole block is recomputed (least memory).
    'full': _policies.nothing_saveable,
}
REMAT_POLICIES = tuple(REMAT)


def _context_mesh() -> jax.sharding.AbstractMesh | None:
  mesh = jax.sharding.get_abstract_mesh()
  return None if mesh.empty or mesh.size == 1 else mesh


def gather_weights(tree: Any) -> Any:
  """Every leaf of `tree` replicated over the context mesh: the compute layout of FSDP.

  GSPMD turns the constraint into an all-gather of the stored shards, and its gradient into a
  reduction back to them (a reduce-scatter, or an all-reduce then a slice, as XLA chooses).
  """
  if _context_mesh() is None:
    return tree
  return jax.lax.with_sharding_constraint(tree, jax.sharding.PartitionSpec())


def shard_batch(x: Array) -> Array:
  """x (batch, ...) with its leading axis split over every axis of the context mesh."""
  mesh = _context_mesh()
  if mesh is None:
    return x
  return jax.lax.with_sharding_constraint(x, jax.sharding.PartitionSpec(mesh.axis_names))


def gathered(block_cls: type[nn.Module], remat_policy: Callable[..., bool] | None
             ) -> type[nn.Module]:
  """`block_cls` that gathers its own parameters at the point of use, rematerialised.

  Args:
    block_cls: a Flax module class whose first call argument and output are (batch, ...)
      activations.
    remat_policy: what the block keeps for its backward pass (a `jax.checkpoint_policies`
      policy), or None for no rematerialisation. Under remat the gathered weights are never
      kept (no policy saves them): the backward pass gathers them again, as FSDP does; without
      remat every block's gathered weights are kept from its forward to its backward pass.

  Returns:
    A module class with the same fields and parameter tree (the gathering is a lifted
    transform: no extra scope).
  """

  class Gathered(nn.map_variables(block_cls, 'params', trans_in_fn=gather_weights, init=True)):

    def __call__(self, x: Array, *args: Any) -> Array:
      return shard_batch(super().__call__(shard_batch(x), *args))

  Gathered.__name__ = block_cls.__name__
  if remat_policy is None:
    return Gathered
  return nn.remat(Gathered, policy=remat_policy)


class Encoded(NamedTuple):
  """A backbone's `encode` result (the per-block API every refinable backbone has).

  tokens: (batch, n_prefix + n, D_out) final output, [prefix tokens (class token or
    registers), patches], after the final norm (and projection) where the backbone has them.
  blocks: {i: (batch, n_prefix + n, D)} raw residual stream after block i (0-indexed), as
    requested.
  """
  tokens: Array
  blocks: dict[int, Array]


# torch's xavier-uniform on (out, in) linear weights (flax kernels are (in, out)).
xavier_uniform = nn.initializers.xavier_uniform()
# xavier-uniform applied to a conv kernel flattened to (out, in*kh*kw), as the releases
# initialise patch embeddings: fan_in = kh*kw*in, fan_out = out (flax's conv default would
# multiply fan_out by kh*kw).
patch_kernel_init = nn.initializers.variance_scaling(
    1.0, 'fan_avg', 'uniform', in_axis=(0, 1, 2), out_axis=3)


def conv_bias_init(fan_in: int) -> Callable[..., Array]:
  """PyTorch's Conv2d default bias init, U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / np.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def torch_linspace(start: float, end: float, steps: int) -> np.ndarray:
  """float32 `torch.linspace` on CPU, bit for bit (numpy's rounds differently by 1 ulp).

  PyTorch fills the first half as start + i*step and the second as end - (steps-1-i)*step,
  in float32. Tables built with it in a release (CAPI's RoPE) are reproduced exactly.
  """
  start, end = np.float32(start), np.float32(end)
  if steps == 1:
    return np.array([start], np.float32)
  step = (end - start) / np.float32(steps - 1)
  i = np.arange(steps)
  first = start + step * i.astype(np.float32)
  second = end - step * (steps - 1 - i).astype(np.float32)
  return np.where(i < steps // 2, first, second).astype(np.float32)


def l2_normalize(x: Array, eps: float) -> Array:
  """torch.nn.functional.normalize: x / max(||x||_2, eps) on the last axis."""
  norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))
  return x / jnp.maximum(norm, eps)


def gelu(x: Array) -> Array:
  """Exact (erf) GELU written as PyTorch computes it.

  Numerically nn.gelu(approximate=False) to < 1e-6 (flax's default is the tanh approximation),
  but XLA:CPU fuses this form into ~15% less train-step time.
  """
  return 0.5 * x * (1 + jax.lax.erf(x * np.asarray(0.7071067811865476, x.dtype)))


def quick_gelu(x: Array) -> Array:
  """CLIP's QuickGELU, x * sigmoid(1.702 x)."""
  return x * jax.nn.sigmoid(np.asarray(1.702, x.dtype) * x)


# Einsum specs of `attention` per layout: b batch, h heads, q / k query / key tokens, d head dim.
_ATTENTION_SPECS = {
    'heads_major': ('bhqd,bhkd->bhqk', 'bhqk,bhkd->bhqd'),
    'tokens_major': ('bqhd,bkhd->bhqk', 'bhqk,bkhd->bqhd'),
}


def attention(q: Array, k: Array, v: Array, layout: str = 'heads_major') -> Array:
  """Softmax attention with logits and softmax in float32.

  Args:
    q: (batch, heads, n_q, head_dim); with layout='tokens_major' (batch, n_q, heads, head_dim).
    k: (batch, heads, n_k, head_dim); likewise.
    v: (batch, heads, n_k, head_dim); likewise.
    layout: 'heads_major' suits callers that work per head (CAPI's RoPE); 'tokens_major' takes
      a fused qkv projection as reshaped, with no transposes (the standard ViT).

  Returns:
    (batch, heads, n_q, head_dim) in v's dtype; (batch, n_q, heads, head_dim) if tokens_major.
  """
  logits_spec, out_spec = _ATTENTION_SPECS[layout]
  scale = q.shape[-1] ** -0.5
  logits = jnp.einsum(logits_spec, q, k, preferred_element_type=jnp.float32) * scale
  probs = jax.nn.softmax(logits, axis=-1)
  return jnp.einsum(out_spec, probs.astype(v.dtype), v)


def on_tokens(fn: Callable[[Array], Array], x: Array) -> Array:
  """fn applied to x (..., D) flattened to 2-D tokens (n, D); its output (n, D') reshaped back
  to (..., D').

  For dense layers: on 2-D tokens their weight gradients are single-contraction matmuls, which
  XLA:CPU hands to its fast matmul library (a (batch, n) contraction takes a slower path, with
  a transposed copy of the gradient).
  """
  out = fn(x.reshape(-1, x.shape[-1]))
  return out.reshape(*x.shape[:-1], out.shape[-1])


class Mlp(nn.Module):
  """dim -> int(mlp_ratio * dim) -> dim, `activation` between (exact GELU); `fc1`, `fc2`."""
  mlp_ratio: float = 4
  use_bias: bool = False
  activation: Callable[[Array], Array] = gelu
  dtype: DType = jnp.float32
  param_dtype: DType = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    dense = functools.partial(nn.Dense, use_bias=self.use_bias, dtype=self.dtype,
                              param_dtype=self.param_dtype, kernel_init=xavier_uniform)
    dim = x.shape[-1]
    fc1, fc2 = dense(int(dim * self.mlp_ratio), name='fc1'), dense(dim, name='fc2')
    return on_tokens(lambda t: fc2(self.activation(fc1(t))), x)
