"""Pod plans: topology names, HLO collective accounting, the batch search, a tiny TPU compile."""

import importlib.util
import json
import os
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from capi_jax import methods
from capi_jax.base import hardware
from capi_jax.base import sharding
from capi_jax.engine import plans
from capi_jax.engine import state as state_lib
from capi_jax.engine import step as step_lib
from configs import tiny

_HAS_LIBTPU = importlib.util.find_spec('libtpu') is not None

# A module with an all-gather at the top, a TPU fused reduce-scatter (an all-reduce sliced to
# shards), and a reduce-scatter and an async all-reduce inside a while loop that runs 3 times,
# and a cross-slice (megascale) all-reduce of a gradient shard: a host-transfer send / recv.
_HLO = """\
HloModule step

%all-reduce-scatter.1 (input_0: f32[8,16]) -> f32[2,16] {
  %input_0 = f32[8,16]{1,0} parameter(0)
  %ar = f32[8,16]{1,0} all-reduce(%input_0), to_apply=%add
  ROOT %ds = f32[2,16]{1,0} dynamic-slice(%ar, %c, %c), dynamic_slice_sizes={2,16}
}

%body (p: (s32[], f32[8,16])) -> (s32[], f32[8,16]) {
  %p = (s32[], f32[8,16]{1,0}) parameter(0)
  %x = f32[8,16]{1,0} get-tuple-element(%p), index=1
  %rs = f32[2,16]{1,0} reduce-scatter(%x), dimensions={0}, to_apply=%add
  %ars = f32[8,16]{1,0} all-reduce-start(%x), to_apply=%add
  %ard = f32[8,16]{1,0} all-reduce-done(%ars)
  ROOT %t = (s32[], f32[8,16]{1,0}) tuple(%i, %ard)
}

ENTRY %main (a: bf16[4,16]) -> f32[8,16] {
  %a = bf16[4,16]{1,0} parameter(0)
  %ag = bf16[16,16]{1,0} all-gather(%a), dimensions={0}
  %ars = f32[2,16]{1,0} fusion(%g), kind=kCustom, calls=%all-reduce-scatter.1
  %w = (s32[], f32[8,16]{1,0}) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"3"}}
  %send = (f32[2,16]{1,0:T(2,128)}, u32[], token[]) send(%ars, %after-all), channel_id=2, is_host_transfer=true, frontend_attributes={_xla_host_transfer_handler_name="xla_megascale_runtime",_xla_megascale_reduce_operation="SUM",_xla_megascale_target="{1,2}x{0:3}",_xla_megascale_transfer_type="ALL_REDUCE"}
  %recv = (f32[2,16]{1,0:T(2,128)}, u32[], token[]) recv(%after-all), channel_id=1, is_host_transfer=true, frontend_attributes={_xla_host_transfer_handler_name="xla_megascale_runtime",_xla_megascale_transfer_type="ALL_REDUCE"}
  %send-done = token[] send-done(%send), channel_id=2, is_host_transfer=true, frontend_attributes={_xla_host_transfer_handler_name="xla_megascale_runtime"}
  ROOT %r = f32[8,16]{1,0} get-tuple-element(%w), index=1
}
"""


def test_parse_topology_names_the_accepted_forms():
  name, chip, grid = plans.parse_topology('v5e:4x4')
  assert (name, chip.hbm_bytes, grid) == ('v5e', 16 * plans.GiB, (4, 4))
  assert plans.parse_topology('v5p:2x2x4')[1].topology_prefix == 'v5'
  for bad in ('v5e', 'v3:4x4', 'v5e:4', 'v4:2x2x2x2'):
    with pytest.raises(ValueError, match='CHIP:GRID'):
      plans.parse_topology(bad)


def test_gpu_topologies_are_nodes_by_gpus():
  name, chip, grid = plans.parse_topology('h100:2x8')
  assert (name, grid, chip.gpu) == ('h100', (2, 8), hardware.H100_SXM)
  assert chip.hbm_bytes == 80 * plans.GiB and plans.CHIPS['h200'].hbm_bytes == 141 * 10 ** 9
  for bad in ('h100:8', 'h100:1x1x8', 'v100:1x8'):
    with pytest.raises(ValueError, match='NODESxGPUS'):
      plans.parse_topology(bad)


def test_gpu_target_config_from_published_facts():
  text = hardware.gpu_target_config(hardware.A100_80GB)
  for line in ('core_count: 108', 'fpus_per_core: 64', 'threads_per_warp: 32',
               'block_dim_limit_x: 2147483647', 'cuda_compute_capability { major: 8 minor: 0 }',
               'device_memory_size: 85899345920', 'platform_name: "CUDA"',
               'device_description_str: "NVIDIA A100-SXM4-80GB"'):
    assert line in text, line
  # Every GPU the plans know has a datasheet peak (ideal step times).
  assert all(hardware.table_peak_flops(f.name, 'bfloat16') for f in hardware.GPUS.values())


def test_shape_bytes():
  assert plans.shape_bytes('f32[8,128]{1,0}') == 8 * 128 * 4
  assert plans.shape_bytes('(bf16[4]{0}, s32[])') == 8 + 4
  assert plans.shape_bytes('token[]') == 0


def test_collective_bytes_counts_operands_and_loop_trips():
  assert plans.collective_bytes(plans.parse_hlo(_HLO)) == {
      'all-gather': 4 * 16 * 2,  # The bf16 shard that is gathered, once.
      'reduce-scatter': 8 * 16 * 4 + 3 * 8 * 16 * 4,  # The fused one, then three loop trips.
      'all-reduce': 3 * 8 * 16 * 4,  # Async pair counted once per trip, at its start.
      'dcn all-reduce': 2 * 16 * 4,  # The shard sent to the other slice (recv not counted).
  }


def test_collective_bytes_reads_a_scan_loops_trips_off_its_condition():
  """The TPU compiler writes scanned layers' loops without `known_trip_count`: `i < 4`."""
  hlo = _HLO.replace(', backend_config={"known_trip_count":{"n":"3"}}', '').replace(
      '%body (p:', """%cond (c: (s32[], f32[8,16])) -> pred[] {
  %c = (s32[], f32[8,16]{1,0}) parameter(0)
  %n = s32[]{:T(128)} constant(4)
  %i = s32[] get-tuple-element(%c), index=0
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

%body (p:""")
  assert plans.collective_bytes(plans.parse_hlo(hlo))['all-reduce'] == 4 * 8 * 16 * 4


@pytest.mark.parametrize('limit,start,expected', [
    (37, 8, 37), (37, 64, 37), (1, 4, 1), (0, 4, 0), (64, 64, 64), (5, 1, 5)])
def test_largest_fitting_finds_the_limit(limit, start, expected):
  tried = []

  def fits(n):
    tried.append(n)
    return n <= limit

  assert plans.largest_fitting(fits, start) == expected
  assert len(tried) <= 2 * max(limit, start).bit_length() + 2  # Logarithmic, not linear.


_NEEDS_LIBTPU = pytest.mark.skipif(
    not _HAS_LIBTPU, reason="libtpu is not installed (pip install '.[tpu]'); it describes TPU "
    'topologies for ahead-of-time compilation on this host.')


def _small_tpu_config(global_batch: int):
  config = tiny.get_config()
  with config.unlocked():
    config.data.dataset = 'synthetic'
    config.data.image_size = 16
    # Width 512: a kernel's quarter fills whole (8, 128) TPU tiles (narrower shards are padded).
    config.capi.model.update(embed_dim=512, num_heads=4, encoder_depth=1, decoder_depth=1,
                             n_registers=4)
    config.capi.num_clusters = 16
    config.train.global_batch_size = global_batch
  return config


@_NEEDS_LIBTPU
def test_tiny_config_compiles_for_a_v5e_slice():
  config = _small_tpu_config(8)
  devices = plans.topology_devices('v5e:2x2')
  assert len(devices) == 4 and devices[0].device_kind == 'TPU v5 lite'
  result = plans.plan(config, 'v5e:2x2', devices)
  assert result['fits'] and result['images_per_chip'] == 2
  assert 0 < result['total_bytes'] <= result['hbm_bytes']
  # `fits` compares with what the TPU compiler lets a program use, not the datasheet's 16 GiB.
  assert result['hbm_bytes'] == round(15.75 * plans.GiB) == plans.usable_hbm_bytes(devices[0])
  assert result['flops_per_chip'] > 0 and result['ideal_step_s'] > 0
  # Parameters, EMA and optimiser state stay sharded over the 4 chips (fsdp): a chip's
  # arguments hold a quarter of the state, and the blocks gather their weights.
  abstract = state_lib.state_layout(
      config, methods.from_config(config), sharding.make_mesh(config, jax.devices()[:1])).abstract
  state_bytes = sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(abstract))
  assert result['argument_bytes'] < 0.3 * state_bytes, (result['argument_bytes'], state_bytes)
  assert result['collective_bytes'].get('all-gather', 0) > 0
  assert result['slices'] == 1 and result['dcn_bytes_total'] == 0
  # Scanned blocks: XLA counts a while loop's body once; the plan counts them looped.
  with config.unlocked():
    config.capi.model.update(encoder_depth=3, decoder_depth=2)
    config.efficiency.scan_layers = True
  scanned = plans.step_flops(config, devices)
  with config.unlocked():
    config.efficiency.scan_layers = False
  assert scanned == plans.step_flops(config, devices)
  compiled = plans.compile_train_step(config, devices).cost_analysis()
  assert abs(scanned / compiled['flops'] - 1) < 0.05, (scanned, compiled['flops'])


@_NEEDS_LIBTPU
def test_splash_attention_compiles_into_the_tpu_step():
  """With `efficiency.attention='splash'` the Mosaic kernels are in the compiled HLO (forward,
  dq and dkv of the encoder's self-attention and the predictor's cross-attention with a few
  queries), and the plan counts FLOPs on XLA's attention (a custom call counts nothing)."""
  config = _small_tpu_config(8)
  with config.unlocked():
    config.efficiency.attention = 'splash'
  devices = plans.topology_devices('v5e:2x2')
  lowered = plans.lower_train_step(config, devices)
  hlo = lowered.compile().as_text()
  assert hlo.count('custom_call_target="tpu_custom_call"') >= 6, 'fwd + dq + dkv, 2 stacks'
  assert 'splash_mha' in hlo
  with config.unlocked():
    config.efficiency.attention = 'xla'
  xla_lowered = plans.lower_train_step(config, devices)
  assert 'tpu_custom_call' not in xla_lowered.compile().as_text()
  with config.unlocked():
    config.efficiency.attention = 'splash'
  assert plans.step_flops(config, devices, lowered) == plans.step_flops(config, devices,
                                                                       xla_lowered)


def _gradient_reductions(hlo: str) -> set[tuple[str, str]]:
  """(dtype, dims) of every weight-matrix-shaped operand (2-D, both sides >= 512) of the
  all-reduces and reduce-scatters in compiled HLO text."""
  found = set()
  for line in hlo.splitlines():
    m = re.match(r'\s+(?:ROOT )?%[\w.\-]+ = (\(.*?\)|\S+) (all-reduce|reduce-scatter)'
                 r'(-start)?\(', line)
    if m:
      found |= {(dtype, dims) for dtype, dims in re.findall(r'(\w+)\[(\d+,\d+)\]', m.group(1))
                if min(map(int, dims.split(','))) >= 512}
  return found


@_NEEDS_LIBTPU
def test_fsdp_weights_are_all_gathered_on_a_256_chip_v5e():
  """A float32 kernel split over all 256 chips of a v5e:16x16 slice and gathered whole in
  bfloat16 for a matmul (a block's FSDP gather): `step.compile_step` keeps it an all-gather of
  the bfloat16 shards. libtpu's default makes it an all-reduce of each float32 shard padded with
  zeros to the whole kernel (256 x 2 times the bytes)."""
  P = jax.sharding.PartitionSpec  # pylint: disable=invalid-name
  devices = plans.topology_devices('v5e:16x16')
  mesh = jax.sharding.Mesh(np.array(devices), ('fsdp',))
  split = lambda spec: jax.sharding.NamedSharding(mesh, spec)
  kernel = jax.ShapeDtypeStruct((1024, 4096), jnp.float32, sharding=split(P(None, 'fsdp')))
  x = jax.ShapeDtypeStruct((256 * 8, 1024), jnp.bfloat16, sharding=split(P('fsdp')))
  matmul = lambda w, x: x @ jax.lax.with_sharding_constraint(w, split(P())).astype(x.dtype)
  lowered = jax.jit(matmul).lower(kernel, x)

  def collectives(compiled) -> dict[str, int]:
    return {kind: size for kind, size in plans.collective_bytes(
        plans.parse_hlo(compiled.as_text())).items() if size}

  assert collectives(step_lib.compile_step(lowered, 'tpu')) == {'all-gather': 1024 * 16 * 2}
  # The compiler's default (if this fails, libtpu changed it: see `step.TPU_COMPILER_OPTIONS`).
  assert collectives(lowered.compile()) == {'all-reduce': 1024 * 4096 * 4}


@_NEEDS_LIBTPU
def test_a_libtpu_without_the_options_compiles_the_step_without_them(monkeypatch, caplog):
  """An option the TPU compiler does not know fails a compile ('No such compile option'):
  `compile_step` then compiles without the options, with a warning naming them."""
  monkeypatch.setattr(step_lib, 'TPU_COMPILER_OPTIONS', {'xla_tpu_not_an_option': 'true'})
  mesh = jax.sharding.Mesh(np.array(plans.topology_devices('v5e:2x2')), ('fsdp',))
  x = jax.ShapeDtypeStruct((16, 128), jnp.float32,
                           sharding=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(
                               'fsdp')))
  lowered = jax.jit(lambda x: x * 2).lower(x)
  with caplog.at_level('WARNING', logger=step_lib.__name__):
    compiled = step_lib.compile_step(lowered, 'tpu')
  assert compiled.as_text()
  assert "refuses ['xla_tpu_not_an_option'] (INVALID_ARGUMENT: No such compile option" in (
      caplog.text)


@_NEEDS_LIBTPU
def test_weight_gradients_are_reduced_in_reduce_dtype():
  """Computing in bfloat16, the blocks' weight gradients are summed over the chips in
  `efficiency.reduce_dtype`: float32 (the releases'), or bfloat16 when asked."""
  config = _small_tpu_config(8)
  devices = plans.topology_devices('v5e:2x2')
  with config.unlocked():
    config.efficiency.compute_dtype = 'bfloat16'
  dtypes = lambda: {dtype for dtype, _ in _gradient_reductions(
      plans.compile_train_step(config, devices).as_text())}
  assert config.efficiency.reduce_dtype == 'float32'
  assert dtypes() == {'f32'}
  with config.unlocked():
    config.efficiency.reduce_dtype = 'bfloat16'
  assert dtypes() == {'bf16'}


@_NEEDS_LIBTPU
def test_two_slices_fsdp_inside_data_parallel_across():
  config = _small_tpu_config(16)
  with config.unlocked():
    config.sharding.mesh = (('data', 2), ('fsdp', -1))
  devices = plans.topology_devices('v5e:2x2', num_slices=2)
  assert len(devices) == 8 and {d.slice_index for d in devices} == {0, 1}
  with pytest.raises(ValueError, match='span 2 TPU slices'):
    sharding.make_mesh(config, devices)
  with config.unlocked():
    config.sharding.dcn_mesh = (('data', 2),)
  mesh = sharding.make_mesh(config, devices)
  # 'fsdp' runs along one slice's chips, 'data' across the slices.
  assert all(len({d.slice_index for d in row}) == 1 for row in mesh.devices)
  assert [row[0].slice_index for row in mesh.devices] == [0, 1]
  result = plans.plan(config, 'v5e:2x2', devices)
  assert result['slices'] == 2 and result['mesh'] == {'data': 2, 'fsdp': 4}
  # The FSDP gathers and gradient reduce-scatters stay inside a slice; what crosses slices is
  # the all-reduce of each chip's gradient shard (a quarter of the float32 parameters).
  assert result['collective_bytes']['all-gather'] > 0
  assert result['collective_bytes']['reduce-scatter'] > 0
  params = methods.from_config(config).init(jax.random.PRNGKey(0)).params
  param_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
  assert result['dcn_bytes']['all-reduce'] == pytest.approx(param_bytes / 4, rel=0.05)


def test_a_step_the_compiler_refuses_for_hbm_is_reported_as_not_fitting(monkeypatch):
  """Issue 23 item 17: `aot --config=configs/vitl.py --topology=v5e:4x4` ended in a raw
  RESOURCE_EXHAUSTED traceback after 2.5 min instead of the report. (The compiler's refusal is
  stood in for: compiling ViT-L for a v5e needs libtpu and minutes.)"""
  message = ('RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory '
             'space hbm. Used 57.31G of 15.75G hbm. Exceeded hbm capacity by 41.56G.\n'
             'Total hbm usage >= 57.31G: ... HLO temporaries (57.31G) exceeds available HBM '
             '(15.75G)')

  class Refused:
    def compile(self):
      raise jax.errors.JaxRuntimeError(message)

  monkeypatch.setattr(plans, 'lower_train_step', lambda config, devices: Refused())
  config = tiny.get_config()
  config.train.global_batch_size = 16
  result = plans.plan(config, 'v5e:2x2', jax.devices()[:4])
  assert not result['fits'] and result['temporary_bytes'] == round(57.31 * 2**30)
  assert result['hbm_bytes'] == round(15.75 * 2**30)
  text = plans.report(result)
  assert 'DOES NOT FIT' in text and '57.31 GiB of 15.75 GiB HBM' in text
  assert '--find_max_batch' in text
  # Anything else the compiler says is still an error.
  monkeypatch.setattr(Refused, 'compile', lambda self: (_ for _ in ()).throw(
      jax.errors.JaxRuntimeError('INTERNAL: something else')))
  with pytest.raises(jax.errors.JaxRuntimeError, match='something else'):
    plans.plan(config, 'v5e:2x2', jax.devices()[:4])


def _cuda_python() -> str | None:
  """A Python with JAX's CUDA plugin: this one, or the repository's .venv-cuda (a venv layered
  over .venv: a .pth to its site-packages, plus `pip install '.[gpu-plans]'`)."""
  if importlib.util.find_spec('jax_cuda12_plugin') is not None:
    return sys.executable
  layered = pathlib.Path(__file__).parents[1] / '.venv-cuda' / 'bin' / 'python'
  return str(layered) if layered.exists() else None


@pytest.mark.skipif(_cuda_python() is None, reason=(
    "JAX's CUDA plugin is not installed here nor in .venv-cuda (pip install '.[gpu-plans]', "
    'about 1.6 GB): it compiles for NVIDIA GPUs on this host.'))
def test_small_config_compiles_for_h100_nodes_with_cudnn_attention():
  """`aot --topology=h100:2x1` on a 1-block CAPI with cuDNN attention: a plan for two nodes
  of one H100, the cuDNN flash-attention calls in the compiled HLO."""
  overrides = dict(
      topology='h100:2x1', **{'config.data.dataset': 'synthetic', 'config.data.image_size': 16,
      'config.capi.model.encoder_depth': 1, 'config.capi.model.decoder_depth': 1,
      'config.capi.model.embed_dim': 128, 'config.capi.model.num_heads': 2,
      'config.capi.num_clusters': 16, 'config.train.global_batch_size': 8,
      'config.efficiency.compute_dtype': 'bfloat16', 'config.efficiency.attention': 'cudnn'})
  repo = pathlib.Path(__file__).parents[1]
  done = subprocess.run(
      [_cuda_python(), '-m', 'capi_jax.aot', '--config=configs/tiny.py',
       *(f'--{k}={v}' for k, v in overrides.items())],
      cwd=repo, capture_output=True, text=True, timeout=600,
      env={**os.environ, 'JAX_PLATFORMS': 'cpu', 'PYTHONPATH': str(repo)})
  assert done.returncode == 0, done.stderr[-3000:]
  result = json.loads(done.stdout.strip().splitlines()[-1])
  assert result['device_kind'] == hardware.H100_SXM.name and result['chips'] == 2
  assert result['fits'] and result['hbm_bytes'] == hardware.H100_SXM.memory_bytes
  assert result['fused_kernels'].get('__cudnn$fmhaSoftmax', 0) >= 2, result['fused_kernels']
  assert result['fused_kernels'].get('__cudnn$fmhaSoftmaxBackward', 0) >= 2
  assert result['flops_per_chip'] > 0 and result['compile_s'] > 0
  assert result['compile_cpu_s'] > 0
  assert result['collective_bytes'].get('all-gather', 0) > 0  # FSDP across the two nodes.


def test_the_batch_search_keeps_to_batches_the_config_accepts():
  """`--find_max_batch` for ViT-L on h100:1x8 stopped at a batch of 12912 that CAPI's 32
  stochastic-depth groups cannot split: the search now moves in multiples of the fewest images
  per chip the config's checks accept."""
  config = tiny.get_config()
  assert plans.batch_unit(config, 4) == 1
  config.capi.model.drop_path_groups = 8
  assert plans.batch_unit(config, 4) == 2
  config.capi.model.drop_path_groups = 12
  assert plans.batch_unit(config, 8) == 3
