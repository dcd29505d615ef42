r"""CAPI's official checkpoints <-> capi_jax parameters (backbone, student head, clustering head).

Official names (facebookresearch/capi `state_dict`) map onto the capi_jax parameter tree by
`rules.dotted_rule`: `<x>blocks.<i>` <-> `<x>blocks_<i>`, `.` <-> `/`, linear / conv layouts,
RMSNorm `weight` <-> `scale`; student head `last_layer.weight_v (K, D)` / `weight_g (K, 1)` <->
`kernel_v (D, K)` / `kernel_g (1, K)`; clustering head `layer.weight (K, D)` / `layer.bias` <->
`kernel (D, K)` / `bias`. Transposes only: official -> capi_jax -> official is exact.

Official-format files hold a flat mapping with `backbone.<name>` (required), `head.<name>`
(student head, optional) and `teacher_head.<name>` (clustering head, optional). A full official
training checkpoint (`{'model': ...}` with `student.` / `student_ema.` / `teacher.` prefixes) is
read too: `source` picks the student or its EMA, and `teacher.head.` is the clustering head.
The architecture comes from `config.capi.model`, the number of clusters from `config.capi`; any
name or shape that does not fit is an error naming the parameter (never a silent skip).
"""

from collections.abc import Callable, Mapping
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from capi_jax.methods.capi import heads
from capi_jax.models import encoder_decoder
from capi_jax.weights import files
from capi_jax.weights import rules

Params = Any
StateDict = rules.StateDict

# File prefix of each part; part names are those of CAPI's params (`backbone`, `head`,
# `clustering_head`; the release calls the clustering head `teacher.head`).
PREFIXES = {'backbone': 'backbone.', 'head': 'head.', 'clustering_head': 'teacher_head.'}

_STUDENT_HEAD_NAMES = {'kernel_v': 'last_layer.weight_v', 'kernel_g': 'last_layer.weight_g'}

_CLUSTERING_HEAD_NAMES = {'kernel': 'layer.weight', 'bias': 'layer.bias'}


def _head_rule(names: Mapping[str, str]) -> Callable[[tuple[str, ...], int], rules.Rule]:
  def rule(path, ndim):
    return names[path[-1]], *((rules.linear_to_official,) * 2 if ndim == 2 else (rules.identity,) * 2)
  return rule

# ---------------------------------------------------------------------------- abstract trees
def backbone_shapes(config: ml_collections.ConfigDict) -> Params:
  """The capi_jax backbone parameter tree of `config` as ShapeDtypeStructs (no compute)."""
  model = encoder_decoder.from_config(config.capi.model, config.efficiency)
  p = config.capi.model.patch_size
  images = jax.ShapeDtypeStruct((1, p, p, 3), jnp.float32)
  return jax.eval_shape(model.init, jax.random.key(0), images)['params']


def student_head_shapes(embed_dim: int, num_clusters: int) -> Params:
  x = jax.ShapeDtypeStruct((1, embed_dim), jnp.float32)
  return jax.eval_shape(heads.L2NormLinear(num_clusters).init, jax.random.key(0), x)['params']


def clustering_head_shapes(embed_dim: int, num_clusters: int, use_bias: bool) -> Params:
  x = jax.ShapeDtypeStruct((1, embed_dim), jnp.float32)
  head = heads.ClusteringHead(num_clusters, use_bias=use_bias)
  return jax.eval_shape(head.init, jax.random.key(0), x)['params']


def backbone_to_flax(state_dict: Mapping[str, Any], config: ml_collections.ConfigDict) -> Params:
  """Official EncoderDecoder state_dict (no prefix) -> capi_jax backbone params (numpy)."""
  return rules.to_flax(state_dict, backbone_shapes(config), rules.dotted_rule, 'backbone')


def backbone_to_official(params: Params) -> StateDict:
  """capi_jax backbone params -> official EncoderDecoder state_dict names and layouts."""
  return rules.to_official(params, rules.dotted_rule)


def student_head_to_flax(state_dict: Mapping[str, Any], embed_dim: int,
                         num_clusters: int) -> Params:
  """Official L2NormLinear state_dict (`last_layer.weight_{v,g}`) -> capi_jax params."""
  return rules.to_flax(state_dict, student_head_shapes(embed_dim, num_clusters),
                 _head_rule(_STUDENT_HEAD_NAMES), 'student head')


def student_head_to_official(params: Params) -> StateDict:
  return rules.to_official(params, _head_rule(_STUDENT_HEAD_NAMES))


def clustering_head_to_flax(state_dict: Mapping[str, Any], embed_dim: int, num_clusters: int,
                            use_bias: bool = True) -> Params:
  """Official OnlineClustering state_dict (`layer.weight`, `layer.bias`) -> capi_jax params."""
  return rules.to_flax(state_dict, clustering_head_shapes(embed_dim, num_clusters, use_bias),
                 _head_rule(_CLUSTERING_HEAD_NAMES), 'clustering head')


def clustering_head_to_official(params: Params) -> StateDict:
  return rules.to_official(params, _head_rule(_CLUSTERING_HEAD_NAMES))


def _normalise_training_names(sd: StateDict, source: str) -> StateDict:
  """Maps a full official training state_dict (student./student_ema./teacher.) to file names."""
  if not any(k.startswith(('student.', 'student_ema.')) for k in sd):
    return sd
  if source not in ('student', 'student_ema'):
    raise ValueError(f"source must be 'student' or 'student_ema', got {source!r}.")
  out = {}
  for k, v in sd.items():
    if k.startswith(source + '.'):
      out[k[len(source) + 1:]] = v
    elif k.startswith('teacher.head.'):
      out[PREFIXES['clustering_head'] + k[len('teacher.head.'):]] = v
  return out


def _strip(sd: StateDict, prefix: str) -> StateDict:
  return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def load_official(path: str | os.PathLike[str], config: ml_collections.ConfigDict,
                  source: str = 'student') -> dict[str, Params]:
  """Loads an official-format checkpoint into capi_jax parameter trees.

  Args:
    path: `.pth` (needs PyTorch) or `.npz`, names as in the module docstring.
    config: gives the architecture (`config.capi.model`) and `config.capi.num_clusters`.
    source: for full official training checkpoints, 'student' or 'student_ema'.

  Returns:
    {'backbone': params} plus 'head' (student head) / 'clustering_head' params
    when the file has them.

  Raises:
    rules.CheckpointMismatchError: a name or shape does not fit the configured architecture.
  """
  return parts_from_state_dict(files.read_state_dict(path), config, source, str(path))


def parts_from_state_dict(state_dict: Mapping[str, Any], config: ml_collections.ConfigDict,
                          source: str = 'student', path: str = 'The checkpoint'
                          ) -> dict[str, Params]:
  """`load_official` of a file's tensors (`path`: the file's name, for messages)."""
  sd = _normalise_training_names(dict(state_dict), source)
  known = tuple(PREFIXES.values())
  unknown = sorted(k for k in sd if not k.startswith(known))
  if unknown:
    raise rules.CheckpointMismatchError(
        f'{path}: parameter(s) {unknown[:5]} have none of the prefixes {known}; '
        'is this an official CAPI checkpoint?')
  backbone_sd = _strip(sd, PREFIXES['backbone'])
  if not backbone_sd:
    raise rules.CheckpointMismatchError(f'{path}: no parameter named {PREFIXES["backbone"]}*.')
  parts = {'backbone': backbone_to_flax(backbone_sd, config)}
  dim, k = config.capi.model.embed_dim, config.capi.num_clusters
  head_sd = _strip(sd, PREFIXES['head'])
  if head_sd:
    parts['head'] = student_head_to_flax(head_sd, dim, k)
  clustering_sd = _strip(sd, PREFIXES['clustering_head'])
  if clustering_sd:
    parts['clustering_head'] = clustering_head_to_flax(
        clustering_sd, dim, k, use_bias=config.capi.clustering_kwargs.bias)
  return parts


def to_official_state_dict(parts: Mapping[str, Params]) -> StateDict:
  """{'backbone': ..., ['head'], ['clustering_head']} -> flat official-format names."""
  converters = {'backbone': backbone_to_official, 'head': student_head_to_official,
                'clustering_head': clustering_head_to_official}
  unknown = set(parts) - set(converters)
  if unknown:
    raise ValueError(f'Unknown parts {sorted(unknown)}; expected some of {sorted(converters)}.')
  sd = {}
  for part, params in parts.items():
    sd.update({PREFIXES[part] + k: v for k, v in converters[part](params).items()})
  return sd


def export_official(parts: Mapping[str, Params], path: str | os.PathLike[str]) -> None:
  """Writes capi_jax parameter trees under official names to `.npz`, or `.pth` (PyTorch)."""
  files.write_state_dict(to_official_state_dict(parts), path)


def check_restored_architecture(parts: Mapping[str, Params],
                                 config: ml_collections.ConfigDict) -> None:
  """Fails like `load_official` would if the capi_jax trees don't fit `config`."""
  sd = to_official_state_dict(parts)
  backbone_to_flax(_strip(sd, PREFIXES['backbone']), config)
  dim, k = config.capi.model.embed_dim, config.capi.num_clusters
  if 'head' in parts:
    student_head_to_flax(_strip(sd, PREFIXES['head']), dim, k)
  if 'clustering_head' in parts:
    clustering_head_to_flax(_strip(sd, PREFIXES['clustering_head']), dim, k,
                            use_bias=config.capi.clustering_kwargs.bias)


def parts_from_variables(variables: Any, source: str = 'student') -> dict[str, Params]:
  """{'backbone', 'head', 'clustering_head'} of a CAPI run's variables (`interface.Variables`).

  Args:
    variables: a restored CAPI TrainState's variables.
    source: 'student' or 'student_ema' (the EMA, whose backbone is the teacher's).
  """
  if source not in ('student', 'student_ema'):
    raise ValueError(f"source must be 'student' or 'student_ema', got {source!r}.")
  student = variables.params if source == 'student' else variables.buffers['ema']
  return jax.tree.map(np.asarray, {'backbone': student['backbone'], 'head': student['head'],
                                   'clustering_head': variables.params['clustering_head']})
