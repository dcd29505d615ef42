r"""The standard ViT family: one configurable Flax ViT for several official releases.

It is the backbone of MAE / dBOT / CrossMAE / data2vec 2.0 (what MIM-Refiner refines), CAE v2's
student encoder and CLIP's visual transformer (CAE v2's frozen teacher). Images are NHWC here
(the releases: NCHW); linear kernels are (in, out). `vit_weights.py` maps official checkpoints
onto the parameter tree below and back.

Families: `FAMILIES[name]` holds the architecture fields that set each release apart; the sizes
(patch_size, image_size, embed_dim, depth, num_heads, mlp_ratio, out_dim) come from the config.
  kappamodules  MIM-Refiner's `vit.vit` / hub `PrenormVit` (kappamodules VitBlock): pre-norm,
                LayerNorm eps 1e-6, full qkv bias, exact GELU, final norm; the class token has
                no position; the position table is a buffer (1, h, w, D).
  data2vec2     MIM-Refiner's `vit.data2vec2_vit` / hub `PostnormVit`: as kappamodules but
                `embed_norm` on [class, patches] before post-norm blocks
                (x = norm1(x + attn(x)); x = norm2(x + mlp(x))) and no final norm.
  mae           MAE / dBOT / CrossMAE official checkpoints (timm names): as kappamodules, the
                table (1, 1+N, D) has a zero row for the class token.
  caev2         CAE v2's VisionTransformerEncoder: BEiT blocks (qkv bias [q_bias, 0, v_bias],
                layer scale gamma_1/gamma_2), eps 1e-6, final norm, zero class row.
  clip          OpenAI CLIP's VisionTransformer as CAE v2 uses it: conv without bias, learned
                table (1+N, W) including the class token, `ln_pre` (= `embed_norm`), QuickGELU,
                eps 1e-5, `ln_post` (= `norm`) on EVERY token then `@ proj` (out_dim).

Position tables (`pos_embed`, always a (1, n_pos, D) leaf; n_pos = N (+1 with
`class_pos_embed`), N = (image_size // patch_size)**2 row-major):
  'sincos_row_col'  kappamodules (`get_sincos_pos_embed_from_seqlens`, float64 -> float32,
                    bit-identical) and CAE v2 (`build_2d_sincos_position_embedding`, computed in
                    float32 there, so up to ~6e-8 apart): patch (r, c) gets
                    [sin(r w), cos(r w), sin(c w), cos(c w)], w_k = 10000^(-k / (D/4)).
                    (CAE v2's code computes patch t's (t // h, t % h), the same (r, c) on
                    the square grids built here; other grids are resizes of these.)
  'sincos_col_row'  MAE's `get_2d_sincos_pos_embed` (float64 -> float32, bit-identical): the
                    same with the column in the first half ('emb_h' is computed from the column
                    grid).
  'learned'         trained (CLIP); init truncated normal, std 0.02.
Both sin-cos kinds are frozen: excluded from gradients (stop_gradient) and listed in
`ViT.frozen_params` so a method keeps them out of its optimiser (torch: a buffer or a
`requires_grad=False` parameter). The formula only initialises them: a loaded checkpoint brings
its own table (MIM-Refiner's buffer holds MAE's column-first one when it refines MAE, whatever its
fresh kappamodules buffer was).
At another input resolution the patch rows are resized with `resize_pos_table` (torch
`F.interpolate`, `align_corners=False`, no antialias, float32): bicubic (kappamodules, MAE
fine-tuning) or bilinear (CAE v2's CLIP loader); the class row is kept.

API:
  model = vit.ViT(**vit.FAMILIES['mae'], patch_size=16, image_size=224, embed_dim=1024,
                  depth=24, num_heads=16)          # or vit.from_config(model_cfg, efficiency)
  params = model.init(rng, images)['params']       # images (B, H, W, 3) float32
  global_repr, registers, feature_map = model.apply({'params': params}, images)
      # (B, D_out) class token of the final output, (B, 0, D_out), (B, H/p, W/p, D_out)
  out = model.apply({'params': params}, images, blocks=(2, 1), method=model.encode)
      # out.tokens (B, 1+N, D_out): final output [class, patches] (normed / projected where the
      # family does); out.blocks {2: (B, 1+N, D), 1: ...}: raw residual stream after blocks.2,
      # blocks.1 (0-indexed, official numbering).
  model.apply(..., images, visible_indices=idx, train=True, method=model.encode,
              rngs={'drop_path': key})
      # idx (B, n_visible) row-major patch indices: tokens [class, visible] (1 + n_visible).
D_out is out_dim when set (CLIP's proj) else embed_dim.

Parameter tree (official names per family: `vit_weights.py`):
  patch_embed/{kernel (p, p, 3, D), bias (D,)}, cls_token (1, 1, D), pos_embed (1, n_pos, D),
  embed_norm/{scale, bias} (D,), norm/{scale, bias} (D,), proj/kernel (D, out_dim),
  blocks_{i}/{norm1, norm2}/{scale, bias} (D,), blocks_{i}/attn/qkv/{kernel (D, 3D), bias (3D,)}
  (or blocks_{i}/attn/{q_bias, v_bias} (D,)), blocks_{i}/attn/proj/{kernel (D, D), bias (D,)},
  blocks_{i}/mlp/fc1/{kernel (D, rD), bias}, blocks_{i}/mlp/fc2/{kernel (rD, D), bias},
  blocks_{i}/{gamma_1, gamma_2} (D,), blocks_{i}/relative_position_bias_table
  ((2g-1)^2+3, heads) with `rel_pos_bias` (g = image_size // patch_size).
Initialisation follows CAE v2, the one family here trained from scratch: linears
xavier-uniform (qkv as one (D, 3D) matrix) with zero biases, LayerNorms (1, 0), patch kernel and
class token truncated normal std 0.02 cut at +-0.02, layer scale at `layer_scale_init`.
"""

from collections.abc import Callable, Sequence
import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from capi_jax.models import layers
from capi_jax.models import stack

Array = jax.Array
DType = Any

POS_EMBEDS = ('learned', 'sincos_row_col', 'sincos_col_row')
POS_RESIZES = ('bicubic', 'bilinear')
BLOCKS = ('prenorm', 'postnorm')
ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    'gelu': layers.gelu, 'quick_gelu': layers.quick_gelu}

FAMILIES: dict[str, dict[str, Any]] = {
    'kappamodules': dict(pos_embed='sincos_row_col', class_pos_embed=False, pos_resize='bicubic',
                         patch_bias=True, embed_norm=False, block='prenorm', qkv_bias='full',
                         layer_scale_init=0.0, activation='gelu', norm_eps=1e-6,
                         final_norm=True),
    'data2vec2': dict(pos_embed='sincos_row_col', class_pos_embed=False, pos_resize='bicubic',
                      patch_bias=True, embed_norm=True, block='postnorm', qkv_bias='full',
                      layer_scale_init=0.0, activation='gelu', norm_eps=1e-6, final_norm=False),
    'mae': dict(pos_embed='sincos_col_row', class_pos_embed=True, pos_resize='bicubic',
                patch_bias=True, embed_norm=False, block='prenorm', qkv_bias='full',
                layer_scale_init=0.0, activation='gelu', norm_eps=1e-6, final_norm=True),
    'caev2': dict(pos_embed='sincos_row_col', class_pos_embed=True, pos_resize='bicubic',
                  patch_bias=True, embed_norm=False, block='prenorm', qkv_bias='q_v',
                  layer_scale_init=0.1, activation='gelu', norm_eps=1e-6, final_norm=True),
    'clip': dict(pos_embed='learned', class_pos_embed=True, pos_resize='bilinear',
                 patch_bias=False, embed_norm=True, block='prenorm', qkv_bias='full',
                 layer_scale_init=0.0, activation='quick_gelu', norm_eps=1e-5,
                 final_norm=True),
}

# torch's trunc_normal_(std=0.02, a=-0.02, b=0.02): CAE v2's patch kernel and class token.
_trunc_normal_1std = nn.initializers.truncated_normal(0.02, lower=-1.0, upper=1.0)


# ---------------------------------------------------------------------------- position tables
def sincos_table(grid_h: int, grid_w: int, dim: int, row_first: bool) -> np.ndarray:
  """Fixed 2-D sin-cos position table, (grid_h * grid_w, dim) float32, patches row-major.

  Patch (r, c) gets [sin(a w), cos(a w), sin(b w), cos(b w)] with w_k = 10000^(-k / (dim/4)),
  (a, b) = (r, c) if `row_first` else (c, r); computed in float64 then rounded (see module
  docstring for which release uses which order).
  """
  if dim % 4:
    raise ValueError(f'A 2-D sin-cos position table needs embed_dim divisible by 4, got {dim}.')
  quarter = dim // 4
  omega = 1.0 / 10000.0 ** (np.arange(quarter, dtype=np.float64) / quarter)
  rows, cols = np.meshgrid(np.arange(grid_h, dtype=np.float64),
                           np.arange(grid_w, dtype=np.float64), indexing='ij')
  first, second = (rows, cols) if row_first else (cols, rows)
  a = first.reshape(-1, 1) * omega
  b = second.reshape(-1, 1) * omega
  return np.concatenate([np.sin(a), np.cos(a), np.sin(b), np.cos(b)], axis=1).astype(np.float32)


def _fma32(a, b, c) -> np.ndarray:
  """float32 a * b + c rounded once, as torch's compiled kernels (fused multiply-add) give it.

  The float64 product of two float32 values is exact, so only the final rounding remains.
  """
  return (np.asarray(a, np.float64) * np.asarray(b, np.float64)
          + np.asarray(c, np.float64)).astype(np.float32)


def _cubic_weights(t: np.ndarray, a: float = -0.75) -> np.ndarray:
  """torch's cubic convolution coefficients for taps at -1, 0, 1, 2; t (n,) -> (n, 4) float32."""
  a, one = np.float32(a), np.float32(1)

  def near(x):  # |x| <= 1: ((a + 2) x - (a + 3)) x^2 + 1
    return _fma32(_fma32(a + 2, x, -(a + 3)) * x, x, one)

  def far(x):  # 1 < |x| < 2: ((a x - 5a) x + 8a) x - 4a
    return _fma32(_fma32(_fma32(a, x, -5 * a), x, 8 * a), x, -4 * a)

  rest = one - t
  return np.stack([far(t + one), near(t), near(rest), far(rest + one)], axis=1)


def interpolation_matrix(n_in: int, n_out: int, method: str) -> np.ndarray:
  """(n_out, n_in) float32 weights of torch's 1-D `F.interpolate(align_corners=False)`.

  Source index scale * (i + 0.5) - 0.5 with scale = n_in / n_out in float32 as torch computes
  them (bilinear weights bit-identical; bicubic within ~4e-7); bicubic uses the a = -0.75 kernel
  on 4 taps clamped to the border, bilinear clamps the source index at 0. No antialiasing
  (torch's default), also when shrinking.
  """
  if method not in POS_RESIZES:
    raise ValueError(f'pos_resize must be one of {POS_RESIZES}, got {method!r}.')
  scale = np.float32(n_in) / np.float32(n_out)
  src = _fma32(scale, np.arange(n_out, dtype=np.float32) + np.float32(0.5), np.float32(-0.5))
  if method == 'bilinear':
    src = np.maximum(src, np.float32(0))
  base = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
  t = np.clip(src - base.astype(np.float32), 0, 1).astype(np.float32)
  if method == 'bicubic':
    taps, weights = base[:, None] + np.arange(-1, 3), _cubic_weights(t)
  else:
    taps, weights = base[:, None] + np.arange(2), np.stack([1 - t, t], axis=1)
  matrix = np.zeros((n_out, n_in), np.float32)
  rows = np.broadcast_to(np.arange(n_out)[:, None], taps.shape)
  np.add.at(matrix, (rows, np.clip(taps, 0, n_in - 1)), weights)
  return matrix


def resize_pos_table(table: Array, size: tuple[int, int], method: str) -> Array:
  """Resizes a patch position table (h, w, D) to (size[0], size[1], D) in float32.

  Matches torch `F.interpolate(table as (1, D, h, w), size, mode=method, align_corners=False)`
  (no antialias) to float32 rounding: `jax.image.resize` does not (its bicubic kernel has
  a = -0.5 and it antialiases when shrinking).
  """
  h, w, _ = table.shape
  rows = interpolation_matrix(h, size[0], method)
  cols = interpolation_matrix(w, size[1], method)
  return jnp.einsum('Hh,hwd,Ww->HWd', rows, table.astype(jnp.float32), cols,
                    precision=jax.lax.Precision.HIGHEST)


def relative_position_index(grid_h: int, grid_w: int) -> np.ndarray:
  """BEiT's `relative_position_index`, (1+N, 1+N) int32 over [class, patches row-major].

  Patch pairs index the (2h-1)(2w-1) offsets, (dr + h - 1) (2w - 1) + dc + w - 1 with
  (dr, dc) = query (row, col) - key (row, col); the last three rows of the table serve class ->
  patch (-3), patch -> class (-2) and class -> class (-1).
  """
  rows, cols = np.meshgrid(np.arange(grid_h), np.arange(grid_w), indexing='ij')
  rows, cols = rows.reshape(-1), cols.reshape(-1)
  dr = rows[:, None] - rows[None, :] + grid_h - 1
  dc = cols[:, None] - cols[None, :] + grid_w - 1
  n_rel = (2 * grid_h - 1) * (2 * grid_w - 1) + 3
  index = np.empty((grid_h * grid_w + 1,) * 2, np.int32)
  index[1:, 1:] = dr * (2 * grid_w - 1) + dc
  index[0, :] = n_rel - 3
  index[:, 0] = n_rel - 2
  index[0, 0] = n_rel - 1
  return index


# ---------------------------------------------------------------------------- layers
class Block(nn.Module):
  """Transformer block: pre-norm `x + f(norm(x))` or post-norm `norm(x + f(x))`.

  Branches are scaled by `gamma_1` / `gamma_2` when `layer_scale_init` > 0 and dropped per
  sample with probability `drop_path_rate` in training (timm's DropPath: kept samples are
  scaled by 1 / keep; needs the 'drop_path' rng). With `rel_pos_grid` (h, w) the block owns
  BEiT's `relative_position_bias_table` ((2h-1)(2w-1)+3, heads), added to the attention logits
  of [class, h*w patches] through `relative_position_index`.
  """
  num_heads: int
  mlp_ratio: float = 4.0
  qkv_bias: str = 'full'
  layer_scale_init: float = 0.0
  activation: str = 'gelu'
  norm_eps: float = 1e-6
  postnorm: bool = False
  drop_path_rate: float = 0.0
  deterministic: bool = True
  rel_pos_grid: tuple[int, int] | None = None
  attention: str = 'xla'
  dtype: DType = jnp.float32
  param_dtype: DType = jnp.float32

  def _rel_pos_bias(self) -> Array | None:
    """BEiT's relative position bias (heads, 1+N, 1+N) from this block's table, or None."""
    if self.rel_pos_grid is None:
      return None
    index = relative_position_index(*self.rel_pos_grid)
    # Zero-initialised (the release's `trunc_normal_` is commented out), weight-decayed.
    table = self.param('relative_position_bias_table', nn.initializers.zeros,
                       (int(index.max()) + 1, self.num_heads), self.param_dtype)
    return jnp.take(table, index, axis=0).transpose(2, 0, 1)

  def _branch_out(self, y: Array, gamma_name: str) -> Array:
    """Layer scale then drop path on a branch output (batch, n, dim)."""
    if self.layer_scale_init > 0:
      gamma = self.param(gamma_name, nn.initializers.constant(self.layer_scale_init),
                         (y.shape[-1],), self.param_dtype)
      y = y * gamma.astype(y.dtype)
    return layers.drop_path(y, self.drop_path_rate, self.deterministic, self.make_rng)

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """x: (batch, n, dim) -> (batch, n, dim)."""
    norm = functools.partial(layers.layer_norm, self.norm_eps, self.dtype, self.param_dtype)
    attn = layers.Attention(self.num_heads, qkv_bias=self.qkv_bias,
                            implementation=self.attention, dtype=self.dtype,
                            param_dtype=self.param_dtype, name='attn')
    mlp = layers.Mlp(self.mlp_ratio, use_bias=True, activation=ACTIVATIONS[self.activation],
                     dtype=self.dtype, param_dtype=self.param_dtype, name='mlp')
    norm1, norm2 = norm(name='norm1'), norm(name='norm2')
    bias = self._rel_pos_bias()
    if bias is not None:
      attn = functools.partial(attn, bias=bias)
    if self.postnorm:
      x = norm1(x + self._branch_out(attn(x), 'gamma_1'))
      return norm2(x + self._branch_out(mlp(x), 'gamma_2'))
    x = x + self._branch_out(attn(norm1(x)), 'gamma_1')
    return x + self._branch_out(mlp(norm2(x)), 'gamma_2')


# ---------------------------------------------------------------------------- the model
class ViT(nn.Module):
  """One class token, a position table, `depth` blocks; the families are in `FAMILIES`.

  Fields mirror a model config section (see `from_config`). `image_size` is the native (square)
  resolution the position table covers; other sizes resize it (`pos_resize`). `dtype` is the
  compute dtype (softmax and LayerNorm statistics stay float32), `param_dtype` the parameters'.
  Stochastic depth grows linearly over the blocks from 0 to `drop_path_rate` (all five releases).
  `rel_pos_bias`: every block gets BEiT's relative position bias over the native grid (the
  fine-tuning recipe of CAE v2 / BEiT; zero-initialised, so a pretrained encoder computes the
  same function until it trains); inputs must then be at `image_size` with every patch.
  """
  patch_size: int = 16
  image_size: int = 224
  embed_dim: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_ratio: float = 4.0
  pos_embed: str = 'sincos_row_col'
  class_pos_embed: bool = False
  pos_resize: str = 'bicubic'
  patch_bias: bool = True
  embed_norm: bool = False
  block: str = 'prenorm'
  qkv_bias: str = 'full'
  layer_scale_init: float = 0.0
  activation: str = 'gelu'
  norm_eps: float = 1e-6
  final_norm: bool = True
  out_dim: int = 0
  drop_path_rate: float = 0.0
  rel_pos_bias: bool = False
  dtype: DType = jnp.float32
  param_dtype: DType = jnp.float32
  remat_policy: str = 'none'
  scan_layers: bool = False
  attention: str = 'xla'

  @property
  def frozen_params(self) -> tuple[str, ...]:
    """Top-level parameters that are never trained (no gradient; keep them out of optimisers)."""
    return () if self.pos_embed == 'learned' else ('pos_embed',)

  @property
  def grid(self) -> int:
    """Side of the patch grid the position table covers."""
    return self.image_size // self.patch_size

  def _check_fields(self) -> None:
    choices = dict(pos_embed=POS_EMBEDS, pos_resize=POS_RESIZES, qkv_bias=layers.QKV_BIASES,
                   block=BLOCKS, activation=tuple(ACTIVATIONS),
                   remat_policy=layers.REMAT_POLICIES,
                   attention=layers.ATTENTION_IMPLEMENTATIONS)
    for name, valid in choices.items():
      if getattr(self, name) not in valid:
        raise ValueError(f'ViT {name} must be one of {valid}, got {getattr(self, name)!r}.')
    if self.embed_dim % self.num_heads:
      raise ValueError(
          f'embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}.')
    if self.image_size % self.patch_size:
      raise ValueError(f'image_size {self.image_size} is not divisible by patch_size '
                       f'{self.patch_size}: the position table covers a whole patch grid.')

  def _pos_init(self, key: jax.Array, shape: tuple[int, ...], dtype: DType) -> Array:
    if self.pos_embed == 'learned':
      return nn.initializers.truncated_normal(0.02)(key, shape, dtype)
    table = sincos_table(self.grid, self.grid, self.embed_dim, self.pos_embed == 'sincos_row_col')
    if self.class_pos_embed:
      table = np.concatenate([np.zeros((1, self.embed_dim), np.float32), table])
    return jnp.asarray(table[None], dtype)

  def _patch_grid(self, images: Array) -> tuple[int, int]:
    _, h, w, _ = images.shape
    if h % self.patch_size or w % self.patch_size:
      raise ValueError(f'Image size {h}x{w} is not divisible by the patch size {self.patch_size}.')
    return h // self.patch_size, w // self.patch_size

  @nn.compact
  def encode(self, images: Array, visible_indices: Array | None = None,
             blocks: Sequence[int] = (), train: bool = False) -> layers.Encoded:
    """Runs the ViT; see `layers.Encoded` for the outputs.

    Args:
      images: (batch, H, W, 3), H and W divisible by patch_size.
      visible_indices: (batch, n_visible) int row-major patch indices to keep after the patch
        embedding (with their positions), or None for all patches.
      blocks: 0-indexed blocks whose raw output to return.
      train: stochastic depth on (needs the 'drop_path' rng when drop_path_rate > 0).

    Returns:
      Encoded(tokens (batch, 1 + n, D_out), blocks {i: (batch, 1 + n, D)}), n = n_visible or
      (H/p) * (W/p).
    """
    self._check_fields()
    bad = [i for i in blocks if not 0 <= i < self.depth]
    if bad:
      raise ValueError(f'blocks {bad} out of range: this ViT has blocks 0..{self.depth - 1}.')
    grid_h, grid_w = self._patch_grid(images)
    if self.rel_pos_bias and ((grid_h, grid_w) != (self.grid, self.grid)
                              or visible_indices is not None):
      raise ValueError(f'rel_pos_bias covers the full {self.grid}x{self.grid} patch grid; got a '
                       f'{grid_h}x{grid_w} grid' + (' with visible_indices' if visible_indices
                                                    is not None else '') + '.')
    b, dim = images.shape[0], self.embed_dim
    norm = functools.partial(layers.layer_norm, self.norm_eps, self.dtype, self.param_dtype)

    x = nn.Conv(dim, (self.patch_size, self.patch_size), strides=self.patch_size,
                padding='VALID', use_bias=self.patch_bias, dtype=self.dtype,
                param_dtype=self.param_dtype, kernel_init=_trunc_normal_1std,
                name='patch_embed')(images.astype(self.dtype))
    n_pos = self.grid ** 2 + int(self.class_pos_embed)
    pos = self.param('pos_embed', self._pos_init, (1, n_pos, dim), self.param_dtype)[0]
    if self.pos_embed != 'learned':
      pos = jax.lax.stop_gradient(pos)
    patch_pos = pos[int(self.class_pos_embed):]
    if (grid_h, grid_w) != (self.grid, self.grid):
      patch_pos = resize_pos_table(patch_pos.reshape(self.grid, self.grid, dim),
                                   (grid_h, grid_w), self.pos_resize).reshape(-1, dim)
    x = x.reshape(b, grid_h * grid_w, dim) + patch_pos.astype(self.dtype)
    if visible_indices is not None:
      x = jnp.take_along_axis(x, visible_indices[:, :, None], axis=1)
    cls = self.param('cls_token', _trunc_normal_1std, (1, 1, dim), self.param_dtype)
    if self.class_pos_embed:
      cls = cls + pos[:1]
    x = jnp.concatenate([jnp.broadcast_to(cls.astype(self.dtype), (b, 1, dim)), x], axis=1)
    if self.embed_norm:
      x = norm(name='embed_norm')(x)

    fields = dict(num_heads=self.num_heads, mlp_ratio=self.mlp_ratio, qkv_bias=self.qkv_bias,
                  layer_scale_init=self.layer_scale_init, activation=self.activation,
                  norm_eps=self.norm_eps, postnorm=self.block == 'postnorm',
                  deterministic=not train, attention=self.attention, dtype=self.dtype,
                  param_dtype=self.param_dtype)
    if self.rel_pos_bias:
      fields['rel_pos_grid'] = (self.grid, self.grid)
    rates = [float(r) for r in layers.torch_linspace(0, self.drop_path_rate, self.depth)]
    x, outputs = stack.block_stack(Block, fields, x, depth=self.depth,
                                   remat_policy=self.remat_policy,
                                   layer_fields={'drop_path_rate': rates}, keep=set(blocks),
                                   scan=self.scan_layers)
    if self.final_norm:
      x = norm(name='norm')(x)
    if self.out_dim:
      x = nn.Dense(self.out_dim, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
                   kernel_init=nn.initializers.normal(dim ** -0.5), name='proj')(x)
    return layers.Encoded(x, outputs)

  def __call__(self, images: Array) -> tuple[Array, Array, Array]:
    """Eval forward (the engine's interface).

    Args:
      images: (batch, H, W, 3), H and W divisible by patch_size.

    Returns:
      global_repr (batch, D_out): class token of the final output; registers (batch, 0, D_out);
      feature_map (batch, H/p, W/p, D_out): final patch tokens.
    """
    grid_h, grid_w = self._patch_grid(images)
    tokens = self.encode(images).tokens
    return tokens[:, 0], tokens[:, 1:1], tokens[:, 1:].reshape(
        images.shape[0], grid_h, grid_w, tokens.shape[-1])


# ViT fields that come from `config.efficiency`, never from a model section.
EFFICIENCY_FIELDS = ('dtype', 'param_dtype', 'remat_policy', 'scan_layers', 'attention')


def from_config(model_config: ml_collections.ConfigDict,
                efficiency: ml_collections.ConfigDict, **fields: Any) -> ViT:
  """Builds a ViT from a model section (e.g. `config.caev2.model`, a teacher's section).

  The section's keys are ViT field names (start from `FAMILIES[...]`); compute / param dtype,
  remat policy and scanned blocks come from `efficiency` (the run's `config.efficiency`);
  `fields` replace the section's (e.g. the activation its checkpoint's loader resolved, where
  the section leaves it to the file: activation ''). Unknown keys are an error.
  """
  m = {**model_config, **fields}
  names = {f.name for f in dataclasses.fields(ViT)} - {'parent', 'name', *EFFICIENCY_FIELDS}
  unknown = sorted(set(m) - names)
  if unknown:
    raise ValueError(f'Unknown ViT field(s) {unknown} in the model config; valid: {sorted(names)}.')
  if m.get('activation', 'gelu') not in ACTIVATIONS:
    raise ValueError(f'activation={m["activation"]!r}: a ViT is built with one of '
                     f'{tuple(ACTIVATIONS)} (a section that leaves it to its checkpoint, \'\', '
                     'is built by that checkpoint\'s loader).')
  e = efficiency
  return ViT(**m, dtype=jnp.dtype(e.compute_dtype),
             param_dtype=jnp.dtype(e.param_dtype), remat_policy=e.remat_policy,
             scan_layers=e.get('scan_layers', False), attention=e.get('attention', 'xla'))
