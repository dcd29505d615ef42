"""Layers and initialisers that several backbones share, each matching its PyTorch original.

Images are NHWC and linear kernels (in, out) here (PyTorch: NCHW, weights (out, in)).

Sharding (FSDP and tensor parallelism, see `capi_jax/base/sharding.py`): parameters are stored
sharded; `gathered` wraps a block class so that its weights are gathered where the block runs
(whole, or split over 'tensor' where the logical rules say; one block at a time, and again in
the backward pass under remat) and its input and output stay split along the batch. Both constraints refer to the mesh in context (`jax.sharding.get_abstract_mesh()`, set
by the train step); without one they do nothing, so single-device code is unchanged.
"""

from collections.abc import Callable
import contextlib
import functools
import logging
from typing import Any, NamedTuple

import flax.linen as nn
import jax
from jax.ad_checkpoint import checkpoint_name
from jax.experimental.pallas.ops.tpu import splash_attention as splash
import jax.numpy as jnp
import numpy as np

from capi_jax.base import optim
from capi_jax.base import sharding

Array = jax.Array
DType = Any


# Bias kinds of `Attention`'s q, k, v projections.
QKV_BIASES = ('full', 'q_v', 'none')
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


def gathered_spec(path: str, shape: tuple[int, ...], mesh: jax.sharding.AbstractMesh
                  ) -> jax.sharding.PartitionSpec:
  """The compute layout of a block parameter (`path` relative to the block): whole, except
  the dimensions that the logical rules in context split (over 'tensor': Megatron-style)."""
  axis_sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
  spec = sharding.logical_spec(sharding.param_axes(path, len(shape)), shape, axis_sizes,
                               sharding.current_rules())
  return jax.sharding.PartitionSpec(*spec) if any(spec) else jax.sharding.PartitionSpec()


def gather_weights(tree: Any) -> Any:
  """Every leaf of `tree` gathered over the context mesh: the compute layout of FSDP, and of
  tensor parallelism where the logical rules split a leaf (`gathered_spec`).

  GSPMD turns the constraint into an all-gather of the stored shards, and its gradient into a
  reduction back to them (a reduce-scatter, or an all-reduce then a slice, as XLA chooses).
  """
  mesh = _context_mesh()
  if mesh is None:
    return tree
  specs = jax.tree_util.tree_map_with_path(
      lambda path, leaf: gathered_spec(optim.path_name(path), leaf.shape, mesh), tree)
  if all(spec == jax.sharding.PartitionSpec() for spec in jax.tree.leaves(specs)):
    return jax.lax.with_sharding_constraint(tree, jax.sharding.PartitionSpec())
  return jax.lax.with_sharding_constraint(tree, specs)


def batch_shards() -> int:
  """How many pieces the context mesh splits a batch into (`shard_batch`); 1 without a mesh."""
  mesh = _context_mesh()
  if mesh is None:
    return 1
  sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
  return int(np.prod([sizes[a] for a in sharding.batch_axes(mesh.axis_names)]))


def shard_batch(x: Array) -> Array:
  """x (batch, ...) with its leading axis split over the batch axes of the context mesh (every
  axis but those the logical rules give to parameters: 'tensor')."""
  mesh = _context_mesh()
  if mesh is None:
    return x
  return jax.lax.with_sharding_constraint(
      x, jax.sharding.PartitionSpec(sharding.batch_axes(mesh.axis_names)))


def gathered(block_cls: type[nn.Module], remat_policy: Callable[..., bool] | None,
             prevent_cse: bool = True) -> type[nn.Module]:
  """`block_cls` that gathers its own parameters at the point of use, rematerialised.

  Args:
    block_cls: a Flax module class whose first call argument and output are (batch, ...)
      activations.
    remat_policy: what the block keeps for its backward pass (a `jax.checkpoint_policies`
      policy), or None for no rematerialisation. Under remat the gathered weights are never
      kept (no policy saves them): the backward pass gathers them again, as FSDP does; without
      remat every block's gathered weights are kept from its forward to its backward pass.
    prevent_cse: `jax.checkpoint`'s; False inside a scan, whose loop already keeps XLA from
      merging the recomputation into the forward pass.

  Returns:
    A module class with the same fields and parameter tree (the gathering is a lifted
    transform: no extra scope).
  """

  class Gathered(nn.map_variables(block_cls, 'params', trans_in_fn=gather_weights, mutable=True)):

    def __call__(self, x: Array, *args: Any) -> Array:
      return shard_batch(super().__call__(shard_batch(x), *args))

  Gathered.__name__ = block_cls.__name__
  if remat_policy is None:
    return Gathered
  return nn.remat(Gathered, policy=remat_policy, prevent_cse=prevent_cse)


# The dtype weight gradients are reduced across devices in (`efficiency.reduce_dtype`), set by
# the train step around its trace (`reduce_gradients_in`); None: the compute dtype's.
_reduce_dtype: list[DType | None] = [None]


@contextlib.contextmanager
def reduce_gradients_in(dtype: DType | None):
  """Within: blocks' Dense layers (`Attention`, `Mlp`) under a mesh compute their weight
  gradients in `dtype` (`dense_options`), so that their sum over the batch shards, the FSDP
  gradient collective, runs in `dtype`."""
  previous, _reduce_dtype[0] = _reduce_dtype[0], dtype
  try:
    yield
  finally:
    _reduce_dtype[0] = previous


def _reducing_dot(reduce_dtype: DType) -> Callable[..., Array]:
  """A Dense layer's dot_general, x (..., d_in) @ w (d_in, d_out) with w in its parameter
  dtype, cast to x's for the product; w's gradient is computed with `reduce_dtype` outputs and
  stays in it. XLA sums a weight gradient over the batch shards where its matmul produces it
  (a partial sum per device), so that sum, the FSDP gradient collective, runs in
  `reduce_dtype`. The forward and the input gradient are the usual ones."""

  @jax.custom_vjp
  def dot(x: Array, w: Array) -> Array:
    return jnp.dot(x, w.astype(x.dtype))

  def forward(x, w):
    return dot(x, w), (x, w)

  def backward(residuals, g):
    x, w = residuals
    dw = jnp.einsum('...i,...o->io', x, g, preferred_element_type=reduce_dtype)
    return jnp.dot(g, w.astype(x.dtype).T), dw.astype(w.dtype)

  dot.defvjp(forward, backward)

  def dot_general(x, w, dimension_numbers, precision=None, preferred_element_type=None):
    if dimension_numbers != (((x.ndim - 1,), (0,)), ((), ())) or preferred_element_type:
      raise ValueError(f'Not a Dense layer\'s product: {dimension_numbers}.')
    del precision  # Dense's default (None).
    return dot(x, w)

  return dot_general


def _promote_all_but_kernel(inputs: Array, kernel: Array, bias: Array | None,
                            dtype: DType) -> tuple[Array, Array, Array | None]:
  """Dense's dtype promotion with the kernel left in its parameter dtype (`_reducing_dot`
  casts it)."""
  return inputs.astype(dtype), kernel, None if bias is None else bias.astype(dtype)


def dense_options(dtype: DType) -> dict[str, Any]:
  """nn.Dense arguments for a layer computing in `dtype`: under a mesh where
  `reduce_gradients_in` names a wider dtype, its weight gradient is computed and reduced in
  that dtype (`_reducing_dot`); otherwise none (flax's promotion, lax's dot)."""
  reduce_dtype = _reduce_dtype[0]
  if (_context_mesh() is None or reduce_dtype is None
      or jnp.dtype(reduce_dtype).itemsize <= jnp.dtype(dtype).itemsize):
    return {}
  return dict(promote_dtype=_promote_all_but_kernel,
              dot_general=_reducing_dot(jnp.dtype(reduce_dtype)))


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
# Implementations of `attention` (`efficiency.attention`):
#   'xla'    einsum, float32 softmax, einsum: exact, the parity path, every platform.
#   'cudnn'  cuDNN flash attention (`jax.nn.dot_product_attention(implementation='cudnn')`):
#            NVIDIA GPUs, bfloat16 / float16 inputs.
#   'splash' the Pallas splash-attention kernel (a Mosaic custom call): TPUs.
#   'auto'   cudnn on GPUs, splash on TPUs from `SPLASH_MIN_KEYS` keys on, xla otherwise.
# A kernel that cannot serve a call falls back to 'xla' and says why, once, in the log.
ATTENTION_IMPLEMENTATIONS = ('xla', 'cudnn', 'splash', 'auto')
# 'auto' on TPU takes splash from this many keys on: the whole CAPI ViT-L/14 step compiled for
# v5e:4x4 needs fewer temporaries per chip with splash than with XLA at 592 tokens (336 px, 32
# images per chip: 1.96 vs 2.08 GiB) and 1040 (448 px, 16: 1.80 vs 2.31 GiB), more at 272
# (224 px, 64: 1.79 vs 1.63 GiB: the keys' padding to 384 and the kernel's copies of q, k, v
# outweigh XLA's (272 x 272) scores); the threshold lies between (docs/pod_plans.md).
SPLASH_MIN_KEYS = 512
# Splash tiles: keys in blocks of 128 (the kernel's lane width); queries in blocks of up to 128
# rows (a few queries, as in CAPI's predictor, need only a multiple of 8 with a static mask).
_SPLASH_BLOCK = 128
# cuDNN's head_dim limit as JAX checks it when compiling without a GPU (it asks the default
# backend, not the target, so Hopper's 256 is not recognised there).
_CUDNN_MAX_HEAD_DIM = 128

_reported_fallbacks: set[str] = set()


def _platform() -> str:
  """'cpu', 'gpu' or 'tpu': the context mesh's devices (compile-only ones too), else JAX's
  default backend."""
  mesh = jax.sharding.get_abstract_mesh()
  platform = jax.default_backend() if mesh.empty else mesh.abstract_device.platform
  return 'gpu' if platform in ('cuda', 'rocm', 'gpu') else platform


def _fall_back(reason: str) -> str:
  """'xla', after logging `reason` the first time it is given."""
  if reason not in _reported_fallbacks:
    _reported_fallbacks.add(reason)
    logging.warning('Attention falls back to XLA: %s', reason)
  return 'xla'


def choose_attention(implementation: str, batch: int, n_k: int, head_dim: int,
                     dtype: DType, heads: int = 1) -> str:
  """The implementation that serves one call: `implementation` resolved for the platform (the
  context mesh's) and the shapes; 'xla' where the kernel cannot serve them (logged once).

  Args:
    implementation: one of `ATTENTION_IMPLEMENTATIONS`.
    batch: the call's (global) batch.
    n_k: keys per example.
    head_dim: channels per head.
    dtype: the queries' dtype.
    heads: heads per example (splash splits them over a 'tensor' axis when they divide).
  """
  if implementation not in ATTENTION_IMPLEMENTATIONS:
    raise ValueError(f'attention implementation must be one of {ATTENTION_IMPLEMENTATIONS}, '
                     f'got {implementation!r}.')
  if implementation == 'xla':
    return 'xla'
  platform = _platform()
  if implementation == 'auto':
    if platform == 'gpu':
      implementation = 'cudnn'
    elif platform == 'tpu' and n_k >= SPLASH_MIN_KEYS:
      implementation = 'splash'
    else:
      return 'xla'
  needs = {'cudnn': ('gpu', 'an NVIDIA GPU'), 'splash': ('tpu', 'a TPU')}[implementation]
  if platform != needs[0]:
    if jax.sharding.get_abstract_mesh().empty:
      # No mesh in context: a trace outside the step (the engine's shapes of the initial
      # state, for a target that may be another platform); the step itself reports.
      return 'xla'
    return _fall_back(f'{implementation!r} needs {needs[1]} (platform: {platform}).')
  if implementation == 'cudnn':
    if jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
      return _fall_back(f"'cudnn' takes bfloat16 / float16 inputs, not {jnp.dtype(dtype)}.")
    if head_dim % 8 or head_dim > _CUDNN_MAX_HEAD_DIM:
      return _fall_back(f"'cudnn' needs head_dim a multiple of 8, at most "
                        f'{_CUDNN_MAX_HEAD_DIM} (got {head_dim}).')
    return 'cudnn'
  _, shards, _ = _splash_layout(_context_mesh(), heads)
  if batch % shards:
    return _fall_back(f"'splash' runs per batch shard: a batch of {batch} does not split over "
                      f'{shards} batch shards.')
  return 'splash'


def _pad_axis(x: Array, axis: int, size: int) -> Array:
  """x zero-padded at the end of `axis` to `size`."""
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, widths)


def attention_cudnn(q: Array, k: Array, v: Array) -> Array:
  """cuDNN flash attention, tokens-major: q (batch, n_q, heads, head_dim), k / v (batch, n_k,
  heads, head_dim) -> (batch, n_q, heads, head_dim).

  JAX 0.10's cuDNN training rule needs even n_q and n_k: an odd length gets one zero token,
  excluded by the sequence lengths (cuDNN's padding mask, no bias tensor); the padded query's
  output is dropped. q, k and v share one sharding, split along the batch only (cuDNN's
  partitioner splits neither tokens nor head_dim).
  """
  b, n_q, n_k = q.shape[0], q.shape[1], k.shape[1]
  mesh = _context_mesh()
  # One sharding for q, k, v, the batch split (where it splits evenly: a stochastic-depth
  # subset may not).
  split = shard_batch if mesh is not None and b % mesh.size == 0 else (lambda t: t)
  q, k, v = split(q), split(k), split(v)
  lengths = {}
  if n_q % 2 or n_k % 2:
    q = _pad_axis(q, 1, n_q + n_q % 2)
    k, v = _pad_axis(k, 1, n_k + n_k % 2), _pad_axis(v, 1, n_k + n_k % 2)
    lengths = dict(query_seq_lengths=jnp.full((b,), n_q, jnp.int32),
                   key_value_seq_lengths=jnp.full((b,), n_k, jnp.int32))
  out = jax.nn.dot_product_attention(q, k, v, implementation='cudnn', **lengths)
  return split(out[:, :n_q])


def attention_splash(q: Array, k: Array, v: Array, interpret: bool = False) -> Array:
  """Pallas splash attention, heads-major: q (batch, heads, n_q, head_dim), k / v (batch,
  heads, n_k, head_dim) -> (batch, heads, n_q, head_dim).

  The kernel runs per example (vmapped) on each batch shard (`shard_map` over the context
  mesh). Keys are padded to a multiple of 128 and queries to their block; a static mask hides
  the padded keys from every query (the kernel skips blocks that are wholly masked), and the
  padded queries' outputs are dropped. `interpret`: Pallas's interpreter (CPU tests).
  """
  mesh = _context_mesh()
  spec, _, heads = _splash_layout(mesh, q.shape[1])
  n_q, n_k = q.shape[2], k.shape[2]
  round_up = lambda n, m: -(-n // m) * m
  block_q = min(_SPLASH_BLOCK, round_up(n_q, 8))
  padded_q, padded_k = round_up(n_q, block_q), round_up(n_k, _SPLASH_BLOCK)
  if padded_k == n_k:
    head_mask = splash.FullMask((padded_q, padded_k))
  else:
    keep = np.broadcast_to(np.arange(padded_k) < n_k, (padded_q, padded_k))
    head_mask = splash.NumpyMask(np.ascontiguousarray(keep))
  sizes = splash.BlockSizes(
      block_q=block_q, block_kv=_SPLASH_BLOCK, block_kv_compute=_SPLASH_BLOCK,
      block_q_dkv=block_q, block_kv_dkv=_SPLASH_BLOCK, block_kv_dkv_compute=_SPLASH_BLOCK,
      block_q_dq=block_q, block_kv_dq=_SPLASH_BLOCK)
  kernel = splash.make_splash_mha(splash.MultiHeadMask([head_mask] * heads),
                                  block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                  interpret=interpret)
  scale = np.asarray(q.shape[-1] ** -0.5, q.dtype)  # The kernel applies none.

  def local(q: Array, k: Array, v: Array) -> Array:
    q = _pad_axis(q * scale, 2, padded_q)
    k, v = _pad_axis(k, 2, padded_k), _pad_axis(v, 2, padded_k)
    return jax.vmap(kernel)(q, k, v)[:, :, :n_q]

  if spec is None:
    return local(q, k, v)
  # check_vma=False: Pallas calls carry no varying-manual-axes annotations.
  return jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec,
                       check_vma=False)(q, k, v)


def _splash_layout(mesh: jax.sharding.AbstractMesh | None, heads: int
                   ) -> tuple[jax.sharding.PartitionSpec | None, int, int]:
  """(how splash's (batch, heads, n, head_dim) operands lie over `mesh`, None without one; the
  batch shards; the heads on each device). Heads over 'tensor', as the projections split them
  (Megatron-style), and the batch over the batch axes; without a 'tensor' axis, or with heads
  that do not divide over it, the batch over every axis."""
  if mesh is None:
    return None, 1, heads
  sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
  tensor = sizes.get(sharding.TENSOR_AXIS, 1)
  if tensor > 1 and heads % tensor == 0:
    axes = sharding.batch_axes(mesh.axis_names)
    return (jax.sharding.PartitionSpec(axes, sharding.TENSOR_AXIS),
            int(np.prod([sizes[a] for a in axes])), heads // tensor)
  return jax.sharding.PartitionSpec(mesh.axis_names), mesh.size, heads


def attention(q: Array, k: Array, v: Array, layout: str = 'heads_major',
              implementation: str = 'xla', bias: Array | None = None) -> Array:
  """Softmax attention; with 'xla', logits and softmax in float32.

  Args:
    q: (batch, heads, n_q, head_dim); with layout='tokens_major' (batch, n_q, heads, head_dim).
    k: (batch, heads, n_k, head_dim); likewise.
    v: (batch, heads, n_k, head_dim); likewise.
    layout: 'heads_major' suits callers that work per head (CAPI's RoPE); 'tokens_major' takes
      a fused qkv projection as reshaped, with no transposes (the standard ViT).
    implementation: one of `ATTENTION_IMPLEMENTATIONS` (see there; `choose_attention`).
    bias: None, or (heads, n_q, n_k) added to the scaled logits (BEiT's relative position
      bias, `vit.ViT(rel_pos_bias=True)`); the fused kernels take none, so a bias means 'xla'.

  Returns:
    (batch, heads, n_q, head_dim) in v's dtype; (batch, n_q, heads, head_dim) if tokens_major.
  """
  heads_major = layout == 'heads_major'
  if bias is not None and implementation in ('cudnn', 'splash'):
    implementation = _fall_back(f'{implementation!r} takes no attention bias (relative '
                                'position bias).')
  elif bias is not None:
    implementation = 'xla'  # 'auto' picks no kernel that cannot serve the call.
  chosen = choose_attention(implementation, q.shape[0], k.shape[2 if heads_major else 1],
                            q.shape[-1], q.dtype, q.shape[1 if heads_major else 2])
  swap, same = (lambda t: t.transpose(0, 2, 1, 3)), (lambda t: t)
  if chosen == 'cudnn':
    tokens = swap if heads_major else same
    return tokens(attention_cudnn(tokens(q), tokens(k), tokens(v)))
  if chosen == 'splash':
    by_heads = same if heads_major else swap
    return by_heads(attention_splash(by_heads(q), by_heads(k), by_heads(v)))
  logits_spec, out_spec = _ATTENTION_SPECS[layout]
  scale = q.shape[-1] ** -0.5
  logits = jnp.einsum(logits_spec, q, k, preferred_element_type=jnp.float32) * scale
  if bias is not None:
    logits = logits + bias.astype(jnp.float32)
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


def layer_norm(eps: float, dtype: DType = jnp.float32, param_dtype: DType = jnp.float32,
               name: str | None = None) -> nn.LayerNorm:
  """torch.nn.LayerNorm: the biased variance of the centred values (flax's fast
  E[x^2] - E[x]^2 loses digits); parameters `scale`, `bias`."""
  return nn.LayerNorm(epsilon=eps, use_fast_variance=False, dtype=dtype, param_dtype=param_dtype,
                      name=name)


def drop_path(x: Array, rate: float | Array, deterministic: bool,
              make_rng: Callable[[str], Array]) -> Array:
  """timm's DropPath on a residual branch: each sample kept with probability 1 - rate, scaled by
  1 / (1 - rate).

  Args:
    x: (batch, ...) the branch output.
    rate: the drop probability in [0, 1). A Python 0 draws nothing (no rng needed); a traced
      rate always draws (rate 0 then keeps every sample, scaled by exactly 1).
    deterministic: no dropping (evaluation).
    make_rng: the calling module's `make_rng`; asked for a 'drop_path' key when drawing.

  Returns:
    x with the dropped samples zeroed, in x's dtype. The scale is computed in float32 and
    rounded once to x's dtype, as torch's `div_(keep_prob)` does.
  """
  if deterministic or (isinstance(rate, int | float) and rate == 0):
    return x
  keep = 1.0 - rate
  kept = jax.random.bernoulli(make_rng('drop_path'), keep, (x.shape[0],) + (1,) * (x.ndim - 1))
  return x * (kept / keep).astype(x.dtype)


class Attention(nn.Module):
  """Multi-head attention as every backbone here has it: self or cross, fused or separate
  projections, optional rotary embedding. Scores are computed by `attention` only.

  Widths: dim is the query input's width, heads have dim // num_heads channels and the inner
  width is num_heads * head_dim (CAE v2's regressor lets it fall short of dim); `proj` maps the
  inner width back to dim.

  Attributes:
    num_heads: number of heads.
    projections: names of the input projections. One name: a fused Dense (dim, 3 * inner), rows
      [q; k; v] (the standard ViT's `qkv`; self-attention only). Three names: separate Dense
      layers for q, k and v (CAPI's `q_proj`, `k_proj`, `v_proj`; CAE v2's `q`, `k`, `v`).
    qkv_bias: 'full' (biases in the projection layers), 'q_v' (BEiT's `q_bias` and `v_bias`
      parameters and no key bias, which would cancel in the softmax) or 'none'.
    out_bias: whether `proj` has a bias.
    rotary: None, or a factory `rotary(head_dim, name='rope')` of a module that maps positions
      (batch or 1, n, P) to a function rotating (batch, n, heads, head_dim) tokens (CAPI's
      2-D RoPE). With it, attention runs heads-major (the rotated q and k, and v, transposed);
      without, tokens-major (a reshape, no transposes).
    flat_tokens: projections run on 2-D tokens (`on_tokens`; faster weight gradients on XLA:CPU).
    implementation: `attention`'s (`efficiency.attention`).
  """
  num_heads: int
  projections: tuple[str, ...] = ('qkv',)
  qkv_bias: str = 'full'
  out_bias: bool = True
  rotary: Callable[..., nn.Module] | None = None
  flat_tokens: bool = False
  implementation: str = 'xla'
  dtype: DType = jnp.float32
  param_dtype: DType = jnp.float32

  def _dense(self, name: str, t: Array, width: int, use_bias: bool) -> Array:
    layer = nn.Dense(width, use_bias=use_bias, dtype=self.dtype, param_dtype=self.param_dtype,
                     kernel_init=xavier_uniform, name=name, **dense_options(self.dtype))
    return on_tokens(layer, t) if self.flat_tokens else layer(t)

  def _bias_params(self, inner: int) -> tuple[Array, Array]:
    q_bias = self.param('q_bias', nn.initializers.zeros, (inner,), self.param_dtype)
    v_bias = self.param('v_bias', nn.initializers.zeros, (inner,), self.param_dtype)
    return q_bias, v_bias

  @nn.compact
  def __call__(self, x: Array, positions: Array | None = None, context: Array | None = None,
               context_positions: Array | None = None, value: Array | None = None,
               bias: Array | None = None) -> Array:
    """Attention of x's tokens on the context's (on x's own without a context).

    Args:
      x: (batch, n_q, dim) the query input.
      positions: (batch or 1, n_q, P) positions of x's tokens for the rotary embedding.
      context: (batch, n_k, dim) the key input, and the value input unless `value` is given;
        None: self-attention.
      context_positions: (batch or 1, n_k, P) positions of the context's tokens.
      value: (batch, n_k, dim) the value input where it differs from the key input.
      bias: None, or (heads, n_q, n_k) added to the attention logits (`attention`).

    Returns:
      (batch, n_q, dim).
    """
    b, n_q, dim = x.shape
    head_dim = dim // self.num_heads
    inner = head_dim * self.num_heads
    if self.qkv_bias not in QKV_BIASES:
      raise ValueError(f'qkv_bias must be one of {QKV_BIASES}, got {self.qkv_bias!r}.')
    if len(self.projections) == 1:
      if context is not None or value is not None or self.rotary is not None:
        raise ValueError('A fused qkv projection serves self-attention without rotary only.')
      qkv = self._dense(self.projections[0], x, 3 * inner, self.qkv_bias == 'full')
      if self.qkv_bias == 'q_v':
        q_bias, v_bias = self._bias_params(inner)
        qkv = qkv + jnp.concatenate([q_bias, jnp.zeros_like(q_bias), v_bias]).astype(qkv.dtype)
      qkv = qkv.reshape(b, n_q, 3, self.num_heads, head_dim)
      q, k, v, layout = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], 'tokens_major'
    else:
      q_name, k_name, v_name = self.projections
      full = self.qkv_bias == 'full'
      q_bias, v_bias = self._bias_params(inner) if self.qkv_bias == 'q_v' else (None, None)
      add = lambda t, bias: t if bias is None else t + bias.astype(self.dtype)
      kv_in = x if context is None else context
      v_in = kv_in if value is None else value
      # Tokens-major (batch, n, heads, head_dim): heads are a reshape of the projections.
      heads = lambda t: t.reshape(*t.shape[:2], self.num_heads, head_dim)
      q = heads(add(self._dense(q_name, x, inner, full), q_bias))
      k = heads(self._dense(k_name, kv_in, inner, full))
      v = heads(add(self._dense(v_name, v_in, inner, full), v_bias))
      layout = 'tokens_major'
      if self.rotary is not None:
        # Rotated tokens-major, as projected (rotating after a transpose had XLA transpose
        # float32 copies for the TPU kernel); then heads-major (batch, heads, n, head_dim),
        # where XLA's matmuls batch over the leading axes and the TPU kernel wants them, but
        # not for cuDNN, which takes tokens-major.
        rope = self.rotary(head_dim, name='rope')
        rotate_q = rope(positions)
        rotate_k = rotate_q if context is None else rope(context_positions)
        if choose_attention(self.implementation, b, k.shape[1], head_dim, q.dtype,
                            self.num_heads) != 'cudnn':
          layout = 'heads_major'
        by_heads = lambda t: t.transpose(0, 2, 1, 3) if layout == 'heads_major' else t
        q, k, v = by_heads(rotate_q(q)), by_heads(rotate_k(k)), by_heads(v)
    out = checkpoint_name(attention(q, k, v, layout, self.implementation, bias),
                          ATTENTION_OUT)
    if layout == 'heads_major':
      out = out.transpose(0, 2, 1, 3)
    return self._dense('proj', out.reshape(b, n_q, inner), dim, self.out_bias)


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
                              param_dtype=self.param_dtype, kernel_init=xavier_uniform,
                              **dense_options(self.dtype))
    dim = x.shape[-1]
    fc1, fc2 = dense(int(dim * self.mlp_ratio), name='fc1'), dense(dim, name='fc2')
    return on_tokens(lambda t: fc2(self.activation(fc1(t))), x)
