"""Every shipped config is valid; bad values are refused up front with messages naming them."""

import importlib
import subprocess
import sys

import pytest

from capi_jax.engine import config_checks

CONFIGS = ('vits', 'vitb', 'vitl', 'vith', 'tiny', 'bench_cpu')


@pytest.mark.parametrize('name', CONFIGS)
def test_shipped_configs_are_valid(name):
  config = importlib.import_module(f'configs.{name}').get_config()
  assert config_checks.problems(config, device_count=8) == []


@pytest.mark.parametrize('key, value, expected', [
    ('capi.model.num_heads', 5,
     'capi.model.embed_dim=96 must be divisible by capi.model.num_heads=5'),
    ('data.image_size', 30, 'data.image_size=30 must be divisible by capi.model.patch_size=4'),
    ('capi.data.mask_ratio', 1.5, 'capi.data.mask_ratio=1.5 must be in (0, 1)'),
    ('capi.data.prediction_subsampling', 0.001, 'visible and 0 predicted tokens per image'),
    ('train.global_batch_size', 100, 'must be divisible by the 8 devices'),
    ('capi.model.n_registers', 6,
     "'edge' register coordinates need capi.model.n_registers divisible by 4"),
    ('efficiency.remat_policy', 'everything', "efficiency.remat_policy='everything'"),
    ('capi.data.masking_generator', 'Random', "capi.data.masking_generator='Random'"),
    ('sharding.dcn_mesh', (('data', 2),), "dcn_mesh: mesh axis 'data' of size 1 cannot span 2"),
    ('sharding.dcn_mesh', (('model', 2),), "dcn_mesh: names ['model'], not axes of the mesh"),
    ('sharding.dcn_mesh', (('data', 0),), 'sharding.dcn_mesh=((\'data\', 0),) must be'),
])
def test_bad_value_is_named(key, value, expected):
  config = importlib.import_module('configs.tiny').get_config()
  *sections, name = key.split('.')
  node = config
  for section in sections:
    node = node[section]
  node[name] = value
  with pytest.raises(config_checks.ConfigError, match='Invalid config') as info:
    config_checks.validate(config, device_count=8)
  assert expected in str(info.value)


def test_main_exits_with_the_message_and_no_traceback(tmp_path):
  result = subprocess.run(
      [sys.executable, '-m', 'capi_jax.main', '--config=configs/tiny.py',
       f'--workdir={tmp_path}', '--config.capi.data.mask_ratio=1.5'],
      capture_output=True, text=True, timeout=120, check=False)
  assert result.returncode != 0
  assert 'capi.data.mask_ratio=1.5 must be in (0, 1)' in result.stderr
  assert 'Traceback' not in result.stderr


def test_evaluation_settings_are_checked_before_training():
  config = importlib.import_module('configs.tiny').get_config()
  config.evals.protocols = ('classif', 'segm')
  config.evals.model = 'teacher'
  found = '\n'.join(config_checks.problems(config, device_count=8))
  assert 'segm' in found and "evals.model='teacher'" in found
