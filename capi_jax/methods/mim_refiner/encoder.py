"""The encoder MIM-Refiner refines: any capi_jax backbone with the per-block `encode` API.

`config.mim_refiner.encoder` names the backbone that `config.mim_refiner.model` describes:
  'capi'                 CAPI's EncoderDecoder (the model section of configs/vitl.py). Its
                         prefix tokens are the registers. Its predictor (decoder, mask token) and
                         RoPE frequencies (lr 0 in the CAPI release) stay in the tree, so the tree
                         is a CAPI backbone's, but they are frozen (never trained).
  a `vit.FAMILIES` name  `vit.ViT` with that family's fields (the model section holds ViT fields);
                         one class token. Fixed sin-cos position tables are frozen.
Heads read either the final output (head 'main': `Encoded.tokens`, normed where the backbone
has a final norm) or the raw residual stream after block N (head 'cls<N>', 0-indexed), as the
release's head names say (`stage2_processor.py`), pooled by `pool`:
  'cls'  token 0: the class token of a ViT, the first register of a CAPI encoder;
  'avg'  mean of the patch tokens (the release's CrossMAE pooling; use it for a backbone
         without a class token).

With `efficiency.scan_layers` the blocks run as one scan, but the encoder keeps per-block
parameters (`build`): the release's groups differ per block (layer-wise lr decay, the block
freezer), and a per-block tree keeps them, the EMA's copies of frozen blocks and checkpoints
exactly as without the scan. The blocks are stacked where the encoder runs (one copy of its
block weights per pass).

The release decides an encoder parameter's optimiser group from its own ViT names
(`blocks.3.attn.qkv.weight`, `cls_tokens.tokens`, ...): `refiner_name` gives that name for a
capi_jax parameter path of either backbone (for a CAPI encoder: its registers play the CLS
tokens' part, its patch embedding the ViT's).
"""

from collections.abc import Sequence
import dataclasses
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from capi_jax.models import encoder_decoder
from capi_jax.models import stack
from capi_jax.models import vit
from capi_jax.weights import vit as vit_weights

Array = jax.Array

CAPI = 'capi'
ENCODERS = (CAPI, *vit.FAMILIES)
POOLINGS = ('cls', 'avg')
MAIN_HEAD = 'main'
_BLOCK_HEAD = re.compile(r'cls(\d+)')


def head_block(name: str) -> int | None:
  """The block a head reads: None for 'main' (the final output), N for 'cls<N>'.

  Raises:
    ValueError: a name that is neither.
  """
  if name == MAIN_HEAD:
    return None
  match = _BLOCK_HEAD.fullmatch(name)
  if match is None:
    raise ValueError(f"Head name {name!r} is neither 'main' (final output) nor 'cls<N>' (the raw "
                     'output of block N, 0-indexed).')
  return int(match.group(1))


def build(config: ml_collections.ConfigDict) -> nn.Module:
  """The backbone `config.mim_refiner.encoder` names, from `config.mim_refiner.model` and
  `config.efficiency`."""
  cfg = config.mim_refiner
  model = (encoder_decoder.from_config(cfg.model, config.efficiency) if cfg.encoder == CAPI
           else vit.from_config(cfg.model, config.efficiency))
  if not model.scan_layers:
    return model
  per_block = nn.map_variables(
      type(model), 'params', trans_in_fn=stack.to_scan_layout, trans_out_fn=stack.to_loop_layout,
      mutable=True, methods=['__call__', 'encode'])
  return per_block(**{f.name: getattr(model, f.name) for f in dataclasses.fields(model)
                      if f.name not in ('parent', 'name')})


def depth(model: nn.Module) -> int:
  """Number of encoder blocks."""
  return model.encoder_depth if isinstance(model, encoder_decoder.EncoderDecoder) else model.depth


def n_prefix(model: nn.Module) -> int:
  """Tokens before the patches in `encode`'s outputs (class token or registers)."""
  return model.n_registers if isinstance(model, encoder_decoder.EncoderDecoder) else 1


def pool(tokens: Array, pooling: str, prefix: int) -> Array:
  """(batch, prefix + n, D) tokens -> (batch, D) by `pooling` (see the module docstring)."""
  if pooling == 'cls':
    return tokens[:, 0]
  return jnp.mean(tokens[:, prefix:].astype(jnp.float32), axis=1).astype(tokens.dtype)


def head_inputs(encoded: Sequence, heads: Sequence[str], pooling: str, prefix: int
                ) -> dict[str, Array]:
  """Each head's pooled features of all views, view-major.

  Args:
    encoded: `Encoded` outputs of the view groups in order (global views, then local views),
      each over (views * batch) images, view-major.
    heads: head names.
    pooling: 'cls' or 'avg'.
    prefix: prefix tokens of the backbone.

  Returns:
    {head: (n_views * batch, D)}.
  """
  out = {}
  for name in heads:
    block = head_block(name)
    out[name] = jnp.concatenate(
        [pool(e.tokens if block is None else e.blocks[block], pooling, prefix) for e in encoded])
  return out


class EvalEncoder(nn.Module):
  """The refined backbone as evaluations see it, with the backbone's own parameter tree.

  `apply({'params': backbone_params}, images (B, H, W, 3))` returns global_repr (B, D): the
  final output pooled as the heads pool it; registers (B, R, D) (R = 0 for a ViT); feature_map
  (B, H/p, W/p, D): the final patch tokens.
  """
  backbone: nn.Module
  pooling: str

  def setup(self):
    # The backbone's variables live at this module's root, not under 'backbone'.
    nn.share_scope(self, self.backbone)

  def __call__(self, images: Array) -> tuple[Array, Array, Array]:
    prefix = n_prefix(self.backbone)
    tokens = self.backbone.encode(images).tokens
    b, h, w, _ = images.shape
    p = self.backbone.patch_size
    registers = tokens[:, :prefix if self.has_registers else 0]
    return (pool(tokens, self.pooling, prefix), registers,
            tokens[:, prefix:].reshape(b, h // p, w // p, tokens.shape[-1]))

  def encode(self, images: Array, visible_indices: Array | None = None,
             blocks: Sequence[int] = (), train: bool = False):
    """The backbone's `encode` (final tokens and raw block outputs, `layers.Encoded`)."""
    return self.backbone.encode(images, visible_indices, blocks, train)

  @property
  def depth(self) -> int:
    return depth(self.backbone)

  @property
  def n_prefix(self) -> int:
    return n_prefix(self.backbone)

  @property
  def has_registers(self) -> bool:
    return isinstance(self.backbone, encoder_decoder.EncoderDecoder)

  @property
  def patch_size(self) -> int:
    return self.backbone.patch_size

  @property
  def embed_dim(self) -> int:
    return self.backbone.embed_dim


# ---------------------------------------------------------------------------- parameter names
def frozen(path: str, model: nn.Module) -> bool:
  """Whether the parameter at '/'-joined `path` is never trained (see the module docstring)."""
  top = path.split('/')[0]
  if isinstance(model, encoder_decoder.EncoderDecoder):
    return top in ('decoder', 'mask_token') or path.endswith('/rope/freqs')
  return top in model.frozen_params


def refiner_name(path: str, model: nn.Module) -> str:
  """The release's ViT name of a trained backbone parameter (for its optimiser group).

  'blocks_3/attn/qkv/kernel' -> 'blocks.3.attn.qkv.weight'; a CAPI encoder's
  'encoder/blocks_3/residual1/fn/q_proj/kernel' -> 'blocks.3.residual1.fn.q_proj.weight',
  'registers' -> 'cls_tokens.tokens', 'patch_embed/kernel' -> 'patch_embed.proj.weight'.
  """
  if isinstance(model, encoder_decoder.EncoderDecoder):
    path = re.sub(r'^encoder/', '', path)
    path = 'cls_token' if path == 'registers' else path
  return vit_weights.official_name(path, 'kappamodules')
