r"""Official PyTorch CAPI checkpoints <-> capi_jax parameters, both directions, bit for bit.

Official names (facebookresearch/capi `state_dict`) map onto the capi_jax parameter tree by rule:
`<x>blocks.<i>` <-> `<x>blocks_<i>`, `.` <-> `/`, linear `weight (out, in)` <-> `kernel (in, out)`,
conv `weight (out, in, kh, kw)` <-> `kernel (kh, kw, in, out)`, RMSNorm `weight` <-> `scale`;
student head `last_layer.weight_v (K, D)` / `weight_g (K, 1)` <-> `kernel_v (D, K)` /
`kernel_g (1, K)`; clustering head `layer.weight (K, D)` / `layer.bias` <-> `kernel (D, K)` /
`bias`.
Transposes only: no arithmetic touches the values, so official -> capi_jax -> official is exact.

Official-format files (`.pth`, or `.npz` with the same names) hold a flat mapping with
`backbone.<name>` (required), `head.<name>` (student head, optional) and `teacher_head.<name>`
(clustering head, optional). A full official training checkpoint (`{'model': ..., ...}` with
`student.` / `student_ema.` / `teacher.` prefixes) is read too: `--source` picks the student or
its EMA, and `teacher.head.` is the clustering head. Reading `.pth` needs PyTorch (the
`capi_jax[torch]` extra); `.npz` does not.

Run:
  # official -> capi_jax: writes OUT/params, an Orbax StandardCheckpointer checkpoint of
  # {'backbone': ..., ['head': ...], ['clustering_head': ...]} (capi_jax parameter trees).
  python -m capi_jax.convert --config=configs/vitl.py --to=capi_jax \
      --input=capi_vitl14_lvd.pth --output=/tmp/capi_vitl14_lvd
  # capi_jax -> official names (.npz, or .pth when PyTorch is installed).
  python -m capi_jax.convert --config=configs/vitl.py --to=official \
      --input=/tmp/capi_vitl14_lvd/params --output=/tmp/capi_vitl14_lvd.npz
  # A capi_jax training checkpoint (a step folder; --source=student_ema for the EMA) -> official.
  python -m capi_jax.convert --config=configs/tiny.py --to=official --source=student_ema \
      --input=/tmp/capi_tiny/checkpoints/1500 --output=/tmp/capi_tiny_ema.pth

The architecture comes from `config.model`, the number of clusters from `config.capi`; any name
or shape that does not fit it is an error naming the parameter (never a silent skip), and so is
a weight that is not floating point or holds NaN/inf. A file that cannot be read (truncated, not
a checkpoint) is an error naming the file.

ViT families (`models/vit_convert.py`) convert with `--family`, the ViT's fields read from the
config section `--section`, e.g. OpenAI CLIP's ViT-B/16 (CAE v2's teacher) and back:
  python -m capi_jax.convert --config=configs/caev2/base.py --family=clip \
      --section=caev2.teacher.model --to=capi_jax --input=ViT-B-16.pt --output=/tmp/clip_b16
  python -m capi_jax.convert --config=configs/caev2/base.py --family=clip \
      --section=caev2.teacher.model --to=official --input=/tmp/clip_b16 --output=/tmp/clip.pth
The official side holds the ViT under `vit_convert.OFFICIAL_PREFIXES[family]` (CLIP: `visual.`;
the rest of OpenAI's file, the text tower, is not read); the capi_jax side is a params
directory with the ViT as 'backbone' (also a capi_jax training run: its evaluation backbone).
"""

from collections.abc import Callable, Mapping
import os
import pathlib
import pickle
import re
from typing import Any
import zipfile

import jax
import jax.numpy as jnp
import ml_collections
import ml_dtypes
import numpy as np

from capi_jax.core import cli
from capi_jax.methods.capi import heads
from capi_jax.models import encoder_decoder

Params = Any
StateDict = dict[str, np.ndarray]

# File prefix of each part; part names are those of CAPI's params (`backbone`, `head`,
# `clustering_head`; the release calls the clustering head `teacher.head`).
PREFIXES = {'backbone': 'backbone.', 'head': 'head.', 'clustering_head': 'teacher_head.'}


_MAX_PROBLEMS_SHOWN = 30


class CheckpointMismatchError(cli.UserError, ValueError):
  """An official checkpoint does not fit the architecture it is loaded into."""


class UnreadableCheckpointError(cli.UserError, ValueError):
  """A checkpoint file cannot be read (truncated, damaged, or not a checkpoint)."""


# ---------------------------------------------------------------------------- leaf layouts
def linear_to_official(x: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(x.T)


def conv_to_official(x: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(x.transpose(3, 2, 0, 1))  # (kh, kw, in, out) -> (out, in, kh, kw)


def conv_to_flax(x: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(x.transpose(2, 3, 1, 0))  # (out, in, kh, kw) -> (kh, kw, in, out)


def identity(x: np.ndarray) -> np.ndarray:
  return x


# (official name, to_official, to_flax) for one capi_jax leaf path.
Rule = tuple[str, Callable[[np.ndarray], np.ndarray], Callable[[np.ndarray], np.ndarray]]


def dotted_rule(path: tuple[str, ...], ndim: int) -> Rule:
  """The naming of modules written after their official counterparts (CAPI's backbone, CAE v2's
  regressor): `<x>blocks_<i>` <-> `<x>blocks.<i>`, `/` <-> `.`, conv / linear `kernel` and norm
  `scale` <-> `weight`, with the layouts above."""
  parts = [re.sub(r'^(\w*blocks)_(\d+)$', r'\1.\2', p) for p in path]
  leaf = parts[-1]
  if leaf == 'kernel' and ndim == 4:
    return '.'.join(parts[:-1] + ['weight']), conv_to_official, conv_to_flax
  if leaf == 'kernel':
    return '.'.join(parts[:-1] + ['weight']), linear_to_official, linear_to_official
  if leaf == 'scale':
    return '.'.join(parts[:-1] + ['weight']), identity, identity
  return '.'.join(parts), identity, identity


_STUDENT_HEAD_NAMES = {'kernel_v': 'last_layer.weight_v', 'kernel_g': 'last_layer.weight_g'}
_CLUSTERING_HEAD_NAMES = {'kernel': 'layer.weight', 'bias': 'layer.bias'}


def _head_rule(names: Mapping[str, str]) -> Callable[[tuple[str, ...], int], Rule]:
  def rule(path, ndim):
    return names[path[-1]], *((linear_to_official,) * 2 if ndim == 2 else (identity,) * 2)
  return rule


# ---------------------------------------------------------------------------- abstract trees
def backbone_shapes(config: ml_collections.ConfigDict) -> Params:
  """The capi_jax backbone parameter tree of `config` as ShapeDtypeStructs (no compute)."""
  model = encoder_decoder.from_config(config)
  p = config.model.patch_size
  images = jax.ShapeDtypeStruct((1, p, p, 3), jnp.float32)
  return jax.eval_shape(model.init, jax.random.key(0), images)['params']


def student_head_shapes(embed_dim: int, num_clusters: int) -> Params:
  x = jax.ShapeDtypeStruct((1, embed_dim), jnp.float32)
  return jax.eval_shape(heads.L2NormLinear(num_clusters).init, jax.random.key(0), x)['params']


def clustering_head_shapes(embed_dim: int, num_clusters: int, use_bias: bool) -> Params:
  x = jax.ShapeDtypeStruct((1, embed_dim), jnp.float32)
  head = heads.ClusteringHead(num_clusters, use_bias=use_bias)
  return jax.eval_shape(head.init, jax.random.key(0), x)['params']


def _path_keys(path) -> tuple[str, ...]:
  return tuple(k.key for k in path)


# ---------------------------------------------------------------------------- conversion
def to_official(params: Params, rule_fn: Callable[[tuple[str, ...], int], Rule]) -> StateDict:
  """capi_jax params -> {official name: array}, each leaf laid out by `rule_fn(path, ndim)`."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    leaf = np.asarray(leaf)
    name, leaf_to_official, _ = rule_fn(_path_keys(path), leaf.ndim)
    out[name] = leaf_to_official(leaf)
  return out


def _value_problem(value: np.ndarray) -> str | None:
  """Why `value` cannot be a weight (not floating point, or NaN/inf), or None."""
  if not jnp.issubdtype(value.dtype, jnp.floating):
    return f'dtype {value.dtype}, expected a floating-point dtype'
  bad = int(value.size - np.count_nonzero(np.isfinite(value.astype(np.float32))))
  if bad:
    return f'{bad} of its {value.size} values are NaN or inf'
  return None


def to_flax(state_dict: Mapping[str, Any], expected: Params,
            rule_fn: Callable[[tuple[str, ...], int], Rule], what: str,
            fix: str = 'check config.model / config.capi against the checkpoint') -> Params:
  """Converts `state_dict` into the structure of `expected`, checking every name and shape.

  Args:
    state_dict: {official name: array}.
    expected: the capi_jax parameter tree (arrays or ShapeDtypeStructs) to fill.
    rule_fn: (leaf path, ndim) -> (official name, to_official, to_flax) layouts.
    what: names the checkpoint in errors.
    fix: what the error tells the user to do.

  Raises:
    CheckpointMismatchError: listing every missing, unexpected, misshaped, non-float or
      non-finite parameter.
  """
  leaves, treedef = jax.tree_util.tree_flatten_with_path(expected)
  problems, converted = [], []
  expected_names = set()
  for path, spec in leaves:
    name, leaf_to_official, leaf_to_flax = rule_fn(_path_keys(path), len(spec.shape))
    expected_names.add(name)
    official_shape = leaf_to_official(np.empty(spec.shape, np.int8)).shape
    if name not in state_dict:
      problems.append(f'missing parameter {name!r}: expected shape {official_shape}, found none')
      continue
    value = np.asarray(state_dict[name])
    if value.shape != official_shape:
      problems.append(f'parameter {name!r}: expected shape {official_shape}, found {value.shape}')
      continue
    problem = _value_problem(value)
    if problem:
      problems.append(f'parameter {name!r}: {problem}')
      continue
    converted.append(leaf_to_flax(value))
  for name in sorted(set(state_dict) - expected_names):
    problems.append(f'unexpected parameter {name!r} (shape {np.shape(state_dict[name])}): '
                    'not part of this architecture')
  if problems:
    shown = problems[:_MAX_PROBLEMS_SHOWN]
    if len(problems) > len(shown):
      shown.append(f'... and {len(problems) - len(shown)} more')
    raise CheckpointMismatchError(
        f'The {what} checkpoint does not fit the configured architecture '
        f'({len(problems)} problem(s)); {fix}:\n  ' + '\n  '.join(shown))
  return jax.tree_util.tree_unflatten(treedef, converted)


def backbone_to_flax(state_dict: Mapping[str, Any], config: ml_collections.ConfigDict) -> Params:
  """Official EncoderDecoder state_dict (no prefix) -> capi_jax backbone params (numpy)."""
  return to_flax(state_dict, backbone_shapes(config), dotted_rule, 'backbone')


def backbone_to_official(params: Params) -> StateDict:
  """capi_jax backbone params -> official EncoderDecoder state_dict names and layouts."""
  return to_official(params, dotted_rule)


def student_head_to_flax(state_dict: Mapping[str, Any], embed_dim: int,
                         num_clusters: int) -> Params:
  """Official L2NormLinear state_dict (`last_layer.weight_{v,g}`) -> capi_jax params."""
  return to_flax(state_dict, student_head_shapes(embed_dim, num_clusters),
                 _head_rule(_STUDENT_HEAD_NAMES), 'student head')


def student_head_to_official(params: Params) -> StateDict:
  return to_official(params, _head_rule(_STUDENT_HEAD_NAMES))


def clustering_head_to_flax(state_dict: Mapping[str, Any], embed_dim: int, num_clusters: int,
                            use_bias: bool = True) -> Params:
  """Official OnlineClustering state_dict (`layer.weight`, `layer.bias`) -> capi_jax params."""
  return to_flax(state_dict, clustering_head_shapes(embed_dim, num_clusters, use_bias),
                 _head_rule(_CLUSTERING_HEAD_NAMES), 'clustering head')


def clustering_head_to_official(params: Params) -> StateDict:
  return to_official(params, _head_rule(_CLUSTERING_HEAD_NAMES))


# ---------------------------------------------------------------------------- files
def _import_torch():
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError('Reading or writing .pth needs PyTorch: pip install "capi_jax[torch]", '
                      'or use .npz files with the same names.') from e
  return torch


def _torch_to_numpy(torch, tensor) -> np.ndarray:
  """Exact copy; bfloat16 (unknown to numpy) goes through its bits into ml_dtypes.bfloat16."""
  tensor = tensor.detach().cpu()
  if tensor.dtype == torch.bfloat16:
    return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
  return tensor.numpy()


def _numpy_to_torch(torch, array: np.ndarray):
  array = np.ascontiguousarray(array)
  if array.dtype == ml_dtypes.bfloat16:
    return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
  return torch.from_numpy(array)


def _is_torchscript(path: pathlib.Path) -> bool:
  """A TorchScript archive (e.g. OpenAI's CLIP `.pt`): a zip with `<root>/constants.pkl`."""
  if not zipfile.is_zipfile(path):
    return False
  with zipfile.ZipFile(path) as archive:
    return any(name.endswith('/constants.pkl') for name in archive.namelist())


def read_state_dict(path: str | os.PathLike[str]) -> StateDict:
  """Reads an official-format checkpoint into a flat {name: array} mapping.

  `.npz`; or `.pth` / `.pt` / `.th` (needs PyTorch): a state_dict, one wrapped in 'model' (an
  official training checkpoint) or 'state_dict' (MIM-Refiner), or a TorchScript archive (OpenAI
  CLIP), whose module's `state_dict()` is read.

  Raises:
    UnreadableCheckpointError: the file is missing, truncated, or not a checkpoint.
  """
  path = pathlib.Path(path)
  if path.suffix not in ('.npz', '.pth', '.pt', '.th'):
    raise UnreadableCheckpointError(f'Unknown checkpoint format {path.suffix!r} for {path}: use '
                                    '.pth or .npz.')
  if not path.is_file():
    raise UnreadableCheckpointError(f'{path} does not exist or is not a file.')
  torch = _import_torch() if path.suffix != '.npz' else None
  try:
    if torch is None:
      with np.load(path) as f:
        return {k: f[k] for k in f.files}
    if _is_torchscript(path):
      sd = torch.jit.load(path, map_location='cpu').state_dict()
    else:
      sd = torch.load(path, map_location='cpu', weights_only=True)
  except (OSError, EOFError, ValueError, RuntimeError, zipfile.BadZipFile,
          pickle.UnpicklingError) as e:
    raise UnreadableCheckpointError(
        f'Cannot read {path} ({type(e).__name__}: {str(e).strip()[:200]}): it is truncated, '
        f'damaged, or not a {path.suffix} checkpoint.') from e
  if not isinstance(sd, Mapping):
    raise UnreadableCheckpointError(f'{path} holds a {type(sd).__name__}, not a state_dict.')
  for wrapper in ('model', 'state_dict'):
    if wrapper in sd and isinstance(sd[wrapper], Mapping):
      sd = sd[wrapper]  # A training checkpoint (with optimizer states, constructor kwargs...).
  return {k: _torch_to_numpy(torch, v) for k, v in sd.items() if isinstance(v, torch.Tensor)}


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
    config: gives the architecture (`config.model`) and `config.capi.num_clusters`.
    source: for full official training checkpoints, 'student' or 'student_ema'.

  Returns:
    {'backbone': params} plus 'head' (student head) / 'clustering_head' params
    when the file has them.

  Raises:
    CheckpointMismatchError: a name or shape does not fit the configured architecture.
  """
  sd = _normalise_training_names(read_state_dict(path), source)
  known = tuple(PREFIXES.values())
  unknown = sorted(k for k in sd if not k.startswith(known))
  if unknown:
    raise CheckpointMismatchError(
        f'{path}: parameter(s) {unknown[:5]} have none of the prefixes {known}; '
        'is this an official CAPI checkpoint?')
  backbone_sd = _strip(sd, PREFIXES['backbone'])
  if not backbone_sd:
    raise CheckpointMismatchError(f'{path}: no parameter named {PREFIXES["backbone"]}*.')
  parts = {'backbone': backbone_to_flax(backbone_sd, config)}
  dim, k = config.model.embed_dim, config.capi.num_clusters
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
  write_state_dict(to_official_state_dict(parts), path)


def write_state_dict(sd: Mapping[str, np.ndarray], path: str | os.PathLike[str]) -> None:
  """Writes {official name: array} to `.npz`, or `.pth` / `.pt` (PyTorch)."""
  path = pathlib.Path(path)
  if path.suffix == '.npz':
    np.savez(path, **sd)
  elif path.suffix in ('.pth', '.pt'):
    torch = _import_torch()
    torch.save({k: _numpy_to_torch(torch, v) for k, v in sd.items()}, path)
  else:
    raise ValueError(f'Unknown checkpoint format {path.suffix!r} for {path}: use .pth or .npz.')


def save_params(parts: Mapping[str, Params], directory: str | os.PathLike[str]) -> pathlib.Path:
  """Saves capi_jax parameter trees with Orbax's StandardCheckpointer to `directory/params`."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  target = pathlib.Path(directory).resolve() / 'params'
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(target, jax.tree_util.tree_map(np.asarray, dict(parts)))
  return target


def restore_params(path: str | os.PathLike[str]) -> dict[str, Params]:
  """Restores what `save_params` wrote (numpy arrays, as saved)."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  with ocp.StandardCheckpointer() as checkpointer:
    restored = checkpointer.restore(pathlib.Path(path).resolve())
  return jax.tree_util.tree_map(np.asarray, restored)


def restore_backbone(path: str | os.PathLike[str]) -> Params:
  """The 'backbone' of what `save_params` wrote in `path`.

  Raises:
    CheckpointMismatchError: `path` holds no backbone.
  """
  parts = restore_params(path)
  if 'backbone' not in parts:
    raise CheckpointMismatchError(f'{path} holds {sorted(parts)}, no backbone: pass the '
                                  'directory written by `python -m capi_jax.convert`.')
  return parts['backbone']


def restore_training_parts(step_dir: str | os.PathLike[str], config: ml_collections.ConfigDict,
                           source: str = 'student') -> dict[str, Params]:
  """{'backbone', 'head', 'clustering_head'} of a capi_jax training checkpoint, on one device.

  Args:
    step_dir: a step folder of a training run, `WORKDIR/checkpoints/<step>` (or a copy of one).
    config: the run's config (the checkpoint's architecture is checked against it).
    source: 'student' or 'student_ema' (the EMA, whose backbone is the teacher's).
  """
  # The engine's modules are imported here so that converting official weights needs none.
  from capi_jax import methods  # pylint: disable=g-import-not-at-top
  from capi_jax.core import checkpointing  # pylint: disable=g-import-not-at-top
  from capi_jax.core import sharding  # pylint: disable=g-import-not-at-top
  from capi_jax.core import state as state_lib  # pylint: disable=g-import-not-at-top
  if source not in ('student', 'student_ema'):
    raise ValueError(f"source must be 'student' or 'student_ema', got {source!r}.")
  device = jax.devices()[0]
  layout = state_lib.state_layout(config, methods.from_config(config),
                                  sharding.make_mesh(config, [device]))
  target = checkpointing.restore_target(layout.abstract, jax.sharding.SingleDeviceSharding(device))
  state = checkpointing.restore_step_dir(step_dir, config, target)
  student = state.params if source == 'student' else state.buffers['ema']
  return jax.tree.map(np.asarray, {'backbone': student['backbone'], 'head': student['head'],
                                   'clustering_head': state.params['clustering_head']})


def _check_restored_architecture(parts: Mapping[str, Params],
                                 config: ml_collections.ConfigDict) -> None:
  """Fails like `load_official` would if the capi_jax trees don't fit `config`."""
  sd = to_official_state_dict(parts)
  backbone_to_flax(_strip(sd, PREFIXES['backbone']), config)
  dim, k = config.model.embed_dim, config.capi.num_clusters
  if 'head' in parts:
    student_head_to_flax(_strip(sd, PREFIXES['head']), dim, k)
  if 'clustering_head' in parts:
    clustering_head_to_flax(_strip(sd, PREFIXES['clustering_head']), dim, k,
                            use_bias=config.capi.clustering_kwargs.bias)


def _config_section(cfg: ml_collections.ConfigDict, section: str) -> ml_collections.ConfigDict:
  """`cfg`'s section at a dotted path, e.g. 'caev2.teacher.model'."""
  node = cfg
  for key in section.split('.'):
    if key not in node:
      raise cli.UserError(f'The config has no section {section!r} (no {key!r} in it): pass '
                       '--section=<the dotted path of the ViT\'s fields>, e.g. model.')
    node = node[key]
  return node


def _run_vit(cfg: ml_collections.ConfigDict, family: str, section: str, direction: str,
             source_path: str, output: str) -> None:
  """The command line's work for a ViT family (`models/vit_convert.py`): its official file
  (names under `vit_convert.OFFICIAL_PREFIXES[family]`, e.g. OpenAI CLIP's `.pt`) <-> the
  'backbone' of a capi_jax params directory."""
  # vit_convert builds on this module, so it is imported when used.
  from capi_jax.models import vit  # pylint: disable=g-import-not-at-top
  from capi_jax.models import vit_convert  # pylint: disable=g-import-not-at-top
  model = vit.from_config(cfg, _config_section(cfg, section))
  prefix = vit_convert.OFFICIAL_PREFIXES[family]
  if direction == 'capi_jax':
    params = vit_convert.official_to_params(read_state_dict(source_path), model, family, prefix)
    target = save_params({'backbone': params}, output)
    print(f'Wrote the {family} ViT ({prefix}*) as backbone to {target}')
    return
  # A params directory, or a capi_jax training run of any method (its evaluation backbone).
  from capi_jax.core import pretrained  # pylint: disable=g-import-not-at-top
  params = pretrained.load(source_path).backbone
  if params is None:
    raise cli.UserError(f'{source_path} is an official file already; --to=official reads a '
                     'capi_jax params directory or training run.')
  sd = vit_convert.params_to_official(params, family, prefix)
  vit_convert.official_to_params(sd, model, family, prefix)  # Fails unless it fits `section`.
  write_state_dict(sd, output)
  print(f'Wrote the {family} ViT under official names ({prefix}*) to {output}')


def _run(cfg: ml_collections.ConfigDict, direction: str, source_path: str, output: str,
         source: str) -> None:
  """The command line's work: one conversion in `direction` ('capi_jax' or 'official')."""
  if direction == 'capi_jax':
    parts = load_official(source_path, cfg, source=source)
    target = save_params(parts, output)
    print(f'Wrote {sorted(parts)} to {target}')
    return
  from capi_jax.core import checkpointing  # pylint: disable=g-import-not-at-top
  found = checkpointing.find_checkpoint(source_path)
  if found.kind == 'training':
    parts = restore_training_parts(found.path, cfg, source)
  else:
    parts = restore_params(found.path)
    _check_restored_architecture(parts, cfg)
  export_official(parts, output)
  print(f'Wrote {sorted(parts)} under official names to {output}')


def main() -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  from capi_jax.models import vit_convert  # pylint: disable=g-import-not-at-top
  config = config_flags.DEFINE_config_file(
      'config', None, 'capi_jax config: architecture (model) and clusters (capi).',
      lock_config=True)
  direction = flags.DEFINE_enum('to', None, ['capi_jax', 'official'], 'Conversion direction.')
  source_path = flags.DEFINE_string(
      'input', None, 'official .pth/.pt/.npz; or a capi_jax OUT/params directory or training '
      'checkpoint step folder (WORKDIR/checkpoints/<step>).')
  output = flags.DEFINE_string(
      'output', None, 'directory (to capi_jax) or .npz/.pth file (to official).')
  source = flags.DEFINE_enum('source', 'student', ['student', 'student_ema'],
                             'Which network of a full training checkpoint (official or '
                             'capi_jax) to read.')
  family = flags.DEFINE_enum(
      'family', '', ['', *vit_convert.FAMILIES],
      'Convert a ViT of this family (models/vit_convert.py; e.g. clip: OpenAI CLIP\'s visual '
      'tower, CAE v2\'s teacher) as the backbone, instead of a CAPI checkpoint.')
  section = flags.DEFINE_string(
      'section', 'model', 'With --family: the config section holding the ViT\'s fields '
      '(e.g. caev2.teacher.model).')
  flags.mark_flags_as_required(['config', 'to', 'input', 'output'])

  def run(_):
    if family.value:
      _run_vit(config.value, family.value, section.value, direction.value, source_path.value,
               output.value)
    else:
      _run(config.value, direction.value, source_path.value, output.value, source.value)

  cli.run(run)


if __name__ == '__main__':
  main()
