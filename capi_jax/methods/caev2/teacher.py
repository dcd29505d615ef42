"""CAE v2's frozen teacher: any capi_jax backbone, the release's being OpenAI CLIP's ViT.

`config.caev2.teacher`:
  backbone       the architecture and the official file format: a family of
                 `models/vit_weights.py` (the release: 'clip', OpenAI CLIP's visual tower with
                 `ln_post` on every token and the projection) whose `model` section holds
                 `vit.ViT` fields, or 'capi' (CAPI's EncoderDecoder; `model` is CAPI's
                 `config.capi.model` section).
  model          that architecture's config section. Its `activation` '' (the recipes'
                 default) leaves it to the checkpoint: the teacher is built with the family's
                 own (CLIP: OpenAI's QuickGELU) and the file must say so, as OpenAI's
                 TorchScript archives do (their QuickGELU modules); an archive of torch's GELU
                 is refused naming =gelu, and a state dict or converted directory, which does
                 not say it, unless the key is set ('quick_gelu': OpenAI's; 'gelu': open_clip /
                 LAION's, under the same weight names); a set value the archive contradicts is
                 refused too (`vit_weights.check_activation`).
  checkpoint     the weights (`Method.pretrained_paths` role 'teacher'): an official file of
                 the ViT family (CLIP's TorchScript `ViT-B-16.pt` or a state_dict, names under
                 `vit_weights.OFFICIAL_PREFIXES[backbone]`), the output directory of
                 `python -m capi_jax.convert`, or a capi_jax training run of any method whose
                 evaluation backbone is this architecture (e.g. the quickstart's CAPI run).
  image_size     the teacher view's side (`--second_input_size`).
  normalization  the teacher view's statistics: 'clip' (the release) or 'imagenet' (a
                 capi_jax backbone trained on ImageNet-normalised images).

Targets come from the backbone's evaluation forward (`Method.eval_model`'s interface):
[global_repr, feature_map patches], (batch, 1 + N, C). For CLIP that is `ln_post` then the
projection on the class token and on every patch, exactly the release's teacher. A backbone
without a class token gives its own global representation as the class target (CAPI: the mean
over positions of its predictor's first block, the feature its evaluations use). C is the
backbone's output width (`out_dim`): the student's decoder head is built to match it.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from capi_jax.base import interface
from capi_jax.models import encoder_decoder
from capi_jax.models import vit
from capi_jax.weights import rules
from capi_jax.weights import vit as vit_weights

PyTree = Any
CAPI = 'capi'
BACKBONES = (CAPI, *vit_weights.FAMILIES)
ACTIVATION_KEY = 'caev2.teacher.model.activation'


def from_config(config: ml_collections.ConfigDict) -> nn.Module:
  """The teacher backbone of `config.caev2.teacher`, in the run's compute dtype."""
  t = config.caev2.teacher
  if t.backbone == CAPI:
    return encoder_decoder.from_config(t.model, config.efficiency)
  if t.backbone not in BACKBONES:
    raise ValueError(f'caev2.teacher.backbone={t.backbone!r} must be one of {BACKBONES}.')
  return vit.from_config(t.model, config.efficiency, activation=vit_weights.built_activation(
      t.model.get('activation', vit_weights.FROM_FILE), t.backbone))


def out_dim(teacher: ml_collections.ConfigDict) -> int:
  """C, the width of the teacher's features (`config.caev2.teacher`)."""
  m = teacher.model
  return m.embed_dim if teacher.backbone == CAPI else (m.get('out_dim', 0) or m.embed_dim)


def features(module: nn.Module, params: PyTree, images: jax.Array) -> jax.Array:
  """The teacher's features without gradient, float32 (batch, 1 + N, C) in the natural order
  [global / class, patches row-major].

  Args:
    module: the teacher (`from_config`).
    params: its frozen params.
    images: (batch, H_t, W_t, 3) the teacher view.
  """
  global_repr, _, feature_map = module.apply({'params': params}, images)
  b, c = global_repr.shape
  tokens = jnp.concatenate([global_repr[:, None], feature_map.reshape(b, -1, c)], axis=1)
  return jax.lax.stop_gradient(tokens.astype(jnp.float32))


def _flat(tree: PyTree) -> dict[str, np.ndarray]:
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {'/'.join(k.key for k in path): np.asarray(v) for path, v in leaves}


def _by_path(path: tuple[str, ...], ndim: int) -> rules.Rule:
  del ndim
  return '/'.join(path), rules.identity, rules.identity


def load(pretrained: interface.Pretrained, expected: PyTree, config: ml_collections.ConfigDict,
         module: nn.Module) -> PyTree:
  """The teacher's params from its checkpoint, in the dtypes of `expected`.

  Args:
    pretrained: the 'teacher' checkpoint as `engine.pretrained.load` read it.
    expected: the teacher's params tree (arrays or ShapeDtypeStructs), as `init` makes it.
    config: the run's config (`config.caev2.teacher`).
    module: the teacher (`from_config(config)`).

  Raises:
    ActivationMismatchError: a ViT's file that does not say its activation while the config
      leaves it to the file, or that says another than the config's.
    CheckpointMismatchError: a name or shape does not fit `caev2.teacher.model`.
    ValueError: an official file for the 'capi' backbone, which is converted beforehand.
  """
  t = config.caev2.teacher
  fix = (f'set caev2.teacher.backbone / caev2.teacher.model to the architecture of '
         f'{t.checkpoint}')
  if t.backbone != CAPI:
    vit_weights.check_activation(
        pretrained.state_dict, module, t.model.get('activation', vit_weights.FROM_FILE),
        ACTIVATION_KEY, f'caev2.teacher.checkpoint={t.checkpoint}',
        vit_weights.OFFICIAL_PREFIXES[t.backbone])
  if pretrained.state_dict is None:
    params = rules.to_flax(_flat(pretrained.backbone), expected, _by_path,
                             f'teacher ({t.backbone})', fix=fix)
  elif t.backbone == CAPI:
    raise ValueError(f'caev2.teacher.checkpoint={t.checkpoint} is an official file; convert it '
                     'first (python -m capi_jax.convert --to=capi_jax) and pass the output '
                     'directory.')
  else:
    params = vit_weights.official_to_params(pretrained.state_dict, module, t.backbone,
                                            prefix=vit_weights.OFFICIAL_PREFIXES[t.backbone])
  # CLIP's release stores its linear weights in float16; the cast to float32 is exact.
  return jax.tree.map(lambda p, e: np.asarray(p, e.dtype), params, expected)
