"""Train-step benchmark: throughput, FLOP/s, MFU, peak memory, data pipeline, device scaling.

Run:
  python -m capi_jax.bench --config=configs/bench_cpu.py
  python -m capi_jax.bench --config=configs/vitl.py --steps=20 --warmup=5
  python -m capi_jax.bench --config=configs/tiny.py --smoke          # CI: 2 steps, seconds
  XLA_FLAGS=--xla_force_host_platform_device_count=8 \
      python -m capi_jax.bench --config=configs/bench_cpu.py --scaling  # 1, 2, 4, 8 devices

Builds the config's method, its real train state (born sharded over the devices) and the real
jitted train step (`capi_jax.engine.step`), feeds it one synthetic batch of the config's shape
(the method's own train transform on random-pixel images: its views, crops and masks), compiles
ahead of time, warms up, times `--steps` steps (each waited for with `block_until_ready`) and
prints ONE JSON line on stdout:

  images_per_s, step_time_s (median), step_time_min_s, step_time_mean_s, host_cpu_s_per_step
  (median) and host_cpu_mean_s_per_step, tflops_per_s, mfu, peak_tflops_per_s and
  peak_source, flops_per_step and flops_by_part (the method's analytic count,
  `Method.flops_per_step`), peak_memory_bytes and memory_source, compile_s, device_kind,
  device_count, config, global_batch_size, jax_version, xla_flags, glibc_tunables (huge pages:
  `capi_jax.base.huge_pages`), host_cpus (cores this process may run on, e.g. under
  `taskset`), load_average (host load during the run: CPU timings are only comparable on a
  quiet host), and data_pipeline: the host input pipeline's own throughput
  (`pipeline.measure_throughput`, timed separately), with `bottleneck` naming the slower of
  the two.
See `capi_jax.engine.benchmark` for how MFU and peaks are computed.

`--scaling` runs the same benchmark on the first 1, 2, 4, 8 devices (sub-meshes) with a fixed
per-device batch (weak scaling: global_batch_size / the largest count), and prints one JSON
line with a `scaling` list of per-count results, each with images_per_s_per_device.
`--meshes=fsdp,fsdp:tensor=2` runs each count under each mesh that fits it (measured on the
devices JAX sees: on fake CPU devices, the cost of the meshes' collectives and partitioning,
not an accelerator's speed).
"""

if __name__ == '__main__':  # First, before jax is imported: this may restart the process.
  from capi_jax.base import huge_pages
  huge_pages.reexec_with_huge_pages()

from collections.abc import Sequence
import json

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from capi_jax.base import cli
from capi_jax.engine import benchmark


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
    for count, mesh, sub in benchmark.mesh_configs(
        benchmark.scaling_configs(config, counts, len(devices)), fl.meshes):
      logging.info('Scaling: %d devices, mesh %s, global batch %d', count, mesh,
                   sub.train.global_batch_size)
      runs.append({**benchmark.bench(sub, devices[:count], steps, warmup, fl.peak_tflops),
                   'mesh': mesh})
    result = {'config': config.name, 'scaling': runs,
              'per_device_batch': runs[0]['global_batch_size'] // runs[0]['device_count']}
  else:
    result = benchmark.bench(config, devices, steps, warmup, fl.peak_tflops)
    pipeline = benchmark.data_pipeline(config, data_batches)
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
  flags.DEFINE_list('meshes', [], 'Meshes for --scaling, each on every device count it fits, '
                    "e.g. fsdp,data=2:fsdp,fsdp:tensor=2 (':'-joined AXIS[=SIZE]); default the "
                    "config's.")
  flags.DEFINE_integer('data_batches', 10, 'Batches timed for the data pipeline; 0 skips it.',
                       lower_bound=0)
  flags.DEFINE_float('peak_tflops', None, 'Per-device peak TFLOP/s for MFU; overrides the table.')
  cli.run(main)


if __name__ == '__main__':
  _run_cli()
