"""What the hardware can do, from the vendors' published figures (no project imports).

Dense bf16 peak FLOP/s per device (datasheets, no sparsity), for model FLOPs utilisation (MFU)
and ideal step times; NVIDIA GPUs' facts, from which XLA compiles for them without one.
"""

import dataclasses
import importlib.metadata

import jax.numpy as jnp

# Dense bf16 peak FLOP/s per device (vendor datasheets, no sparsity), keyed by a substring of
# `device.device_kind`; first match wins, so the more specific names come first.
PEAK_BF16_FLOPS = (
    ('H100 PCIe', 756e12),
    ('H100 NVL', 835e12),
    ('H100', 989e12),  # SXM, e.g. 'NVIDIA H100 80GB HBM3'.
    ('H200', 989e12),
    ('GH200', 989e12),
    ('A100', 312e12),
    ('TPU v4', 275e12),
    ('TPU v5 lite', 197e12),  # v5e.
    ('TPU v5e', 197e12),
    ('TPU v5p', 459e12),
    ('TPU v5', 459e12),  # v5p reports 'TPU v5'.
    ('TPU v6 lite', 918e12),  # v6e (Trillium).
    ('TPU v6e', 918e12),
)

# Bandwidths per TPU chip, bytes/s, from Google Cloud's TPU pages (docs.cloud.google.com/tpu/
# docs/{v4,v5e,v5p,v6e}), for step-time bounds of compiled plans (`engine.scaling`):
#   hbm  HBM bandwidth per chip;
#   ici  bidirectional inter-chip interconnect bandwidth per chip (all links, both ways);
#   dcn  data centre network bandwidth per chip (v5p: 50 Gbps per chip; v5e: a host's 2 x
#        100 Gbps NICs over its 8 chips); None where no page gives it.
TPU_BANDWIDTH = {
    'v4': {'hbm': 1200e9, 'ici': None, 'dcn': None},
    'v5e': {'hbm': 819e9, 'ici': 400e9, 'dcn': 200e9 / 8 / 8},
    'v5p': {'hbm': 2765e9, 'ici': 1200e9, 'dcn': 50e9 / 8},
    'v6e': {'hbm': 1638e9, 'ici': 800e9, 'dcn': None},
}


def table_peak_flops(device_kind: str, compute_dtype: str) -> float | None:
  """Per-device datasheet peak for bf16 compute, or None (other dtypes, unknown devices)."""
  if jnp.dtype(compute_dtype) != jnp.bfloat16:
    return None
  return next((peak for name, peak in PEAK_BF16_FLOPS if name in device_kind), None)


# ---------------------------------------------------------------------------- NVIDIA GPUs
@dataclasses.dataclass(frozen=True)
class GpuFacts:
  """An NVIDIA GPU's published facts: what XLA's GPU compiler needs to compile for it on a
  host without one (`gpu_target_config`), and the memory a plan compares against."""
  name: str  # `device_kind` of the compile-only devices.
  compute_capability: tuple[int, int]
  sm_count: int
  fp32_units_per_sm: int
  clock_ghz: float  # Boost clock.
  memory_bytes: int  # HBM capacity.
  memory_bandwidth: int  # Bytes per second.
  l2_cache_bytes: int
  shared_memory_per_sm: int
  shared_memory_per_block_optin: int  # Dynamic shared memory a block may opt in to.
  shared_memory_per_block: int = 48 * 1024  # Static limit, every CC >= 7.0.
  registers_per_sm: int = 64 * 1024
  registers_per_block: int = 64 * 1024
  threads_per_sm: int = 2048
  threads_per_block: int = 1024


# H100 SXM5 80GB data sheet and the CUDA programming guide's CC 9.0 table (228 KiB shared
# memory per SM, 227 KiB per block opt-in): 132 SMs x 128 FP32 units at 1.98 GHz, 80 GB HBM3
# at 3.35 TB/s, 50 MB L2.
H100_SXM = GpuFacts(
    name='NVIDIA H100 80GB HBM3', compute_capability=(9, 0), sm_count=132,
    fp32_units_per_sm=128, clock_ghz=1.98, memory_bytes=80 * 2 ** 30,
    memory_bandwidth=3_350_000_000_000, l2_cache_bytes=50 * 2 ** 20,
    shared_memory_per_sm=228 * 1024, shared_memory_per_block_optin=227 * 1024)
# H200 SXM: the H100's GH100 with 141 GB HBM3e at 4.8 TB/s.
H200 = dataclasses.replace(H100_SXM, name='NVIDIA H200 141GB HBM3e', memory_bytes=141 * 10 ** 9,
                           memory_bandwidth=4_800_000_000_000)
# A100 SXM4 80GB data sheet and the CC 8.0 table (164 KiB per SM, 163 KiB per block opt-in):
# 108 SMs x 64 FP32 units at 1.41 GHz, 80 GB HBM2e at 2.039 TB/s, 40 MB L2.
A100_80GB = GpuFacts(
    name='NVIDIA A100-SXM4-80GB', compute_capability=(8, 0), sm_count=108,
    fp32_units_per_sm=64, clock_ghz=1.41, memory_bytes=80 * 2 ** 30,
    memory_bandwidth=2_039_000_000_000, l2_cache_bytes=40 * 2 ** 20,
    shared_memory_per_sm=164 * 1024, shared_memory_per_block_optin=163 * 1024)
GPUS = {'h100': H100_SXM, 'h200': H200, 'a100': A100_80GB}
# CUDA runtime and cuDNN versions written into a target when their wheels are not installed
# (jax-cuda12-plugin 0.10.2's: CUDA 12.9, cuDNN 9.28). They do not change the compiled plan.
_CUDA_VERSION, _CUDNN_VERSION = (12, 9, 79), (9, 28, 0)


def _wheel_version(package: str, default: tuple[int, int, int]) -> tuple[int, int, int]:
  try:
    major, minor, patch = importlib.metadata.version(package).split('.')[:3]
  except (importlib.metadata.PackageNotFoundError, ValueError):
    return default
  return int(major), int(minor), int(patch)


def gpu_target_config(facts: GpuFacts) -> str:
  """XLA's GpuTargetConfigProto (text format) for `facts`: the device description XLA's GPU
  compiler reads instead of querying a device.

  Every field is written: without `threads_per_warp` or `block_dim_limit_x` the compiler
  crashes; SM count, FP32 units, clock, bandwidth, L2 and memory size each change the plan.
  """
  f = facts
  cuda = _wheel_version('nvidia-cuda-runtime-cu12', _CUDA_VERSION)
  cudnn = _wheel_version('nvidia-cudnn-cu12', _CUDNN_VERSION)
  dotted = lambda v: '.'.join(map(str, v))
  info = '\n  '.join([
      f'threads_per_block_limit: {f.threads_per_block}', 'threads_per_warp: 32',
      f'shared_memory_per_block: {f.shared_memory_per_block}',
      f'shared_memory_per_core: {f.shared_memory_per_sm}',
      f'threads_per_core_limit: {f.threads_per_sm}', f'core_count: {f.sm_count}',
      f'fpus_per_core: {f.fp32_units_per_sm}', 'block_dim_limit_x: 2147483647',
      'block_dim_limit_y: 65535', 'block_dim_limit_z: 65535',
      f'memory_bandwidth: {f.memory_bandwidth}', f'l2_cache_size: {f.l2_cache_bytes}',
      f'clock_rate_ghz: {f.clock_ghz}', f'device_memory_size: {f.memory_bytes}',
      f'shared_memory_per_block_optin: {f.shared_memory_per_block_optin}',
      'cuda_compute_capability {{ major: {} minor: {} }}'.format(*f.compute_capability),
      f'registers_per_core_limit: {f.registers_per_sm}',
      f'registers_per_block_limit: {f.registers_per_block}',
      'thread_dim_limit_x: 1024', 'thread_dim_limit_y: 1024', 'thread_dim_limit_z: 64',
      'device_vendor: "NVIDIA Corporation"', f'name: "{f.name}"',
      f'runtime_version: "{dotted(cuda)}"', f'compile_time_toolkit_version: "{dotted(cuda)}"',
      f'dnn_version: "{dotted(cudnn)}"'])
  version = lambda v: 'major: {} minor: {} patch: {}'.format(*v)
  return (f'gpu_device_info {{\n  {info}\n}}\nplatform_name: "CUDA"\n'
          f'dnn_version_info {{ {version(cudnn)} }}\nruntime_version {{ {version(cuda)} }}\n'
          f'device_description_str: "{f.name}"\n')
