"""CAPI's EncoderDecoder: ViT encoder (registers, 2-D RoPE) and cross-attention predictor.

Reproduces `model.py` of the official release (facebookresearch/capi, commit 98b4fa1); see
`docs/reference/capi_algorithm.md`. Images are NHWC here (the official code is NCHW).

Parameter tree (names mirror the official `state_dict`, which `convert.py` relies on):
  patch_embed/{kernel (p, p, 3, D), bias (D,)}, registers (1, R, D), mask_token (1, D),
  {encoder,decoder}/blocks_{i}/residual1/norm/scale (D,),
  {encoder,decoder}/blocks_{i}/residual1/fn/{q_proj,k_proj,v_proj,proj}/kernel (D, D),
  {encoder,decoder}/blocks_{i}/residual1/fn/rope/freqs (2, head_dim),
  {encoder,decoder}/blocks_{i}/residual2/norm/scale (D,),
  {encoder,decoder}/blocks_{i}/residual2/fn/{fc1 (D, 4D), fc2 (4D, D)}/kernel.
"""

from collections.abc import Callable, Sequence
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



def rope_frequencies(head_dim: int, max_freq: float = 7.0, min_freq: float = 7e-4) -> np.ndarray:
  """The release's RoPE frequency table, (2, head_dim) float32.

  Row 0 drives the first half of the channels with the row coordinate, row 1 the second half
  with the column coordinate; angular frequencies (times 2*pi). Computed in float32 like the
  reference so the table is bit-identical to the released one.
  """
  if head_dim % 4:
    raise ValueError(f'2-D RoPE needs head_dim divisible by 4, got {head_dim}.')
  exponents = layers.torch_linspace(0, -1, head_dim // 4)
  freqs_1d = np.float32(max_freq) * np.float32(max_freq / min_freq) ** exponents
  freqs_1d = np.concatenate([freqs_1d, freqs_1d])
  table = np.zeros((2, head_dim), np.float32)
  table[0, :head_dim // 2] = freqs_1d
  table[1, head_dim // 2:] = freqs_1d
  return table * np.float32(2) * np.float32(np.pi)


def patch_coordinates(grid_h: int, grid_w: int) -> np.ndarray:
  """RoPE coordinates of the patches, (grid_h * grid_w, 2) float32, row-major, (row, col)."""
  rows = layers.torch_linspace(0, 1, grid_h)
  cols = layers.torch_linspace(0, 1, grid_w)
  return np.stack(np.meshgrid(rows, cols, indexing='ij'), axis=-1).reshape(-1, 2)


def register_coordinates(layout: str, n_registers: int) -> np.ndarray:
  """RoPE coordinates of the registers in the unit square, (n_registers, 2) float32."""
  if layout == 'zeros':
    return np.zeros((n_registers, 2), np.float32)
  if layout != 'edge':
    raise ValueError(f"register_coordinates must be 'edge' or 'zeros', got {layout!r}.")
  if n_registers % 4:
    raise ValueError(
        f"'edge' register coordinates need n_registers divisible by 4, got {n_registers}.")
  side = n_registers // 4
  c = np.arange(side, dtype=np.float32) / np.float32(side)
  zeros, ones = np.zeros_like(c), np.ones_like(c)
  # s registers per side, going around the unit square: left, bottom, right, top edges.
  rows = np.concatenate([c, ones, 1 - c, zeros])
  cols = np.concatenate([zeros, c, ones, 1 - c])
  return np.stack([rows, cols], axis=-1)


def rotate_half(x: Array) -> Array:
  """[a, b] -> [-b, a] on the last axis (pairs channel i with channel i + d/2, as the release)."""
  x1, x2 = jnp.split(x, 2, axis=-1)
  return jnp.concatenate([-x2, x1], axis=-1)


class RMSNorm(nn.Module):
  """RMSNorm computed in float32; `use_scale=False` is the release's final norm."""
  eps: float = 1e-5
  use_scale: bool = True
  dtype: DType = jnp.float32
  param_dtype: DType = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    if self.use_scale:
      scale = self.param('scale', nn.initializers.ones, (x.shape[-1],), self.param_dtype)
      y = y * scale.astype(jnp.float32)
    return y.astype(self.dtype)


class Rope(nn.Module):
  """2-D rotary embedding with the release's (learnable, lr 0) frequency table `freqs`.

  `freeze_freqs=True` stops the gradient at `freqs`: the release trains them at learning rate
  0, so their gradient (a reduction over every rotated q and k entry, ~10% of a block's backward
  pass) can never change them.
  """
  head_dim: int
  freeze_freqs: bool = False
  param_dtype: DType = jnp.float32

  @nn.compact
  def __call__(self, coords: Array) -> Callable[[Array], Array]:
    """coords (batch, n, 2) -> the rotation of (batch, n, heads, head_dim) tokens at them (the
    rotary hook of `layers.Attention`); batch may be 1 (coordinates shared by every image)."""
    freqs = self.param('freqs', lambda *_: jnp.asarray(rope_frequencies(self.head_dim),
                                                       self.param_dtype))
    if self.freeze_freqs:
      freqs = jax.lax.stop_gradient(freqs)
    angle = jnp.einsum('bnc,cd->bnd', coords.astype(jnp.float32), freqs.astype(jnp.float32),
                       precision=jax.lax.Precision.HIGHEST)[:, :, None]
    # Materialised once: XLA would otherwise fuse cos/sin into every consumer (q, k, forward
    # and backward) and evaluate them once per head and per use.
    cos, sin = jax.lax.optimization_barrier((jnp.cos(angle), jnp.sin(angle)))
    return functools.partial(apply_rope, cos=cos, sin=sin)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
  """x (batch, n, heads, head_dim) rotated by angles with cos and sin (batch or 1, n, 1,
  head_dim) float32; same shape and dtype as x."""
  x32 = x.astype(jnp.float32)
  return (x32 * cos + rotate_half(x32) * sin).astype(x.dtype)


def make_attention(num_heads: int, train_rope_freqs: bool = True, dtype: DType = jnp.float32,
                   param_dtype: DType = jnp.float32, name: str | None = None,
                   implementation: str = 'xla') -> layers.Attention:
  """CAPI's (cross-)attention: bias-free q_proj / k_proj / v_proj / proj, RoPE on q and k (see
  `Rope` for `train_rope_freqs`); called as (x, coords, context, context_coords);
  `implementation`: `layers.attention`'s."""
  return layers.Attention(
      num_heads, projections=('q_proj', 'k_proj', 'v_proj'), qkv_bias='none', out_bias=False,
      rotary=functools.partial(Rope, freeze_freqs=not train_rope_freqs, param_dtype=param_dtype),
      flat_tokens=True, implementation=implementation, dtype=dtype, param_dtype=param_dtype,
      name=name)


def _select(groups: Array, keep: Array) -> Array:
  """groups (g, local, ...), keep (g, n_keep) -> (g * n_keep, ...): the kept samples."""
  picked = jax.vmap(lambda group, idx: group[idx])(groups, keep)
  return picked.reshape(-1, *groups.shape[2:])


class Residual(nn.Module):
  """Pre-norm residual `x + fn(norm(x))` with the release's 'efficient' stochastic depth.

  In training, the branch runs on a random subset of max(int(B * keep), 1) samples and is
  added back scaled by B / n_keep: static shapes, and the skipped samples cost nothing.
  The release draws the subset on each GPU from its local batch; `drop_path_groups` > 1 does
  the same for a global batch split into that many contiguous groups (set it to the number of
  batch shards: the selection then stays on each device instead of gathering the kept
  samples onto every device).
  """
  make_norm: Callable[..., nn.Module]
  make_fn: Callable[..., nn.Module]
  drop_rate: float = 0.0
  deterministic: bool = True
  drop_path_groups: int = 1

  @nn.compact
  def __call__(self, x: Array, *branch_args: Array | None) -> Array:
    """x: (batch, n, dim); branch_args: per-sample arrays (leading batch axis), arrays shared by
    every sample (leading axis 1), or None."""
    norm, fn = self.make_norm(name='norm'), self.make_fn(name='fn')
    if self.deterministic or self.drop_rate == 0.0:
      return x + fn(norm(x), *branch_args)
    b, g = x.shape[0], self.drop_path_groups
    if b % g:
      raise ValueError(f'The batch ({b}) must split into drop_path_groups={g} equal groups.')
    local = b // g
    n_keep = max(int(local * (1.0 - self.drop_rate)), 1)
    keys = jax.random.split(self.make_rng('drop_path'), g)
    keep = jax.vmap(lambda k: jax.random.permutation(k, local)[:n_keep])(keys)  # (g, n_keep)
    grouped = lambda a: a.reshape(g, local, *a.shape[1:])
    sub_args = [a if a is None or a.shape[0] == 1 else _select(grouped(a), keep)
                for a in branch_args]
    branch = fn(norm(_select(grouped(x), keep)), *sub_args)
    branch = branch.reshape(g, n_keep, *branch.shape[1:]) * jnp.asarray(local / n_keep, x.dtype)
    out = jax.vmap(lambda group, idx, update: group.at[idx].add(update))(grouped(x), keep, branch)
    return out.reshape(x.shape)


class Block(nn.Module):
  """Attention (self, or cross when a context is given) then MLP, both pre-norm residuals."""
  num_heads: int
  mlp_ratio: int = 4
  norm_eps: float = 1e-5
  drop_path_rate: float = 0.0
  deterministic: bool = True
  drop_path_groups: int = 1
  train_rope_freqs: bool = True
  attention: str = 'xla'
  dtype: DType = jnp.float32
  param_dtype: DType = jnp.float32

  @nn.compact
  def __call__(self, x: Array, coords: Array, context: Array | None,
               context_coords: Array | None) -> Array:
    norm = functools.partial(RMSNorm, self.norm_eps, dtype=self.dtype, param_dtype=self.param_dtype)
    residual = functools.partial(Residual, drop_rate=self.drop_path_rate,
                                 deterministic=self.deterministic,
                                 drop_path_groups=self.drop_path_groups)
    attn = functools.partial(make_attention, self.num_heads, self.train_rope_freqs, self.dtype,
                             self.param_dtype, implementation=self.attention)
    x = residual(norm, attn, name='residual1')(x, coords, context, context_coords)
    mlp = functools.partial(layers.Mlp, self.mlp_ratio, dtype=self.dtype, param_dtype=self.param_dtype)
    return residual(norm, mlp, name='residual2')(x)


class Transformer(nn.Module):
  """A stack of `depth` blocks: blocks_0 .. blocks_{depth-1}, or `blocks` scanned (see
  `stack.block_stack`)."""
  depth: int
  num_heads: int
  mlp_ratio: int = 4
  norm_eps: float = 1e-5
  drop_path_rate: float = 0.0
  drop_path_groups: int = 1
  remat_policy: str = 'none'
  scan: bool = False
  train_rope_freqs: bool = True
  attention: str = 'xla'
  dtype: DType = jnp.float32
  param_dtype: DType = jnp.float32

  @nn.compact
  def __call__(self, x: Array, coords: Array, return_layers: Sequence[int], deterministic: bool,
               context: Array | None = None,
               context_coords: Array | None = None) -> dict[int, Array]:
    """Runs the blocks up to the deepest requested layer.

    Args:
      x: (batch, n, dim) input tokens.
      coords: (batch, n, 2) their RoPE coordinates, or (1, n, 2) shared by every image.
      return_layers: layer numbers to return; 0 is the input, i the output of block i-1.
      deterministic: no stochastic depth (eval / teacher).
      context: (batch, n_k, dim) keys/values of every block's cross-attention, or None.
      context_coords: (batch or 1, n_k, 2).

    Returns:
      {layer: (batch, n, dim)} for every requested layer.
    """
    fields = dict(num_heads=self.num_heads, mlp_ratio=self.mlp_ratio, norm_eps=self.norm_eps,
                  drop_path_rate=self.drop_path_rate, deterministic=deterministic,
                  drop_path_groups=self.drop_path_groups, train_rope_freqs=self.train_rope_freqs,
                  attention=self.attention, dtype=self.dtype, param_dtype=self.param_dtype)
    # Initialisation must create every block even if this call only needs the first ones.
    n_run = self.depth if self.is_initializing() else max(return_layers)
    outputs = {0: x} if 0 in return_layers else {}
    _, kept = stack.block_stack(
        Block, fields, x, coords, context, context_coords, depth=self.depth,
        remat_policy=self.remat_policy, n_run=n_run, keep={i - 1 for i in return_layers if i},
        scan=self.scan)
    outputs.update((i + 1, out) for i, out in sorted(kept.items()))
    return outputs


class EncoderDecoder(nn.Module):
  """CAPI's backbone: encoder over visible tokens + registers, cross-attention predictor.

  Fields mirror CAPI's model config section (see `from_config`); `dtype` is the compute dtype
  (softmax, norms and reductions stay float32), `param_dtype` the parameters' dtype;
  `drop_path_groups`: see `Residual` (1 = one subset over the whole batch);
  `train_rope_freqs`: see `Rope` (CAPI turns it off when `capi.optim.rope_lr_mult` is 0).
  """
  patch_size: int = 14
  n_registers: int = 16
  register_coordinates: str = 'edge'
  scale_reg_to_visible: bool = True
  norm_eps: float = 1e-5
  embed_dim: int = 1024
  num_heads: int = 16
  mlp_ratio: int = 4
  drop_path_rate: float = 0.0
  drop_path_groups: int = 1
  encoder_depth: int = 24
  decoder_depth: int = 12
  out_layer: int = -1
  dtype: DType = jnp.float32
  param_dtype: DType = jnp.float32
  remat_policy: str = 'none'
  scan_layers: bool = False
  train_rope_freqs: bool = True
  attention: str = 'xla'

  def setup(self):
    if self.embed_dim % self.num_heads:
      raise ValueError(
          f'embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}.')
    if self.remat_policy not in layers.REMAT_POLICIES:
      raise ValueError(f'remat_policy must be one of {layers.REMAT_POLICIES}, '
                       f'got {self.remat_policy!r}.')
    fan_in = 3 * self.patch_size ** 2
    self.patch_embed = nn.Conv(
        self.embed_dim, (self.patch_size, self.patch_size), strides=self.patch_size,
        padding='VALID', dtype=self.dtype, param_dtype=self.param_dtype,
        kernel_init=layers.patch_kernel_init, bias_init=layers.conv_bias_init(fan_in))
    self.registers = self.param('registers', nn.initializers.normal(0.02),
                                (1, self.n_registers, self.embed_dim), self.param_dtype)
    self.mask_token = self.param('mask_token', nn.initializers.normal(0.02),
                                 (1, self.embed_dim), self.param_dtype)
    transformer = functools.partial(
        Transformer, num_heads=self.num_heads, mlp_ratio=self.mlp_ratio, norm_eps=self.norm_eps,
        drop_path_rate=self.drop_path_rate, drop_path_groups=self.drop_path_groups,
        remat_policy=self.remat_policy, scan=self.scan_layers,
        train_rope_freqs=self.train_rope_freqs, attention=self.attention, dtype=self.dtype,
        param_dtype=self.param_dtype)
    self.encoder = transformer(self.encoder_depth)
    self.decoder = transformer(self.decoder_depth)
    self.enc_norm = RMSNorm(self.norm_eps, use_scale=False, dtype=self.dtype)
    self.dec_norm = RMSNorm(self.norm_eps, use_scale=False, dtype=self.dtype)

  @property
  def _out_layer(self) -> int:
    return self.out_layer % (self.encoder_depth + 1)

  def _grid(self, images: Array) -> tuple[int, int]:
    _, h, w, _ = images.shape
    if h % self.patch_size or w % self.patch_size:
      raise ValueError(f'Image size {h}x{w} is not divisible by the patch size {self.patch_size}.')
    return h // self.patch_size, w // self.patch_size

  def _encode(self, images: Array, visible_indices: Array | None, return_layers: set[int],
              deterministic: bool, normed: bool = True
              ) -> tuple[dict[int, Array], Array, np.ndarray]:
    """Patch-embeds, keeps the visible tokens, prepends registers, runs the encoder.

    Args:
      images: (batch, H, W, 3).
      visible_indices: (batch, n_visible) row-major token indices, or None for all tokens.
      return_layers: encoder layers to return; 0 is the input, i the output of block i - 1.
      deterministic: no stochastic depth.
      normed: the layers after the encoder's final norm (else the raw residual stream).

    Returns:
      ({layer: (batch, R + n_visible, D)}, encoder coords (batch, R + n_visible, 2), or
      (1, R + n_tokens, 2) without visible_indices (the same for every image), all patch coords
      (n_tokens, 2)).
    """
    grid_h, grid_w = self._grid(images)
    b = images.shape[0]
    x = self.patch_embed(images.astype(self.dtype)).reshape(b, grid_h * grid_w, self.embed_dim)
    coords_all = patch_coordinates(grid_h, grid_w)
    if visible_indices is None:
      # Every image has the same coordinates: one row, so that each block's RoPE table (sin and
      # cos, per layer) is computed once, not once per image.
      coords = jnp.asarray(coords_all)[None]
    else:
      x = jnp.take_along_axis(x, visible_indices[:, :, None], axis=1)
      coords = jnp.asarray(coords_all)[visible_indices]
    reg_coords = jnp.broadcast_to(
        register_coordinates(self.register_coordinates, self.n_registers),
        (coords.shape[0], self.n_registers, 2))
    if self.scale_reg_to_visible:
      lo = coords.min(axis=1, keepdims=True)
      hi = coords.max(axis=1, keepdims=True)
      reg_coords = lo + reg_coords * (hi - lo)
    registers = jnp.broadcast_to(self.registers.astype(self.dtype),
                                 (b, self.n_registers, self.embed_dim))
    tokens = jnp.concatenate([registers, x], axis=1)
    enc_coords = jnp.concatenate([reg_coords, coords], axis=1)
    outputs = self.encoder(tokens, enc_coords, tuple(sorted(return_layers)), deterministic)
    if normed:
      outputs = {k: self.enc_norm(v) for k, v in outputs.items()}
    return outputs, enc_coords, coords_all

  def _predict(self, context: Array, context_coords: Array, query_coords: Array, dec_layer: int,
               deterministic: bool) -> Array:
    """Predictor: mask-token queries at query_coords (batch, n_q, 2) -> (batch, n_q, D) normed."""
    b, n_q, _ = query_coords.shape
    queries = jnp.broadcast_to(self.mask_token.astype(self.dtype), (b, n_q, self.embed_dim))
    outputs = self.decoder(queries, query_coords, (dec_layer,), deterministic,
                           context=context, context_coords=context_coords)
    return self.dec_norm(outputs[dec_layer])

  def __call__(self, images: Array) -> tuple[Array, Array, Array]:
    """Eval forward.

    Args:
      images: (batch, H, W, 3), H and W divisible by patch_size.

    Returns:
      global_repr (batch, D): mean over positions of the first predictor block's output with
        queries at every patch position, after the predictor's final norm;
      registers (batch, R, D) and feature_map (batch, H/p, W/p, D): the normed encoder output
        at `out_layer`.
    """
    grid_h, grid_w = self._grid(images)
    b = images.shape[0]
    final = self.encoder_depth
    enc_outs, enc_coords, coords_all = self._encode(images, None, {self._out_layer, final}, True)
    query_coords = jnp.broadcast_to(coords_all, (b, *coords_all.shape))
    pred = self._predict(enc_outs[final], enc_coords, query_coords, 1, True)
    global_repr = pred.astype(jnp.float32).mean(axis=1).astype(pred.dtype)
    enc_out = enc_outs[self._out_layer]
    registers = enc_out[:, :self.n_registers]
    feature_map = enc_out[:, self.n_registers:].reshape(b, grid_h, grid_w, self.embed_dim)
    return global_repr, registers, feature_map

  def encode_all(self, images: Array) -> Array:
    """Teacher forward: (batch, H, W, 3) -> normed encoder output, patches only (batch, n, D)."""
    enc_outs, _, _ = self._encode(images, None, {self._out_layer}, True)
    return enc_outs[self._out_layer][:, self.n_registers:]

  def encode(self, images: Array, visible_indices: Array | None = None,
             blocks: Sequence[int] = (), train: bool = False) -> layers.Encoded:
    """The encoder alone, with raw per-block outputs (the API `vit.ViT.encode` has too).

    Args:
      images: (batch, H, W, 3), H and W divisible by patch_size.
      visible_indices: (batch, n_visible) int row-major patch indices to keep, or None.
      blocks: 0-indexed encoder blocks whose raw output to return.
      train: stochastic depth on (needs the 'drop_path' rng when drop_path_rate > 0).

    Returns:
      Encoded(tokens (batch, R + n, D): [registers, patches] of the last block, normed;
      blocks {i: (batch, R + n, D)}: raw residual stream after block i), n = n_visible or
      (H/p) * (W/p).
    """
    bad = [i for i in blocks if not 0 <= i < self.encoder_depth]
    if bad:
      raise ValueError(f'blocks {bad} out of range: this encoder has blocks '
                       f'0..{self.encoder_depth - 1}.')
    final = self.encoder_depth
    # Encoder layer i + 1 is the output of block i.
    outputs, _, _ = self._encode(images, visible_indices, {final, *(i + 1 for i in blocks)},
                                 not train, normed=False)
    return layers.Encoded(self.enc_norm(outputs[final]), {i: outputs[i + 1] for i in blocks})

  def pretrain(self, images: Array, visible_indices: Array, predict_indices: Array,
               train: bool = True) -> tuple[Array, Array]:
    """Student forward: encoder on visible tokens, predictor on the positions to predict.

    Args:
      images: (batch, H, W, 3).
      visible_indices: (batch, n_visible) int, row-major token indices, sorted ascending.
      predict_indices: (batch, n_predict) int, token indices of the positions to predict.
      train: stochastic depth on (needs the 'drop_path' rng when drop_path_rate > 0).

    Returns:
      student_patches (batch, n_visible, D): normed encoder output at `out_layer`, registers
        dropped; predictions (batch, n_predict, D): normed predictor output.
    """
    final = self.encoder_depth
    enc_outs, enc_coords, coords_all = self._encode(
        images, visible_indices, {self._out_layer, final}, not train)
    query_coords = jnp.asarray(coords_all)[predict_indices]
    pred = self._predict(enc_outs[final], enc_coords, query_coords, self.decoder_depth, not train)
    return enc_outs[self._out_layer][:, self.n_registers:], pred


def from_config(model_config: ml_collections.ConfigDict, efficiency: ml_collections.ConfigDict,
                train_rope_freqs: bool = True) -> EncoderDecoder:
  """Builds the EncoderDecoder from a model section (CAPI's `config.capi.model`) and the run's
  `config.efficiency`; `train_rope_freqs` False: RoPE frequencies get no gradient (CAPI passes
  `capi.optim.rope_lr_mult != 0`)."""
  m, e = model_config, efficiency
  return EncoderDecoder(
      patch_size=m.patch_size, n_registers=m.n_registers,
      register_coordinates=m.register_coordinates, scale_reg_to_visible=m.scale_reg_to_visible,
      norm_eps=m.norm_eps, embed_dim=m.embed_dim, num_heads=m.num_heads, mlp_ratio=m.mlp_ratio,
      drop_path_rate=m.drop_path_rate, drop_path_groups=m.get('drop_path_groups', 1),
      encoder_depth=m.encoder_depth,
      decoder_depth=m.decoder_depth, out_layer=m.out_layer,
      dtype=jnp.dtype(e.compute_dtype), param_dtype=jnp.dtype(e.param_dtype),
      remat_policy=e.remat_policy, scan_layers=e.get('scan_layers', False),
      train_rope_freqs=train_rope_freqs, attention=e.get('attention', 'xla'))
