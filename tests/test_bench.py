"""Tests for the benchmark: its pieces, and `python -m capi_jax.bench --smoke` end to end."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from capi_jax import methods
from capi_jax.base import hardware
from capi_jax.base import huge_pages
from capi_jax.engine import benchmark
from configs import bench_cpu
from configs import tiny

REPO = pathlib.Path(__file__).resolve().parents[1]
# A small model so that the subprocess compiles in seconds on 2 cores.
_SMALL = ('--config=configs/tiny.py', '--config.data.dataset=synthetic',
          '--config.train.global_batch_size=16', '--config.capi.model.embed_dim=64',
          '--config.capi.model.num_heads=2', '--config.capi.model.encoder_depth=2',
          '--config.capi.model.decoder_depth=1', '--config.capi.num_clusters=64', '--smoke')


def _run_bench(*flags: str) -> dict:
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             XLA_FLAGS='--xla_force_host_platform_device_count=8')
  proc = subprocess.run([sys.executable, '-m', 'capi_jax.bench', *flags], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = proc.stdout.strip().splitlines()
  assert len(lines) == 1, proc.stdout  # One JSON line, nothing else on stdout.
  return json.loads(lines[0])


def test_smoke_on_8_devices():
  result = _run_bench(*_SMALL)
  assert result['device_count'] == 8 and result['platform'] == 'cpu'
  assert result['config'] == 'tiny' and result['global_batch_size'] == 16
  assert result['steps'] == 2 and result['jax_version'] == jax.__version__
  for key in ('images_per_s', 'step_time_s', 'tflops_per_s', 'mfu', 'peak_memory_bytes',
              'flops_per_step', 'compile_s'):
    assert result[key] > 0, key
  assert result['images_per_s'] == pytest.approx(16 / result['step_time_s'])
  assert result['peak_source'].startswith('measured') and result['host_cpus'] >= 1
  assert result['data_pipeline']['images_per_s'] > 0
  assert result['bottleneck'] in ('data_pipeline', 'train_step')
  # Where huge pages apply, the command restarted itself with them; else the tunables are ours.
  tunables = huge_pages.tunables_with_huge_pages(dict(os.environ))
  assert result['glibc_tunables'] == (tunables or os.environ.get('GLIBC_TUNABLES', ''))


def test_scaling_smoke():
  result = _run_bench(*_SMALL, '--scaling', '--device_counts=1,2', '--data_batches=0')
  runs = result['scaling']
  assert [r['device_count'] for r in runs] == [1, 2]
  assert [r['global_batch_size'] for r in runs] == [8, 16]  # 8 per device (16 / 2).
  assert result['per_device_batch'] == 8
  assert all(r['images_per_s_per_device'] > 0 for r in runs)


def test_synthetic_batch_has_the_pipeline_layout():
  config = bench_cpu.get_config()
  batch = benchmark.synthetic_batch(config, methods.from_config(config).train_transform())
  # 64 tokens: 41 masked, 23 visible, int(41 * 0.25) = 10 predicted.
  assert batch['images'].shape == (64, 112, 112, 3) and batch['images'].dtype == np.uint8
  assert batch['visible_indices'].shape == (64, 23)
  assert batch['predict_indices'].shape == (64, 10)
  for visible, predict in zip(batch['visible_indices'], batch['predict_indices']):
    assert np.all(np.diff(visible) > 0)  # Sorted, distinct.
    assert not set(visible) & set(predict)  # Predicted positions are masked ones.


def test_peak_table():
  assert hardware.table_peak_flops('NVIDIA H100 80GB HBM3', 'bfloat16') == 989e12
  assert hardware.table_peak_flops('NVIDIA H100 PCIe', 'bfloat16') == 756e12
  assert hardware.table_peak_flops('NVIDIA A100-SXM4-80GB', 'bfloat16') == 312e12
  assert hardware.table_peak_flops('TPU v5 lite', 'bfloat16') == 197e12
  assert hardware.table_peak_flops('TPU v5', 'bfloat16') == 459e12
  assert hardware.table_peak_flops('NVIDIA H100 80GB HBM3', 'float32') is None
  assert hardware.table_peak_flops('cpu', 'bfloat16') is None


def test_scaling_configs_keep_the_per_device_batch():
  config = tiny.get_config()  # Global batch 128.
  runs = benchmark.scaling_configs(config, [8, 1, 2, 4, 16], n_available=8)
  assert [(n, c.train.global_batch_size) for n, c in runs] == [(1, 16), (2, 32), (4, 64), (8, 128)]
  assert config.train.global_batch_size == 128  # The caller's config is untouched.
  with pytest.raises(ValueError, match='device_counts'):
    benchmark.scaling_configs(config, [16], n_available=8)


def test_mesh_configs_run_each_count_under_each_mesh_that_fits():
  config = tiny.get_config()
  runs = benchmark.scaling_configs(config, [1, 2, 4], n_available=8)
  got = [(count, mesh, c.sharding.mesh)
         for count, mesh, c in benchmark.mesh_configs(runs, ['fsdp', 'fsdp:tensor=2'])]
  assert got == [(1, 'fsdp', (('fsdp', -1),)), (2, 'fsdp', (('fsdp', -1),)),
                 (2, 'fsdp:tensor=2', (('fsdp', -1), ('tensor', 2))),
                 (4, 'fsdp', (('fsdp', -1),)), (4, 'fsdp:tensor=2', (('fsdp', -1), ('tensor', 2)))]
  assert [m for _, m, _ in benchmark.mesh_configs(runs, [])] == ['data=1:fsdp'] * 3
