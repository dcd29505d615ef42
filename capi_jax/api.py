r"""capi_jax from Python: any encoder in one line, its features in another.

  import capi_jax
  encoder = capi_jax.load('/tmp/capi_tiny')      # a run of any method: its EMA encoder
  out = encoder(images)                          # (B, H, W, 3) uint8, or float in [0, 1]
  out['global_repr'], out['registers'], out['feature_map']   # (B, D), (B, R, D), (B, h, w, D)

`load(source, config=None, which='ema')` reads
  - a capi_jax training run of any method: a workdir (its newest step), its `checkpoints/`
    folder or a step folder; the run's own config (WORKDIR/runs/) rebuilds its evaluation model
    (`Method.eval_model`) and `which` picks its EMA ('ema', the trained weights for a method
    without one) or its 'student';
  - the output directory of `python -m capi_jax.convert --to=capi_jax` (needs `config`);
  - an official release by name ('capi_vitl14_lvd', 'mae_refined_l16', ...: `weights/releases.py`),
    downloaded once into a cache with a recorded size and sha256, read with its config;
  - an official-format file (`.pth`, `.pt`, `.npz`): the config's method reads it
    (`Method.official_backbone`: CAPI's files, MAE / dBOT / data2vec 2.0 with a MIM-Refiner
    config, OpenAI CLIP or CAE v2 with a CAE v2 config). The file does not say its architecture
    (heads, block layout), so `config` is required; without one the error names the family the
    file's names show.
`config` is a config file ('configs/tiny.py', 'FILE.py:ARG') or a ConfigDict. The model runs in
float32 (`compute_dtype`) whatever the run trained in, as the official loaders evaluate.

Calling the encoder normalises the images (ImageNet statistics; OpenAI CLIP's for a CLIP file)
and resizes them (bilinear, antialiased) to `image_size` when given, else only to whole patches
(sides rounded to multiples of the patch size). Batches are split over the local devices (padded
to a multiple of their number); one compilation per input shape.
"""

from collections.abc import Sequence
import dataclasses
import functools
import importlib.util
import os
import pathlib
import sys
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from capi_jax.base import errors
from capi_jax.base import sharding
from capi_jax.base import storage
from capi_jax.data import transforms
from capi_jax.engine import checkpointing
from capi_jax.engine import evaluation
from capi_jax.engine import pretrained
from capi_jax.evaluators import backbone as backbone_lib
from capi_jax.weights import files
from capi_jax.weights import releases

PyTree = Any
OUTPUTS = backbone_lib.OUTPUTS
UserError = errors.UserError  # What a wrong source or config raises.
# Names that give a file's family away (the first match wins), for messages.
_FAMILY_MARKS = (('backbone.', 'CAPI'), ('student.', 'CAPI (a training checkpoint)'),
                 ('visual.', 'OpenAI CLIP'), ('encoder.', 'CAE v2'),
                 ('cls_tokens.tokens', 'MIM-Refiner / data2vec 2.0 (kappamodules)'),
                 ('cls_token', 'MAE / dBOT (timm)'))


def read_config(config: str | os.PathLike[str] | ml_collections.ConfigDict
                ) -> ml_collections.ConfigDict:
  """A ConfigDict as is, or `get_config(ARG)` of a config file 'PATH.py[:ARG]'.

  A file inside a package (configs/tiny.py imports `configs.vitl`) is imported with the
  package's parent on sys.path, wherever the caller runs from.
  """
  if isinstance(config, ml_collections.ConfigDict):
    return config
  text = os.fspath(config)
  file, _, arg = text.partition(':') if not text.endswith('.py') else (text, '', '')
  path = pathlib.Path(file).resolve()
  if not path.is_file():
    raise errors.UserError(f'config={text!r}: no such config file.')
  root = path.parent.parent if (path.parent / '__init__.py').exists() else path.parent
  if str(root) not in sys.path:
    sys.path.insert(0, str(root))
  spec = importlib.util.spec_from_file_location(f'_capi_jax_config_{path.stem}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def family_of(state_dict: dict[str, Any]) -> str:
  """The release family the names of an official file show, or 'unknown'."""
  for mark, family in _FAMILY_MARKS:
    if any(k.startswith(mark) or k == mark for k in state_dict):
      return family
  return 'unknown'


@dataclasses.dataclass(frozen=True)
class _Forward:
  """The model's OUTPUTS and, with `blocks`, its tokens (`backbone.Tokens`); hashable."""
  module: nn.Module
  blocks: tuple[int, ...] | None

  def __call__(self, params: PyTree, images: jax.Array) -> dict[str, jax.Array]:
    out = dict(zip(OUTPUTS, backbone_lib.ModuleForward(self.module)(params, images)))
    if self.blocks is not None:
      tokens = backbone_lib.Tokens.of(self.module)
      out.update(tokens.forward(self.blocks)(params, images))
    return out


@functools.partial(jax.jit, static_argnames=('forward', 'size', 'scale', 'mean', 'std'))
def _features(params: PyTree, images: jax.Array, *, forward: _Forward,
              size: tuple[int, int], scale: float, mean: tuple[float, ...],
              std: tuple[float, ...]) -> dict[str, jax.Array]:
  """Pixels (B, H, W, 3) -> the model's named outputs, float32."""
  x = images.astype(jnp.float32) * scale
  if x.shape[1:3] != size:
    x = jax.image.resize(x, (x.shape[0], *size, 3), 'bilinear', antialias=True)
  x = (x - jnp.asarray(mean)) / jnp.asarray(std)
  return forward(params, x)


@dataclasses.dataclass(frozen=True)
class Encoder:
  """A loaded encoder: `encoder(images)` -> {'global_repr', 'registers', 'feature_map'}.

  Attributes:
    module: the Flax model (`apply({'params': params}, normalised images)`).
    params: its parameters, on the local devices.
    mesh: the local devices; batches are split over them.
    patch_size: input sides are multiples of it.
    image_size: the side inputs are resized to; None: any size (rounded to whole patches).
    normalization: 'imagenet' or 'clip' statistics.
    config: the config the model was built from.
  """
  module: nn.Module
  params: PyTree
  mesh: jax.sharding.Mesh
  patch_size: int
  image_size: int | None
  normalization: str
  config: ml_collections.ConfigDict

  def input_size(self, height: int, width: int) -> tuple[int, int]:
    """The (height, width) the model sees for an input of this size."""
    if self.image_size:
      return self.image_size, self.image_size
    p = self.patch_size
    return max(p, round(height / p) * p), max(p, round(width / p) * p)

  def __call__(self, images: np.ndarray | jax.Array, outputs: Sequence[str] = OUTPUTS,
               blocks: Sequence[int] | None = None) -> dict[str, np.ndarray]:
    """Features of `images` (B, H, W, 3) or (H, W, 3): uint8 in [0, 255], or float in [0, 1].

    Args:
      images: the pixels.
      outputs: which of OUTPUTS to return.
      blocks: also return the token outputs the block-reading protocols pool (MIM-Refiner's
        probes / k-NN, CAE v2's linear probe): 'tokens' (B, T, D) the final tokens after the
        last norm ([prefix, patches]) and 'blocks' (B, len(blocks), T, D) the raw outputs of
        these blocks (0-indexed, negative from the end); needs a model with `encode`.

    Returns:
      {output: float32 numpy}, for each of `outputs` (default all of OUTPUTS): 'global_repr'
      (B, D), 'registers' (B, R, D) (R may be 0), 'feature_map' (B, h, w, D); and with
      `blocks`, 'tokens' and 'blocks'.
    """
    unknown = sorted(set(outputs) - set(OUTPUTS))
    if unknown:
      raise ValueError(f'Unknown outputs {unknown}; choose from {OUTPUTS}.')
    if blocks is not None:
      tokens = backbone_lib.Tokens.of(self.module)
      if tokens is None:
        raise ValueError(f'{type(self.module).__name__} has no per-block outputs (`encode`).')
      blocks = tokens.forward(blocks).blocks  # Resolved (negative indices), checked.
      outputs = (*outputs, 'tokens', 'blocks')
    images = np.asarray(images)
    single = images.ndim == 3
    images = images[None] if single else images
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f'images must be (B, H, W, 3) or (H, W, 3), got {images.shape}.')
    scale = 1 / 255 if images.dtype == np.uint8 else 1.0
    n, n_dev = images.shape[0], self.mesh.devices.size
    padded = np.concatenate([images, np.zeros((-n % n_dev, *images.shape[1:]), images.dtype)])
    mean, std = transforms.NORMALIZATIONS[self.normalization]
    out = _features(self.params, jax.device_put(padded, sharding.batch_sharding(self.mesh)),
                    forward=_Forward(self.module, None if blocks is None else tuple(blocks)),
                    size=self.input_size(*images.shape[1:3]), scale=scale,
                    mean=tuple(map(float, mean)), std=tuple(map(float, std)))
    result = {k: np.asarray(v)[:n] for k, v in out.items() if k in outputs}
    return {k: v[0] for k, v in result.items()} if single else result


def _model_and_params(source: str, config: ml_collections.ConfigDict | None, which: str,
                      compute_dtype: str) -> tuple[nn.Module, PyTree, ml_collections.ConfigDict,
                                                   str]:
  """(model, float32 params, config, normalization) of `source` (see the module docstring)."""
  path = storage.path(source)
  if path.suffix in files.OFFICIAL_SUFFIXES:
    if not path.is_file():
      raise errors.UserError(f'{source}: no such checkpoint file.')
    state_dict = files.read_state_dict(path)
    family = family_of(state_dict)
    if config is None:
      raise errors.UserError(
          f'{source} holds the weights of a {family} model but not its architecture: pass '
          'config= (a config file such as configs/vitl.py for CAPI, a MIM-Refiner recipe for '
          'MAE / dBOT / data2vec 2.0, a CAE v2 recipe for OpenAI CLIP).')
    method = evaluation.eval_method(config, compute_dtype)
    module, params = method.official_backbone(state_dict, which)
    return module, params, config, 'clip' if family == 'OpenAI CLIP' else 'imagenet'
  found = checkpointing.find_checkpoint(path)
  if found.kind == 'params':
    if config is None:
      raise errors.UserError(f'{source} is a `capi_jax.convert` output: pass config= (the '
                             'config it was converted with) to rebuild its model.')
    params = pretrained.restore_backbone(found.path)
  else:
    config = pretrained.run_config(found.path) if config is None else config
    run = pretrained.restore_run(found.path, config)
    params = run.method.eval_params(run.variables, which)
  module = evaluation.eval_method(config, compute_dtype).eval_model()
  return module, params, config, 'imagenet'


def release_config(name: str) -> ml_collections.ConfigDict:
  """The config that describes release `name`'s architecture (`releases.RELEASES`)."""
  release = releases.RELEASES[name]
  module = importlib.import_module(release.config)
  config = module.get_config(release.config_arg) if release.config_arg else module.get_config()
  if release.vit:
    vit = dict(release.vit)
    family = vit.pop('family')
    recipes = importlib.import_module('configs.mim_refiner.base')
    with config.unlocked():
      config.mim_refiner.encoder = family
      config.mim_refiner.model = recipes.vit_model(family, **vit)
  return config


def load(source: str | os.PathLike[str],
         config: str | os.PathLike[str] | ml_collections.ConfigDict | None = None, *,
         which: str = 'ema', image_size: int | None = None, compute_dtype: str = 'float32',
         devices: Sequence[jax.Device] | None = None) -> Encoder:
  """The encoder at `source` (see the module docstring), placed on `devices`.

  Args:
    source: a training run (workdir, checkpoints folder or step folder), a `capi_jax.convert`
      output directory, or an official-format file; local or gs://; or the name of an official
      release (`releases.RELEASES`: 'capi_vitl14_lvd', 'mae_refined_l16', ...), downloaded once
      into the cache (`releases.fetch`) and read with its config.
    config: a config file ('configs/vitl.py', 'FILE.py:ARG') or ConfigDict: required for
      official files and convert outputs; a run's own config by default.
    which: 'ema' (the averaged weights; the trained ones for a method without an EMA) or
      'student'.
    image_size: resize every input to this side; default: any size, in whole patches.
    compute_dtype: the model's compute dtype ('float32'; 'bfloat16' for speed).
    devices: where to place the weights; default this process's devices.
  """
  if which not in ('ema', 'student'):
    raise ValueError(f"which must be 'ema' or 'student', got {which!r}.")
  config = None if config is None else read_config(config)
  source = os.fspath(source)
  if source in releases.RELEASES and not os.path.exists(source):
    config = release_config(source) if config is None else config
    source = os.fspath(releases.fetch(source))
  module, params, config, normalization = _model_and_params(source, config, which,
                                                            compute_dtype)
  params = jax.tree.map(lambda x: np.asarray(x, np.float32), jax.device_get(params))
  mesh = sharding.make_mesh(config, list(devices or jax.local_devices()))
  params = jax.device_put(params, sharding.tree_shardings(mesh, params,
                                                          config.sharding.param_rules))
  patch_size = int(getattr(module, 'patch_size', 1))
  return Encoder(module, params, mesh, patch_size, image_size, normalization, config)
