"""Official <-> capi_jax checkpoint conversion: exact round trips and clear errors."""

import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from capi_jax import convert
from capi_jax import methods
from capi_jax.base import sharding
from capi_jax.engine import checkpointing
from capi_jax.engine import state as state_lib
from capi_jax.methods.capi import convert as capi_convert
from capi_jax.reference import capi as capi_parity
from capi_jax.reference import harness
from capi_jax.weights import files
from capi_jax.weights import rules
from configs import tiny

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope='module')
def ctx(fixture_path):
  context = capi_parity.Context(harness.load_fixture(fixture_path))
  context.config.capi.num_clusters = context.arrays['clustering/layer.weight'].shape[0]
  return context


@pytest.fixture(scope='module')
def official(ctx) -> dict[str, np.ndarray]:
  """The fixture's backbone and both heads under official-format file names."""
  sd = {'backbone.' + k: v for k, v in ctx.group('backbone').items()}
  sd.update({'head.' + k: v for k, v in ctx.group('student_head').items()
             if k.startswith('last_layer.')})
  sd.update({'teacher_head.' + k: v for k, v in ctx.group('clustering').items()
             if k.startswith('layer.')})
  return sd


def _assert_same_state_dict(ours, ref):
  assert sorted(ours) == sorted(ref)
  for k in ref:
    assert ours[k].dtype == ref[k].dtype and ours[k].shape == ref[k].shape, k
    np.testing.assert_array_equal(ours[k], ref[k], err_msg=k)


def test_npz_round_trip_is_bit_exact(ctx, official, tmp_path):
  np.savez(tmp_path / 'official.npz', **official)
  parts = capi_convert.load_official(tmp_path / 'official.npz', ctx.config)
  assert sorted(parts) == ['backbone', 'clustering_head', 'head']
  assert parts['backbone']['patch_embed']['kernel'].shape == (14, 14, 3, 64)
  assert parts['head']['kernel_v'].shape == (64, 32)
  capi_convert.export_official(parts, tmp_path / 'back.npz')
  _assert_same_state_dict(files.read_state_dict(tmp_path / 'back.npz'), official)


def test_converted_backbone_is_the_one_that_matches_the_reference(ctx, official, tmp_path):
  """The file's backbone, converted, computes the official release's eval forward (the
  fixture's outputs), not merely what the parity suite's own conversion gives."""
  np.savez(tmp_path / 'official.npz', **official)
  params = capi_convert.load_official(tmp_path / 'official.npz', ctx.config)['backbone']
  outputs = jax.jit(ctx.model.apply)({'params': params}, ctx.images('fwd/images'))
  for name, ours in zip(('global_repr', 'registers', 'feature_map'), outputs):
    result = harness.compare(f'fwd/{name}', ours, ctx.arrays[f'fwd/{name}'],
                             capi_parity.FORWARD_TOL)
    assert result.ok, result


def test_orbax_params_round_trip(ctx, official, tmp_path):
  np.savez(tmp_path / 'official.npz', **official)
  parts = capi_convert.load_official(tmp_path / 'official.npz', ctx.config)
  restored = files.restore_params(files.save_params(parts, tmp_path / 'out'))
  jax.tree.map(np.testing.assert_array_equal, restored, parts)


def test_pth_round_trip_and_training_checkpoint(ctx, official, tmp_path):
  torch = pytest.importorskip('torch')
  torch.save({k: torch.from_numpy(v) for k, v in official.items()}, tmp_path / 'official.pth')
  parts = capi_convert.load_official(tmp_path / 'official.pth', ctx.config)
  capi_convert.export_official(parts, tmp_path / 'back.pth')
  back = torch.load(tmp_path / 'back.pth', weights_only=True)
  _assert_same_state_dict({k: v.numpy() for k, v in back.items()}, official)

  # A full official training checkpoint: student / student_ema / teacher modules + optimisers.
  model = {}
  for k, v in official.items():
    if k.startswith(('backbone.', 'head.')):
      model['student.' + k] = torch.from_numpy(v)
      model['student_ema.' + k] = torch.from_numpy(v + 1)
    if k.startswith('backbone.'):
      model['teacher.' + k] = torch.from_numpy(v + 1)
    if k.startswith('teacher_head.'):
      model['teacher.head.' + k[len('teacher_head.'):]] = torch.from_numpy(v)
  torch.save({'iteration': 3, 'model': model, 'optimizer': {'state': {}}}, tmp_path / 'train.pth')
  ema = capi_convert.load_official(tmp_path / 'train.pth', ctx.config, source='student_ema')
  np.testing.assert_array_equal(ema['backbone']['registers'], official['backbone.registers'] + 1)
  np.testing.assert_array_equal(ema['clustering_head']['bias'], official['teacher_head.layer.bias'])


def test_missing_parameter_is_named(ctx, official, tmp_path):
  broken = dict(official)
  del broken['backbone.encoder.blocks.1.residual2.fn.fc1.weight']
  np.savez(tmp_path / 'missing.npz', **broken)
  with pytest.raises(rules.CheckpointMismatchError,
                     match=r"missing parameter 'encoder\.blocks\.1\.residual2\.fn\.fc1\.weight': "
                           r'expected shape \(256, 64\), found none'):
    capi_convert.load_official(tmp_path / 'missing.npz', ctx.config)


def test_wrong_shape_is_named_with_both_shapes(ctx, official, tmp_path):
  broken = dict(official)
  broken['backbone.patch_embed.weight'] = np.zeros((64, 3, 16, 16), np.float32)
  np.savez(tmp_path / 'shape.npz', **broken)
  with pytest.raises(rules.CheckpointMismatchError,
                     match=r"parameter 'patch_embed\.weight': expected shape \(64, 3, 14, 14\), "
                           r'found \(64, 3, 16, 16\)'):
    capi_convert.load_official(tmp_path / 'shape.npz', ctx.config)


@pytest.mark.parametrize('depth, message', [
    (2, r"unexpected parameter 'encoder\.blocks\.2\.residual1\.norm\.weight' \(shape \(64,\)\)"),
    (4, r"missing parameter 'encoder\.blocks\.3\.residual1\.fn\.q_proj\.weight': "
        r'expected shape \(64, 64\)'),
])
def test_different_depth_is_an_error(ctx, official, tmp_path, depth, message):
  np.savez(tmp_path / 'official.npz', **official)
  config = ctx.config.copy_and_resolve_references()
  config.capi.model.encoder_depth = depth
  with pytest.raises(rules.CheckpointMismatchError, match=message):
    capi_convert.load_official(tmp_path / 'official.npz', config)


def test_other_width_reports_the_parameters_and_how_many(ctx, official, tmp_path):
  np.savez(tmp_path / 'official.npz', **official)
  config = ctx.config.copy_and_resolve_references()
  config.capi.model.embed_dim, config.capi.model.num_heads = 128, 8
  with pytest.raises(rules.CheckpointMismatchError) as error:
    capi_convert.load_official(tmp_path / 'official.npz', config)
  message = str(error.value)
  assert ("parameter 'decoder.blocks.0.residual1.fn.k_proj.weight': expected shape (128, 128), "
          'found (64, 64)') in message
  assert '(44 problem(s))' in message and '... and 14 more' in message


def test_unknown_prefix_and_format_are_errors(ctx, official, tmp_path):
  np.savez(tmp_path / 'odd.npz', **official, **{'other.weight': np.zeros(3)})
  with pytest.raises(rules.CheckpointMismatchError, match="'other.weight'"):
    capi_convert.load_official(tmp_path / 'odd.npz', ctx.config)
  with pytest.raises(ValueError, match='use .pth or .npz'):
    files.read_state_dict(tmp_path / 'model.safetensors')


def test_read_state_dict_torchscript_and_wrapped(tmp_path):
  """OpenAI CLIP ships TorchScript archives (read as data, never with torch.jit.load: see
  tests/test_weight_files.py); MIM-Refiner wraps its weights in 'state_dict'."""
  torch = pytest.importorskip('torch')
  linear = torch.nn.Linear(3, 2)
  torch.jit.script(linear).save(str(tmp_path / 'scripted.pt'))
  torch.save({'state_dict': linear.state_dict(), 'ctor_kwargs': {'dim': 3}},
             tmp_path / 'wrapped.th')
  for name in ('scripted.pt', 'wrapped.th'):
    sd = files.read_state_dict(tmp_path / name)
    assert sorted(sd) == ['bias', 'weight'], name
    np.testing.assert_array_equal(sd['weight'], linear.weight.detach().numpy())
    np.testing.assert_array_equal(sd['bias'], linear.bias.detach().numpy())


def test_cli_official_to_capi_jax_and_back(ctx, official, tmp_path):
  np.savez(tmp_path / 'official.npz', **official)
  m = ctx.config.capi.model
  overrides = [f'--config.capi.model.{k}={m[k]}' for k in (
      'patch_size', 'n_registers', 'embed_dim', 'num_heads', 'encoder_depth', 'decoder_depth')]
  overrides.append(f'--config.capi.num_clusters={ctx.config.capi.num_clusters}')
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'PYTHONPATH': str(REPO)}
  run = lambda *args: subprocess.run(
      [sys.executable, '-m', 'capi_jax.convert', '--config=configs/tiny.py', *overrides, *args],
      cwd=REPO, env=env, check=True, capture_output=True, text=True)
  run('--to=capi_jax', f'--input={tmp_path / "official.npz"}', f'--output={tmp_path / "out"}')
  assert (tmp_path / 'out' / 'params').is_dir()
  run('--to=official', f'--input={tmp_path / "out" / "params"}',
      f'--output={tmp_path / "back.npz"}')
  _assert_same_state_dict(files.read_state_dict(tmp_path / 'back.npz'), official)


def test_pth_bfloat16_round_trip_is_bit_exact(ctx, official, tmp_path):
  torch = pytest.importorskip('torch')
  bf16 = {k: torch.from_numpy(v).to(torch.bfloat16) for k, v in official.items()}
  torch.save(bf16, tmp_path / 'bf16.pth')
  parts = capi_convert.load_official(tmp_path / 'bf16.pth', ctx.config)
  capi_convert.export_official(parts, tmp_path / 'back.pth')
  back = torch.load(tmp_path / 'back.pth', weights_only=True)
  assert sorted(back) == sorted(bf16)
  for k, v in bf16.items():
    assert back[k].dtype == torch.bfloat16 and torch.equal(back[k], v), k


def test_capi_jax_training_checkpoint_to_official(tmp_path):
  """A training run's step folder exports the student or its EMA under official names."""
  import grain  # pylint: disable=g-import-not-at-top
  config = tiny.get_config()
  config.capi.model.embed_dim, config.capi.model.num_heads = 32, 2
  config.capi.model.encoder_depth, config.capi.model.decoder_depth = 1, 1
  config.data.image_size, config.capi.num_clusters = 16, 8
  mesh = sharding.make_mesh(config, jax.devices()[:1])
  with jax.set_mesh(mesh):
    state, _ = state_lib.create_state(config, methods.from_config(config), mesh,
                                      jax.random.PRNGKey(0))
  state = state.replace(buffers=jax.tree.map(lambda x: x + 1, state.buffers))
  checkpointer = checkpointing.Checkpointer(tmp_path / 'checkpoints', config)
  checkpointer.save(7, state, iter(grain.MapDataset.range(4).to_iter_dataset()))
  checkpointer.wait()
  checkpointer.close()

  convert._run(config, 'official', str(tmp_path / 'checkpoints' / '7'),  # pylint: disable=protected-access
               str(tmp_path / 'ema.npz'), 'student_ema')
  expected = capi_convert.to_official_state_dict({
      'backbone': state.buffers['ema']['backbone'], 'head': state.buffers['ema']['head'],
      'clustering_head': state.params['clustering_head']})
  _assert_same_state_dict(files.read_state_dict(tmp_path / 'ema.npz'), expected)
