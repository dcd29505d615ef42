r"""Train-step benchmark: throughput, FLOP/s, MFU, peak memory, data pipeline, device scaling.

Run:
  python -m capi_jax.bench --config=configs/bench_cpu.py
  python -m capi_jax.bench --config=configs/vitl.py --steps=20 --warmup=5
  python -m capi_jax.bench --config=configs/tiny.py --smoke          # CI: 2 steps, seconds
  XLA_FLAGS=--xla_force_host_platform_device_count=8 \
      python -m capi_jax.bench --config=configs/bench_cpu.py --scaling  # 1, 2, 4, 8 devices

Builds the config's method, its real train state (born sharded over the devices) and the real
jitted train step (`capi_jax.core.step`), feeds it one synthetic batch of the config's shape
(the method's own train transform on random-pixel images: its views, crops and masks), compiles
ahead of time, warms up, times `--steps` steps (each waited for with `block_until_ready`) and
prints ONE JSON line on stdout:

  images_per_s, step_time_s (median), step_time_min_s, step_time_mean_s, host_cpu_s_per_step
  (median) and host_cpu_mean_s_per_step, tflops_per_s, mfu, peak_tflops_per_s and
  peak_source, flops_per_step and flops_by_part (the method's analytic count,
  `Method.flops_per_step`), peak_memory_bytes and memory_source, compile_s, device_kind,
  device_count, config, global_batch_size, jax_version, xla_flags, glibc_tunables (huge pages:
  `capi_jax.core.huge_pages`), host_cpus (cores this process may run on, e.g. under
  `taskset`), load_average (host load during the run: CPU timings are only comparable on a
  quiet host), and data_pipeline: the host input pipeline's own throughput
  (`pipeline.measure_throughput`, timed separately), with `bottleneck` naming the slower of
  the two.

MFU = flops_per_step / step_time / (peak FLOP/s of one device x device count). Peaks are the
vendors' dense bf16 figures (`PEAK_BF16_FLOPS`), used only for bf16 compute. On CPU there is
no datasheet figure to trust, so the peak is *measured*: the FLOP/s of a large jitted matmul in
the compute dtype; all host-platform devices share the same cores, so the peak is the host's,
not multiplied by the device count. Elsewhere (float32 on an accelerator, an unknown device)
mfu is null unless `--peak_tflops` gives the per-device peak.

`--scaling` runs the same benchmark on the first 1, 2, 4, 8 devices (sub-meshes) with a fixed
per-device batch (weak scaling: global_batch_size / the largest count), and prints one JSON
line with a `scaling` list of per-count results, each with images_per_s_per_device.
"""

if __name__ == '__main__':  # First, before jax is imported: this may restart the process.
  from capi_jax.core import huge_pages
  huge_pages.reexec_with_huge_pages()

from collections.abc import Sequence
import json
import os
import statistics
import time
from typing import Any

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_flags
import grain
import numpy as np

from capi_jax import methods
from capi_jax.core import cli
from capi_jax.core import sharding
from capi_jax.core import state as state_lib
from capi_jax.core import step as step_lib
from capi_jax.data import pipeline
from capi_jax.data import sources
from capi_jax.data import transforms
from capi_jax.models import flops

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
_CPU_PEAK_MATMUL_SIZE = 2048


def table_peak_flops(device_kind: str, compute_dtype: str) -> float | None:
  """Per-device datasheet peak for bf16 compute, or None (other dtypes, unknown devices)."""
  if jnp.dtype(compute_dtype) != jnp.bfloat16:
    return None
  return next((peak for name, peak in PEAK_BF16_FLOPS if name in device_kind), None)


def measure_matmul_flops(device: jax.Device, dtype: str, size: int = _CPU_PEAK_MATMUL_SIZE,
                         repeats: int = 5) -> float:
  """FLOP/s of the best of `repeats` jitted (size, size) @ (size, size) matmuls on `device`."""
  a = jax.device_put(jnp.ones((size, size), dtype), device)
  matmul = jax.jit(lambda x: x @ x)
  matmul(a).block_until_ready()
  best = float('inf')
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(a).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return flops.matmul_flops(size, size, size) / best


def peak_flops(devices: Sequence[jax.Device], compute_dtype: str, peak_tflops: float | None = None
               ) -> tuple[float | None, str]:
  """(peak FLOP/s of all `devices` together, where it comes from), or (None, why not).

  `peak_tflops`, when given, is the per-device peak and overrides the table.
  """
  kind = devices[0].device_kind
  if peak_tflops is not None:
    return peak_tflops * 1e12 * len(devices), 'flag --peak_tflops x device_count'
  if devices[0].platform == 'cpu':
    # Host-platform devices share the host's cores: the host's peak, whatever the count.
    return (measure_matmul_flops(devices[0], compute_dtype),
            f'measured: {_CPU_PEAK_MATMUL_SIZE}^3 {compute_dtype} matmul on this host')
  peak = table_peak_flops(kind, compute_dtype)
  if peak is None:
    return None, f'no {compute_dtype} peak known for {kind!r}; pass --peak_tflops'
  return peak * len(devices), f'datasheet dense bf16 {peak / 1e12:g} TFLOP/s x device_count'


def synthetic_batch(config: ml_collections.ConfigDict, transform: grain.transforms.RandomMap,
                    seed: int = 0) -> dict[str, np.ndarray]:
  """A host batch of the config's shape: the method's own transform (views, crops, masks) on
  random-pixel images (`synthetic` source), global_batch_size examples stacked."""
  source = sources.SyntheticSource(max(transforms.image_shape(config)))
  rng = np.random.default_rng(seed)
  examples = [transform.random_map(sources.decode(source[i]), rng)
              for i in range(config.optim.global_batch_size)]
  return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


def peak_memory(compiled: Any, devices: Sequence[jax.Device]) -> tuple[int | None, str]:
  """(peak bytes on one device, source): the allocator's high-water mark where the backend
  keeps one (GPU, TPU), else XLA's static estimate for the compiled step (arguments +
  outputs - donated aliases + temporaries, per device)."""
  stats = [d.memory_stats() for d in devices]
  if all(s and 'peak_bytes_in_use' in s for s in stats):
    return max(int(s['peak_bytes_in_use']) for s in stats), 'device.memory_stats peak_bytes_in_use'
  analysis = compiled.memory_analysis()
  if analysis is None:
    return None, 'not reported by this backend'
  total = (analysis.argument_size_in_bytes + analysis.output_size_in_bytes
           - analysis.alias_size_in_bytes + analysis.temp_size_in_bytes)
  return int(total), 'compiled.memory_analysis (arguments + outputs - aliased + temporaries)'


def time_train_step(config: ml_collections.ConfigDict, devices: Sequence[jax.Device],
                    steps: int, warmup: int) -> dict[str, Any]:
  """Compiles the real train step on a mesh of `devices` and times it.

  Returns:
    step_time_s (median), step_time_min_s, host_cpu_s_per_step (median process CPU time: on
    the CPU backend, the core-seconds a step costs, which other processes on the host do not
    inflate the way they inflate wall time), compile_s, peak_memory_bytes, memory_source.
  """
  method = methods.from_config(config)
  mesh = sharding.make_mesh(config, devices)
  state, layout = state_lib.create_state(config, method, mesh,
                                         jax.random.PRNGKey(config.train.seed))
  step_fn = step_lib.jit_train_step(method, layout, mesh)
  batch = jax.device_put(synthetic_batch(config, method.train_transform(), config.train.seed),
                         sharding.batch_sharding(mesh))

  start = time.perf_counter()
  compiled = step_fn.lower(state, batch).compile()
  compile_s = time.perf_counter() - start
  for _ in range(warmup):
    state, metrics = compiled(state, batch)
  jax.block_until_ready((state, metrics) if warmup else state)

  times, cpu_times = [], []
  for _ in range(steps):
    start, cpu_start = time.perf_counter(), time.process_time()
    state, metrics = compiled(state, batch)
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - start)
    cpu_times.append(time.process_time() - cpu_start)
  loss_key = method.loss_keys[0]
  loss = float(metrics[loss_key])
  if not np.isfinite(loss):
    raise FloatingPointError(f'{loss_key} is {loss} after {warmup + steps} steps: the benchmarked '
                             'step is broken, its timings would mean nothing.')
  memory, memory_source = peak_memory(compiled, devices)
  return {'step_time_s': statistics.median(times), 'step_time_min_s': min(times),
          'step_time_mean_s': statistics.mean(times),
          'host_cpu_s_per_step': statistics.median(cpu_times),
          'host_cpu_mean_s_per_step': statistics.mean(cpu_times), 'compile_s': compile_s,
          'peak_memory_bytes': memory, 'memory_source': memory_source}


def bench(config: ml_collections.ConfigDict, devices: Sequence[jax.Device], steps: int,
          warmup: int, peak_tflops: float | None = None) -> dict[str, Any]:
  """The train-step benchmark on `devices`, as one JSON-able dict (see the module docstring)."""
  timing = time_train_step(config, devices, steps, warmup)
  flops_by_part = methods.from_config(config).flops_per_step()
  step_flops = flops_by_part.pop('total')
  batch = config.optim.global_batch_size
  flops_per_s = step_flops / timing['step_time_s']
  peak, peak_source = peak_flops(devices, config.efficiency.compute_dtype, peak_tflops)
  return {
      'config': config.name,
      'images_per_s': batch / timing['step_time_s'],
      'images_per_s_per_device': batch / timing['step_time_s'] / len(devices),
      'step_time_s': timing['step_time_s'],
      'step_time_min_s': timing['step_time_min_s'],
      'step_time_mean_s': timing['step_time_mean_s'],
      'host_cpu_s_per_step': timing['host_cpu_s_per_step'],
      'host_cpu_mean_s_per_step': timing['host_cpu_mean_s_per_step'],
      'tflops_per_s': flops_per_s / 1e12,
      'mfu': None if peak is None else flops_per_s / peak,
      'peak_tflops_per_s': None if peak is None else peak / 1e12,
      'peak_source': peak_source,
      'flops_per_step': step_flops,
      'flops_by_part': flops_by_part,
      'peak_memory_bytes': timing['peak_memory_bytes'],
      'memory_source': timing['memory_source'],
      'compile_s': timing['compile_s'],
      'global_batch_size': batch,
      'compute_dtype': config.efficiency.compute_dtype,
      'remat_policy': config.efficiency.remat_policy,
      'steps': steps,
      'warmup': warmup,
      'device_kind': devices[0].device_kind,
      'device_count': len(devices),
      'platform': devices[0].platform,
      'jax_version': jax.__version__,
      'xla_flags': os.environ.get('XLA_FLAGS', ''),
      'glibc_tunables': os.environ.get('GLIBC_TUNABLES', ''),
      'host_cpus': len(os.sched_getaffinity(0)),
      'load_average': os.getloadavg()[0],
  }


def data_pipeline(config: ml_collections.ConfigDict, num_batches: int) -> dict[str, Any] | None:
  """The host input pipeline's throughput on its own (None when num_batches is 0)."""
  if num_batches <= 0:
    return None
  return pipeline.measure_throughput(config, methods.from_config(config).train_transform(),
                                     num_batches=num_batches, warmup_batches=1)


def scaling_configs(config: ml_collections.ConfigDict, counts: Sequence[int],
                    n_available: int) -> list[tuple[int, ml_collections.ConfigDict]]:
  """(device count, config) for weak scaling: per-device batch fixed, counts JAX can give."""
  counts = sorted(c for c in set(counts) if c <= n_available)
  if not counts:
    raise ValueError(f'None of --device_counts fits the {n_available} devices JAX sees.')
  per_device = config.optim.global_batch_size // counts[-1]
  if per_device == 0:
    raise ValueError(f'global_batch_size={config.optim.global_batch_size} is smaller than '
                     f'{counts[-1]} devices; raise it or lower --device_counts.')
  result = []
  for count in counts:
    sub = config.copy_and_resolve_references()
    with sub.unlocked():
      sub.optim.global_batch_size = per_device * count
    result.append((count, sub))
  return result


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  fl = flags.FLAGS
  config = fl.config
  if config is None:
    raise app.UsageError('Pass --config=configs/<name>.py.')
  steps, warmup, data_batches = fl.steps, fl.warmup, fl.data_batches
  if fl.smoke:
    steps, warmup, data_batches = 2, 1, min(data_batches, 2)
  devices = jax.devices()

  if fl.scaling:
    counts = [int(c) for c in fl.device_counts]
    runs = []
    for count, sub in scaling_configs(config, counts, len(devices)):
      logging.info('Scaling: %d devices, global batch %d', count, sub.optim.global_batch_size)
      runs.append(bench(sub, devices[:count], steps, warmup, fl.peak_tflops))
    result = {'config': config.name, 'scaling': runs,
              'per_device_batch': runs[0]['global_batch_size'] // runs[0]['device_count']}
  else:
    result = bench(config, devices, steps, warmup, fl.peak_tflops)
    pipeline = data_pipeline(config, data_batches)
    result['data_pipeline'] = pipeline
    if pipeline is not None:
      result['bottleneck'] = ('data_pipeline' if pipeline['images_per_s'] < result['images_per_s']
                              else 'train_step')
  print(json.dumps(result), flush=True)


def _run_cli() -> None:
  """Defines the flags (here, so that importing this module defines none) and runs main."""
  config_flags.DEFINE_config_file('config', None, 'Config file.', lock_config=True)
  flags.DEFINE_integer('steps', 20, 'Timed train steps.', lower_bound=1)
  flags.DEFINE_integer('warmup', 3, 'Untimed steps after compilation.', lower_bound=0)
  flags.DEFINE_bool('smoke', False, 'CI mode: 2 timed steps, 1 warm-up, 2 data batches.')
  flags.DEFINE_bool('scaling', False, 'Benchmark on sub-meshes of --device_counts.')
  flags.DEFINE_list('device_counts', ['1', '2', '4', '8'],
                    'Device counts for --scaling (those above the number of devices JAX sees '
                    'are skipped).')
  flags.DEFINE_integer('data_batches', 10, 'Batches timed for the data pipeline; 0 skips it.',
                       lower_bound=0)
  flags.DEFINE_float('peak_tflops', None, 'Per-device peak TFLOP/s for MFU; overrides the table.')
  cli.run(main)


if __name__ == '__main__':
  _run_cli()
