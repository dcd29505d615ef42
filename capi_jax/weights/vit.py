r"""Official ViT checkpoints <-> `vit.ViT` parameters, per family, bit for bit.

A capi_jax leaf path gives a canonical name (`blocks_3/attn/qkv/kernel` ->
`blocks.3.attn.qkv.weight`; `kernel` and LayerNorm `scale` -> `weight`), which each family renames
to its official names (`official_name`):
  kappamodules, data2vec2  `patch_embed.proj.*`, `cls_tokens.tokens` (1, 1, D),
                           `pos_embed.embed` (1, h, w, D), `embed_norm.*` (data2vec2), `norm.*`
                           (kappamodules), `blocks.{i}.{norm1, attn.qkv, attn.proj, norm2,
                           mlp.fc1, mlp.fc2}.*`: MIM-Refiner's `vit.vit` / `vit.data2vec2_vit`
                           (and its hub Prenorm/PostnormVit), i.e. data2vec 2.0 as MIM-Refiner
                           holds it after renaming fairseq's `modality_encoders.IMAGE.*`;
  mae                      timm names (MAE, dBOT, CrossMAE): `patch_embed.proj.*`, `cls_token`,
                           `pos_embed` (1, 1+N, D), `blocks.{i}...` as above, `norm.*`;
  caev2                    as mae with `blocks.{i}.attn.{q_bias, v_bias}` (no qkv bias tensor)
                           and `blocks.{i}.gamma_{1,2}` (CAE v2 names them under `encoder.`);
                           mae and caev2: `blocks.{i}.attn.relative_position_bias_table` with
                           `rel_pos_bias` (BEiT / CAE v2 fine-tuning; the
                           `relative_position_index` buffer is not a parameter: drop it);
  clip                     OpenAI CLIP's visual tower (under `visual.`): `conv1.weight`,
                           `class_embedding` (W,), `positional_embedding` (1+N, W), `ln_pre`,
                           `transformer.resblocks.{i}.{ln_1, attn.in_proj_weight,
                           attn.in_proj_bias, attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj}`,
                           `ln_post`, `proj` (W, C) (used as x @ proj: no transpose).
Layouts: linear (out, in) <-> kernel (in, out); conv (out, in, kh, kw) <-> (kh, kw, in, out); the
position table and class token are reshaped. No arithmetic and no dtype change: official ->
capi_jax -> official is exact (CLIP's fp16 tensors stay fp16; cast them for a float32 model).
Every missing or unexpected name and every wrong shape is a `rules.CheckpointMismatchError`
naming the parameter with its expected and found shapes.

  model = vit.ViT(**vit.FAMILIES['clip'], ...)
  params = vit_weights.official_to_params(files.read_state_dict('ViT-B-16.pt'), model,
                                          'clip', prefix='visual.')
  state_dict = vit_weights.params_to_official(params, 'clip', prefix='visual.')
"""

from collections.abc import Callable, Mapping
import math
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from capi_jax.base import errors
from capi_jax.models import vit
from capi_jax.weights import rules

Params = Any

# (pattern, replacement) on canonical names, applied in order; families are vit.FAMILIES' keys.
_KAPPAMODULES_NAMES = ((r'^patch_embed\.', 'patch_embed.proj.'),
                       (r'^cls_token$', 'cls_tokens.tokens'), (r'^pos_embed$', 'pos_embed.embed'))
# BEiT's relative position table sits in the attention module there, in the block here.
_TIMM_NAMES = ((r'^patch_embed\.', 'patch_embed.proj.'),
               (r'^(blocks\.\d+)\.relative_position_bias_table$',
                r'\1.attn.relative_position_bias_table'))
_NAMES: dict[str, tuple[tuple[str, str], ...]] = {
    'kappamodules': _KAPPAMODULES_NAMES,
    'data2vec2': _KAPPAMODULES_NAMES,
    'mae': _TIMM_NAMES,
    'caev2': _TIMM_NAMES,
    'clip': ((r'^patch_embed\.', 'conv1.'), (r'^cls_token$', 'class_embedding'),
             (r'^pos_embed$', 'positional_embedding'), (r'^embed_norm\.', 'ln_pre.'),
             (r'^norm\.', 'ln_post.'), (r'^proj\.weight$', 'proj'),
             (r'^blocks\.', 'transformer.resblocks.'), (r'\.norm1\.', '.ln_1.'),
             (r'\.norm2\.', '.ln_2.'), (r'\.attn\.qkv\.(weight|bias)$', r'.attn.in_proj_\1'),
             (r'\.attn\.proj\.', '.attn.out_proj.'), (r'\.mlp\.fc1\.', '.mlp.c_fc.'),
             (r'\.mlp\.fc2\.', '.mlp.c_proj.')),
}
FAMILIES = tuple(_NAMES)
# Where a release's files hold the ViT: OpenAI CLIP's `.pt` holds the visual tower under
# `visual.` (beside the text tower), a CAE v2 pretraining checkpoint its encoder under
# `encoder.`; the other families' files hold the ViT alone.
OFFICIAL_PREFIXES = {family: {'clip': 'visual.', 'caev2': 'encoder.'}.get(family, '')
                     for family in FAMILIES}

_Layout = Callable[[np.ndarray], np.ndarray]

# ---------------------------------------------------------------------------- MLP activation
# The weights do not say which activation a ViT's MLPs apply, and one family's names may mean
# two: OpenAI's CLIP models apply QuickGELU (its clip/model.py; open_clip builds them with
# `quick_gelu=True`, "OpenAI models were trained with QuickGELU"), open_clip / LAION's ViT-B-16,
# ViT-L-14... torch's GELU (their `-quickgelu` variants QuickGELU), under the same state_dict
# names. Only a TorchScript archive records it: its modules' classes (`files.ArchiveStateDict`;
# OpenAI's traced releases hold `multimodal.model.multimodal_transformer.QuickGELU` modules at
# `visual.transformer.resblocks.{i}.mlp.gelu`). A config section read from a checkpoint may
# leave `activation` to the file (FROM_FILE); the model is then built with the family's own
# (`built_activation`) and the file must confirm it (`check_activation`).
FROM_FILE = ''  # A section's `activation` that the checkpoint's file is to say.
_ACTIVATION_NAMES = {'quick_gelu': 'QuickGELU', 'gelu': "torch's GELU"}


class ActivationMismatchError(errors.UserError, ValueError):
  """A checkpoint's MLP activation is not known, or is not the one its model is built with."""


def built_activation(configured: str, family: str) -> str:
  """The activation a ViT of `family` is built with: `configured`, or when it is FROM_FILE the
  family's own (`vit.FAMILIES`), which `check_activation` holds the file to."""
  return configured or vit.FAMILIES[family]['activation']


def file_activation(state_dict: Mapping[str, Any] | None, prefix: str = '') -> str | None:
  """The activation the modules under `prefix` of a TorchScript archive apply ('quick_gelu' or
  'gelu'); None where the file cannot tell (a plain state dict, a params directory, an archive
  with neither class or both)."""
  found = set()
  for path, name in (getattr(state_dict, 'module_classes', None) or {}).items():
    if not f'{path}.'.startswith(prefix):
      continue
    if name.rsplit('.', 1)[-1] == 'QuickGELU':  # OpenAI's (clip/model.py), open_clip's: same.
      found.add('quick_gelu')
    elif name == 'torch.nn.modules.activation.GELU':
      found.add('gelu')
  return found.pop() if len(found) == 1 else None


def check_activation(state_dict: Mapping[str, Any] | None, model: vit.ViT, configured: str,
                     key: str, source: str, prefix: str = '', required: bool = True) -> None:
  """Refuses a checkpoint whose activation is not `model`'s or, when `configured` leaves it to
  the file (FROM_FILE) and `required`, cannot be known from the file.

  Args:
    state_dict: the file as `files.read_state_dict` read it (None: a params directory or run).
    model: the ViT it is loaded into (built with `built_activation(configured, ...)`).
    configured: the config's value at `key`.
    key: the config key, e.g. 'caev2.teacher.model.activation'.
    source: the checkpoint, for the message.
    prefix: where the ViT's modules are (e.g. 'visual.').
    required: refuse an unknown activation with `configured` FROM_FILE (False where the
      activation is not used, e.g. a conversion).

  Raises:
    ActivationMismatchError: one line naming `key` and the value(s) to set.
  """
  found = file_activation(state_dict, prefix)
  if found is not None and found != model.activation:
    built = (f'{key}={configured}' if configured
             else f"{key}='' (the file's) builds {model.activation}")
    raise ActivationMismatchError(
        f'{source}: its modules apply {_ACTIVATION_NAMES[found]}, but {built}: set '
        f'--config.{key}={found}.')
  if found is None and configured == FROM_FILE and required:
    raise ActivationMismatchError(
        f'{source}: a CLIP state dict does not say its activation (OpenAI\'s QuickGELU or '
        f'open_clip / LAION\'s GELU; only a TorchScript archive such as OpenAI\'s ViT-B-16.pt '
        f'does): set --config.{key}=quick_gelu or =gelu.')


def _grid_table_to_official(x: np.ndarray) -> np.ndarray:
  """(1, N, D) -> kappamodules' (1, h, w, D) buffer (square grid, no class row)."""
  side = math.isqrt(x.shape[1])
  if side * side != x.shape[1]:
    raise ValueError(f'A (1, h, w, D) position table needs a square patch grid without a class '
                     f'row; got {x.shape[1]} rows (set class_pos_embed=False).')
  return x.reshape(1, side, side, x.shape[2])


def _grid_table_to_flax(x: np.ndarray) -> np.ndarray:
  return x.reshape(1, -1, x.shape[-1])


def _check_family(family: str) -> None:
  if family not in _NAMES:
    raise ValueError(f'Unknown ViT family {family!r}; expected one of {FAMILIES}.')


def official_name(path: str, family: str) -> str:
  """The official name of a `vit.ViT` parameter, e.g. for optimiser groups by official name.

  Args:
    path: '/'-joined leaf path in the params tree, e.g. 'blocks_3/attn/qkv/kernel'.
    family: one of FAMILIES.

  Returns:
    e.g. 'blocks.3.attn.qkv.weight' (kappamodules, data2vec2, mae, caev2) or
    'transformer.resblocks.3.attn.in_proj_weight' (clip).
  """
  _check_family(family)
  parts = [re.sub(r'^blocks_(\d+)$', r'blocks.\1', p) for p in path.split('/')]
  if parts[-1] in ('kernel', 'scale'):
    parts[-1] = 'weight'
  name = '.'.join(parts)
  for pattern, replacement in _NAMES[family]:
    name = re.sub(pattern, replacement, name)
  return name


def _rule(family: str, prefix: str) -> Callable[[tuple[str, ...], int], rules.Rule]:
  """(leaf path, ndim) -> (official name, to_official, to_flax) for `family`."""
  _check_family(family)

  def rule(path: tuple[str, ...], ndim: int) -> rules.Rule:
    name = official_name('/'.join(path), family)
    layouts: tuple[_Layout, _Layout] = (rules.identity, rules.identity)
    if path[-1] == 'kernel' and ndim == 4:
      layouts = (rules.conv_to_official, rules.conv_to_flax)
    elif path[-1] == 'kernel' and not (family == 'clip' and path == ('proj', 'kernel')):
      layouts = (rules.linear_to_official, rules.linear_to_official)
    elif path == ('pos_embed',) and family in ('kappamodules', 'data2vec2'):
      layouts = (_grid_table_to_official, _grid_table_to_flax)
    elif path == ('pos_embed',) and family == 'clip':  # (1, 1+N, W) <-> (1+N, W)
      layouts = (lambda x: x[0], lambda x: x[None])
    elif path == ('cls_token',) and family == 'clip':  # (1, 1, W) <-> (W,)
      layouts = (lambda x: x[0, 0], lambda x: x[None, None])
    return prefix + name, *layouts

  return rule


def param_shapes(model: vit.ViT) -> Params:
  """`model`'s parameter tree as ShapeDtypeStructs (no compute)."""
  images = jax.ShapeDtypeStruct((1, model.image_size, model.image_size, 3), jnp.float32)
  return jax.eval_shape(model.init, jax.random.key(0), images)['params']


def official_to_params(state_dict: Mapping[str, Any], model: vit.ViT, family: str,
                       prefix: str = '') -> Params:
  """Official `family` state_dict -> `model`'s params (numpy, dtypes as stored).

  Args:
    state_dict: official names and PyTorch layouts (e.g. `files.read_state_dict(path)`).
    model: the ViT to fill (its fields must describe the checkpoint's architecture).
    family: one of FAMILIES (naming convention).
    prefix: only names starting with it are read (e.g. 'encoder.' for a CAE v2 checkpoint,
      'visual.' for CLIP); every one of those must be a parameter of `model`.

  Raises:
    CheckpointMismatchError: a name is missing or unexpected, or a shape differs.
  """
  selected = {k: v for k, v in state_dict.items() if k.startswith(prefix)}
  if not selected:
    raise rules.CheckpointMismatchError(
        f'No parameter named {prefix}* in the checkpoint (found e.g. {sorted(state_dict)[:5]}).')
  return rules.to_flax(
      selected, param_shapes(model), _rule(family, prefix), f'{family} ViT',
      fix='check the ViT fields (sizes, family options) against the checkpoint')


def params_to_official(params: Params, family: str, prefix: str = '') -> rules.StateDict:
  """`vit.ViT` params -> official `family` names (each prefixed by `prefix`) and layouts."""
  return rules.to_official(params, _rule(family, prefix))
