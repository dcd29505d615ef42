"""Encoders from Python and on the command line: `evaluate --checkpoint=FILE` for every method
(each method's `official_backbone`), and `capi_jax.load` (runs, convert outputs, official files,
README's Python section)."""

import importlib.util
import pathlib

import jax
import ml_collections
import numpy as np
import pytest

from capi_jax import evaluate
from capi_jax.base import sharding
from capi_jax.engine import evaluation
from capi_jax.models import vit
from capi_jax.weights import files
from capi_jax.weights import vit as vit_weights
from configs.caev2 import fashion_mnist as caev2_fashion_mnist
from configs.mim_refiner import base as mimref_base
from configs.mim_refiner import tiny as mimref_tiny


def _random_tree(shapes, seed):
  """Random float32 numpy leaves shaped like `shapes` (no init to compile)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: (0.1 * rng.normal(size=x.shape)).astype(np.float32), shapes)


def _mimref_mae_config() -> ml_collections.ConfigDict:
  """MIM-Refiner from an MAE encoder (the mae_l16 recipe's family), 2 blocks of 16 at 8 px."""
  c = mimref_tiny.get_config()
  c.data.image_size = 8
  c.mim_refiner.encoder = 'mae'
  c.mim_refiner.model = mimref_base.vit_model('mae', patch_size=4, embed_dim=16, depth=2,
                                              num_heads=2)
  c.mim_refiner.model.image_size = 8
  return c


def _caev2_clip_config() -> ml_collections.ConfigDict:
  """CAE v2 with an OpenAI-CLIP-layout teacher (the release's), everything a few channels."""
  c = caev2_fashion_mnist.get_config()
  c.data.image_size = 8
  c.caev2.model.update(patch_size=4, image_size=8, embed_dim=16, depth=1, num_heads=2)
  c.caev2.regressor.update(embed_dim=8, depth=1, num_heads=2)
  c.caev2.teacher.backbone = 'clip'
  c.caev2.teacher.normalization = 'clip'
  c.caev2.teacher.image_size = 8
  c.caev2.teacher.model = ml_collections.ConfigDict(dict(
      vit.FAMILIES['clip'], patch_size=4, image_size=8, embed_dim=16, depth=2, num_heads=2,
      out_dim=6))
  return c


def _write(state_dict: dict[str, np.ndarray], path: pathlib.Path) -> pathlib.Path:
  """`state_dict` as a `.pth` when PyTorch is installed (as the releases ship), else `.npz`."""
  if importlib.util.find_spec('torch') is None:
    path = path.with_suffix('.npz')
  files.write_state_dict(state_dict, path)
  return path


def _check_official(config, module, family, prefix, tmp_path, name):
  """Writes random params of `module` as `family`'s file; evaluate reads them back exactly and
  the backbone it builds runs."""
  params = _random_tree(vit_weights.param_shapes(module), seed=1)
  path = _write(vit_weights.params_to_official(params, family, prefix), tmp_path / name)
  mesh = sharding.make_mesh(config)
  loaded, step, model = evaluate.load_params(config, tmp_path, str(path), '', 'ema', mesh)
  assert step == path.stem
  jax.tree.map(np.testing.assert_array_equal, loaded, params)
  backbone = evaluation.make_backbone(config, loaded, mesh, model)
  size = config.data.image_size
  n = backbone.batch_size
  images = np.zeros((n, size, size, 3), np.float32)
  out = backbone.extract([{'images': images, 'index': np.arange(n), 'valid': np.ones(n, bool)}])
  assert out['global_repr'].shape[0] == n and np.isfinite(out['global_repr']).all()
  return model


def test_evaluate_reads_an_mae_file_with_a_mim_refiner_config(tmp_path):
  config = _mimref_mae_config()
  method = evaluation.eval_method(config)
  model = _check_official(config, method.encoder, 'mae', '', tmp_path, 'mae_pretrain.pth')
  assert model == method.eval_model()


def test_evaluate_reads_clip_and_caev2_files_with_a_caev2_config(tmp_path):
  config = _caev2_clip_config()
  method = evaluation.eval_method(config)
  # OpenAI CLIP's file (visual tower under `visual.`): the teacher is what is evaluated.
  model = _check_official(config, method.teacher, 'clip', 'visual.', tmp_path, 'ViT-B-16.pt')
  assert model == method.teacher
  # A CAE v2 release (encoder under `encoder.`): the student encoder.
  model = _check_official(config, method.encoder, 'caev2', 'encoder.', tmp_path, 'caev2.pth')
  assert model == method.eval_model()


def test_evaluate_asks_for_a_conversion_where_the_method_cannot_read_the_file():
  config = mimref_tiny.get_config()  # Refines a CAPI encoder: its file is converted first.
  with pytest.raises(ValueError, match='convert it first'):
    evaluation.eval_method(config).official_backbone({'x': np.zeros(1)}, 'ema')
