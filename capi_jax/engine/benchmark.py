"""The train-step benchmark: throughput, FLOP/s, MFU, peak memory, data pipeline, scaling.

`bench` builds the config's method, its real train state (born sharded over the devices) and
the real jitted train step (`engine.step`), feeds it one synthetic batch of the config's shape
(the method's own train transform on random-pixel images: its views, crops and masks), compiles
ahead of time, warms up and times steps (each waited for with `block_until_ready`); the result
is one JSON-able dict (`python -m capi_jax.bench` prints it; its docstring lists the keys).

MFU = flops_per_step / step_time / (peak FLOP/s of one device x device count). Peaks are the
vendors' dense bf16 figures (`base.hardware`), used only for bf16 compute. On CPU there is no
datasheet figure to trust, so the peak is *measured*: the FLOP/s of a large jitted matmul in
the compute dtype; all host-platform devices share the same cores, so the peak is the host's,
not multiplied by the device count. Elsewhere (float32 on an accelerator, an unknown device)
mfu is None unless a per-device peak is given.
"""

from collections.abc import Sequence
import os
import statistics
import time
from typing import Any

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from capi_jax import methods
from capi_jax.base import hardware
from capi_jax.base import sharding
from capi_jax.data import pipeline
from capi_jax.data import sources
from capi_jax.data import transforms
from capi_jax.engine import state as state_lib
from capi_jax.engine import step as step_lib

_CPU_PEAK_MATMUL_SIZE = 2048


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
  return 2 * size ** 3 / best


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
  peak = hardware.table_peak_flops(kind, compute_dtype)
  if peak is None:
    return None, f'no {compute_dtype} peak known for {kind!r}; pass --peak_tflops'
  return peak * len(devices), f'datasheet dense bf16 {peak / 1e12:g} TFLOP/s x device_count'


def synthetic_batch(config: ml_collections.ConfigDict, transform: grain.transforms.RandomMap,
                    seed: int = 0) -> dict[str, np.ndarray]:
  """A host batch of the config's shape: the method's own transform (views, crops, masks) on
  random-pixel images (`synthetic` source), global_batch_size examples stacked."""
  source = sources.SyntheticSource(max(transforms.image_shape(config)))
  rng = np.random.default_rng(seed)
  # Records carry their dataset index, as the training pipeline gives them.
  examples = [transform.random_map({**sources.decode(source[i]), 'index': np.int32(i)}, rng)
              for i in range(config.train.global_batch_size)]
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
                         sharding.batch_sharding(mesh, layout.logical_rules))

  start = time.perf_counter()
  compiled = step_lib.compile_step(step_fn.lower(state, batch), devices[0].platform)
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
  batch = config.train.global_batch_size
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
  per_device = config.train.global_batch_size // counts[-1]
  if per_device == 0:
    raise ValueError(f'global_batch_size={config.train.global_batch_size} is smaller than '
                     f'{counts[-1]} devices; raise it or lower --device_counts.')
  result = []
  for count in counts:
    sub = config.copy_and_resolve_references()
    with sub.unlocked():
      sub.train.global_batch_size = per_device * count
    result.append((count, sub))
  return result


def mesh_configs(runs: Sequence[tuple[int, ml_collections.ConfigDict]], meshes: Sequence[str]
                 ) -> list[tuple[int, str, ml_collections.ConfigDict]]:
  """(device count, mesh, config) of every run under every mesh (`sharding.parse_mesh` specs,
  e.g. 'fsdp:tensor=2') that the count divides into; no meshes: the configs' own."""
  if not meshes:
    return [(count, sharding.mesh_label(c.sharding.mesh), c) for count, c in runs]
  result = []
  for count, c in runs:
    for text in meshes:
      mesh = sharding.parse_mesh(text)
      try:
        sharding.mesh_shape(mesh, count)
      except ValueError:
        continue  # e.g. a tensor axis of 2 on 1 device.
      sub = c.copy_and_resolve_references()
      with sub.unlocked():
        sub.sharding.mesh = mesh
      result.append((count, text, sub))
  return result

