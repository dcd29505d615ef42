"""CAE v2's student after the encoder: latent regressor, decoder head, unit-norm outputs.

Reproduces `ContextAutoencoderViT` with `model_type='caev2'` (Atten4Vis/CAE, commit a7fd162,
`models/modeling_cae.py` and `models/modeling_cae_helper.py`) from the encoder's output on;
see `docs/reference/caev2_algorithm.md`, Student. Per image, with the encoder's
[class, visible] latents (visible patches in ascending index order):
  1. if the regressor width D_r differs from the encoder width D: Linear + LayerNorm;
  2. mask-token queries at the masked positions run through `depth` cross-attention blocks whose
     keys/values are [visible latents, current queries] (positions from the regressor's own
     fixed sin-cos table);
  3. one LayerNorm shared by class, visible and regressed tokens, one Linear to C, rows
     L2-normalised: outputs in the token order [class, visible, masked].

Parameter tree (names mirror the official `state_dict`, spelling included: `convert.py` maps
them by rule):
  encoder_to_regresser/{kernel (D, D_r), bias}, encoder_to_regresser_norm/{scale, bias}
    (only when D_r != D), mask_token (1, 1, D_r),
  regresser/regressor_blocks_{j}/{norm1_q,norm1_k,norm1_v,norm2_cross}/{scale, bias} (D_r,),
  regresser/regressor_blocks_{j}/cross_attn/{q,k,v}/kernel (D_r, D_r), cross_attn/{q,v}_bias,
  regresser/regressor_blocks_{j}/cross_attn/proj/{kernel, bias},
  regresser/regressor_blocks_{j}/mlp_cross/{fc1,fc2}/{kernel, bias},
  regresser/regressor_blocks_{j}/{gamma_1_cross, gamma_2_cross} (D_r,),
  decoder/norm/{scale, bias} (D_r,), decoder/head/{kernel (D_r, C), bias (C,)}.
The official `rd_pos_embed` is a constant here (`sincos_table`), and `regresser.norm`, which
CAE v2 never applies, does not exist.
"""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from capi_jax.models import layers
from capi_jax.models import stack

Array = jax.Array
DType = Any

# The official `trunc_normal_(t, std=0.02)` cuts at +-std (a=-std, b=std), not at +-2 std.
_token_init = nn.initializers.truncated_normal(0.02, lower=-1.0, upper=1.0)


def sincos_table(grid: tuple[int, int], dim: int, temperature: float = 10000.0) -> np.ndarray:
  """The release's fixed 2-D sin-cos position table of the patches, (h * w, dim) float32.

  With d = dim / 4 and om_k = temperature^(-k/d), patch t gets
  [sin(a om), cos(a om), sin(b om), cos(b om)] with a = t // h, b = t % h for the grid (h, w)
  (the release's meshgrid of (arange(w), arange(h))): on a square grid, a is the row and b the
  column. The release prepends a zero row for the class token, which no position ever reads.
  Computed in float32 as the release does, except that the powers, sines and cosines are rounded
  once from float64 (torch's float32 pow and sin may differ by an ulp).
  """
  if dim % 4:
    raise ValueError(f'The 2-D sin-cos position table needs a width divisible by 4, got {dim}.')
  h, w = grid
  quarter = dim // 4
  exponent = np.arange(quarter, dtype=np.float32) / np.float32(quarter)
  omega = np.float32(1.0) / (temperature ** exponent.astype(np.float64)).astype(np.float32)
  t = np.arange(h * w)
  a = np.outer((t // h).astype(np.float32), omega).astype(np.float64)
  b = np.outer((t % h).astype(np.float32), omega).astype(np.float64)
  return np.concatenate([np.sin(a), np.cos(a), np.sin(b), np.cos(b)], axis=1).astype(np.float32)


def split_by_mask(masked: Array, n_masked: int) -> tuple[Array, Array]:
  """Visible and masked patch indices, each ascending, from a boolean mask.

  Args:
    masked: (batch, N) bool, True = masked, exactly `n_masked` per row (the release reshapes
      by that count; rows with another count give wrong indices, unchecked under jit).
    n_masked: the static count.

  Returns:
    visible_indices (batch, N - n_masked) and masked_indices (batch, n_masked), int32.
  """
  # A stable sort of the mask puts the visible (False) first, each group in index order.
  order = jnp.argsort(masked, axis=1, stable=True).astype(jnp.int32)
  n_visible = masked.shape[1] - n_masked
  return order[:, :n_visible], order[:, n_visible:]


def normalize_rows(x: Array) -> Array:
  """x / ||x||_2 over the last axis, in float32, as the release (no epsilon).

  The release divides by the bare norm, so an all-zero row would be NaN and poison the step.
  Here a zero row stays zero, with a zero (not NaN) gradient; every other row is computed
  exactly as the release does. Teacher and head outputs are not exactly zero in practice, so
  this only changes what a degenerate input does.
  """
  x = x.astype(jnp.float32)
  sq = jnp.sum(jnp.square(x), axis=-1, keepdims=True)
  nonzero = sq > 0
  return jnp.where(nonzero, x / jnp.sqrt(jnp.where(nonzero, sq, 1.0)), 0.0)


class RegressorBlock(nn.Module):
  """One regressor block: cross-attention of the queries on [visible, queries], post-norm.

  x = LN_2(x_q + g1 * CrossAttn(LN_q(x_q + pos_q), LN_k(x_kv + pos_kv), LN_v(x_kv)));
  out = x + g2 * MLP(x), x_kv = [visible, x_q], each gamma-scaled branch under stochastic depth.
  The attention has separate q / k / v projections with BEiT's q_bias and v_bias.
  """
  num_heads: int
  mlp_ratio: int = 4
  layer_scale_init: float = 0.1
  drop_path_rate: float = 0.0
  deterministic: bool = True
  norm_eps: float = 1e-6
  attention: str = 'xla'
  dtype: DType = jnp.float32
  param_dtype: DType = jnp.float32

  @nn.compact
  def __call__(self, x_q: Array, visible: Array, pos_q: Array, pos_kv: Array) -> Array:
    """x_q, pos_q: (batch, n_q, dim); visible (batch, n_v, dim), pos_kv (batch, n_v + n_q, dim)
    -> (batch, n_q, dim)."""
    dim = x_q.shape[-1]
    x_kv = jnp.concatenate([visible, x_q], axis=1)
    norm = functools.partial(layers.layer_norm, self.norm_eps, self.dtype, self.param_dtype)
    gamma = lambda name: self.param(name, nn.initializers.constant(self.layer_scale_init), (dim,),
                                    self.param_dtype).astype(self.dtype)
    residual = lambda branch: layers.drop_path(branch, self.drop_path_rate, self.deterministic,
                                               self.make_rng)
    cross_attn = layers.Attention(self.num_heads, projections=('q', 'k', 'v'), qkv_bias='q_v',
                                  implementation=self.attention, dtype=self.dtype, param_dtype=self.param_dtype,
                                  name='cross_attn')
    attn = cross_attn(norm(name='norm1_q')(x_q + pos_q),
                      context=norm(name='norm1_k')(x_kv + pos_kv),
                      value=norm(name='norm1_v')(x_kv))
    x = norm(name='norm2_cross')(x_q + residual(gamma('gamma_1_cross') * attn))
    mlp = layers.Mlp(self.mlp_ratio, use_bias=True, dtype=self.dtype, param_dtype=self.param_dtype,
                     name='mlp_cross')(x)
    return x + residual(gamma('gamma_2_cross') * mlp)


class LatentRegressor(nn.Module):
  """`depth` RegressorBlocks; drop path rates linspace(0, drop_path_rate, depth) as the release.

  `block_fields` are the RegressorBlock fields shared by every block.
  """
  depth: int
  drop_path_rate: float
  block_fields: dict[str, Any]
  remat_policy: str = 'none'
  scan: bool = False

  @nn.compact
  def __call__(self, queries: Array, visible: Array, pos_masked: Array, pos_visible: Array,
               deterministic: bool) -> Array:
    """Regressed latents of the masked positions.

    Args:
      queries: (batch, n_masked, dim) the mask tokens.
      visible: (batch, n_visible, dim) the encoder's visible latents (fixed across blocks).
      pos_masked: (batch, n_masked, dim); pos_visible: (batch, n_visible, dim).
      deterministic: no stochastic depth.

    Returns:
      (batch, n_masked, dim), with no final norm (CAE v2 skips `regresser.norm`).
    """
    rates = [float(r) for r in layers.torch_linspace(0.0, self.drop_path_rate, self.depth)]
    pos_kv = jnp.concatenate([pos_visible, pos_masked], axis=1)
    regressed, _ = stack.block_stack(
        RegressorBlock, {**self.block_fields, 'deterministic': deterministic}, queries, visible,
        pos_masked, pos_kv, depth=self.depth, name='regressor_blocks',
        remat_policy=self.remat_policy, layer_fields={'drop_path_rate': rates}, scan=self.scan)
    return regressed


class Decoder(nn.Module):
  """CAE v2's decoder of depth 0: one shared LayerNorm, then the head Linear to `out_dim`."""
  out_dim: int
  norm_eps: float = 1e-6
  dtype: DType = jnp.float32
  param_dtype: DType = jnp.float32

  @nn.compact
  def __call__(self, cls: Array, visible: Array, regressed: Array) -> tuple[Array, Array]:
    """cls (batch, 1, D_r), visible (batch, n_v, D_r), regressed (batch, n_m, D_r).

    Returns:
      head outputs (batch, 1 + n_v + n_m, out_dim) in the order [class, visible, masked], and
      latent_predict (batch, n_m, D_r): the normed regressed latents.
    """
    norm = layers.layer_norm(self.norm_eps, self.dtype, self.param_dtype, 'norm')
    latent_predict = norm(regressed)
    tokens = jnp.concatenate([norm(cls), norm(visible), latent_predict], axis=1)
    head = nn.Dense(self.out_dim, dtype=self.dtype, param_dtype=self.param_dtype,
                    kernel_init=layers.xavier_uniform, name='head')
    return head(tokens), latent_predict


class RegressorDecoder(nn.Module):
  """Everything of CAE v2's student after the encoder (see the module docstring).

  Attributes:
    grid: (h, w) patch grid of the student's images.
    embed_dim: regressor width D_r (`--decoder_embed_dim`); a projection is made when the
      encoder's width differs.
    depth: regressor blocks (`--regressor_depth`).
    num_heads: regressor heads (the release always builds 12: its `--decoder_num_heads` never
      reaches the model).
    out_dim: C, the teacher's feature width (`--num_out_dim`).
    mlp_ratio: the regressor MLP's hidden width / D_r (the encoder's mlp_ratio in the release).
    layer_scale_init: initial gammas (the release's class default 0.1).
    drop_path_rate: the largest stochastic depth rate (`--drop_path`).
    norm_eps: LayerNorm epsilon (1e-6).
    dtype: compute dtype; the output rows are normalised in float32.
    remat_policy: what each regressor block keeps for its backward pass (`layers.REMAT`).
    scan_layers: the blocks as one scan over stacked parameters (`stack.block_stack`).
    attention: `layers.attention`'s implementation.
  """
  grid: tuple[int, int]
  embed_dim: int
  depth: int
  num_heads: int
  out_dim: int
  mlp_ratio: int = 4
  layer_scale_init: float = 0.1
  drop_path_rate: float = 0.0
  norm_eps: float = 1e-6
  dtype: DType = jnp.float32
  param_dtype: DType = jnp.float32
  remat_policy: str = 'none'
  scan_layers: bool = False
  attention: str = 'xla'

  @nn.compact
  def __call__(self, latents: Array, visible_indices: Array, masked_indices: Array,
               deterministic: bool = True) -> tuple[Array, Array]:
    """The student's outputs from the encoder's latents.

    Args:
      latents: (batch, 1 + n_visible, D) the encoder's output on [class, visible], after its
        final norm.
      visible_indices: (batch, n_visible) int, ascending row-major patch indices.
      masked_indices: (batch, n_masked) int, ascending; together with `visible_indices` every
        patch of `grid` once.
      deterministic: no stochastic depth (else the 'drop_path' rng is needed).

    Returns:
      outputs: (batch, 1 + n_visible + n_masked, out_dim) float32 unit rows, token order
        [class, visible, masked];
      latent_predict: (batch, n_masked, D_r) the normed regressed latents.
    Sows 'intermediates': `encoder_to_regresser_out` (when projected) and `regressor_out`.
    """
    b = latents.shape[0]
    n_masked = masked_indices.shape[1]
    norm = functools.partial(layers.layer_norm, self.norm_eps, self.dtype, self.param_dtype)
    latents = latents.astype(self.dtype)
    if latents.shape[-1] != self.embed_dim:
      latents = nn.Dense(self.embed_dim, dtype=self.dtype, param_dtype=self.param_dtype,
                         kernel_init=layers.xavier_uniform, name='encoder_to_regresser')(latents)
      latents = norm(name='encoder_to_regresser_norm')(latents)
      self.sow('intermediates', 'encoder_to_regresser_out', latents)
    cls, visible = latents[:, :1], latents[:, 1:]
    table = jnp.asarray(sincos_table(self.grid, self.embed_dim), self.dtype)
    mask_token = self.param('mask_token', _token_init, (1, 1, self.embed_dim), self.param_dtype)
    queries = jnp.broadcast_to(mask_token.astype(self.dtype), (b, n_masked, self.embed_dim))
    block_fields = dict(num_heads=self.num_heads, mlp_ratio=self.mlp_ratio,
                        layer_scale_init=self.layer_scale_init, norm_eps=self.norm_eps,
                        attention=self.attention, dtype=self.dtype, param_dtype=self.param_dtype)
    regressed = LatentRegressor(self.depth, self.drop_path_rate, block_fields, self.remat_policy,
                                self.scan_layers, name='regresser')(
        queries, visible, table[masked_indices], table[visible_indices], deterministic)
    self.sow('intermediates', 'regressor_out', regressed)
    outputs, latent_predict = Decoder(self.out_dim, self.norm_eps, self.dtype, self.param_dtype,
                                      name='decoder')(cls, visible, regressed)
    return normalize_rows(outputs), latent_predict
