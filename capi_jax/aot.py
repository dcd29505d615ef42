"""Pod plans without a pod: compile the real train step ahead of time for a TPU topology or
NVIDIA GPU nodes.

Run (on any host, CPU only; needs libtpu: `pip install '.[tpu]'`, for GPUs JAX's CUDA plugin:
`pip install '.[gpu-plans]'`):
  python -m capi_jax.aot --config=configs/vitl.py --topology=v5e:4x4
  python -m capi_jax.aot --config=configs/vitl.py --topology=h100:1x8 \
      --config.efficiency.attention=cudnn
  python -m capi_jax.aot --config=configs/vitl.py --topology=v5e:4x4 --find_max_batch
  python -m capi_jax.aot --config=configs/vith.py --topology=v5p:4x4x4 \
      --config.train.global_batch_size=16384

`--topology` is CHIP:GRID with CHIP one of v4, v5e, v5p, v6e and GRID the chip grid of one
slice (v5e:16x16 = 256 chips, v4:2x2x4 = 16 chips), or CHIP one of h100, h200, a100 and GRID
NODESxGPUS (h100:2x8 = two nodes of 8 GPUs; XLA's GPU target is built from the GPUs' published
facts, `base.hardware`). GPU memory excludes cuDNN's workspace and what autotuning on a real
GPU would choose. libtpu describes the topology
(`jax.experimental.topologies`), the config's mesh is laid over its chips, and the engine's own
state layout and jitted step (`state.state_layout`, `step.jit_train_step`) are lowered
for abstract inputs and compiled by the TPU compiler: the executable a pod would run, without
one. The report gives, per chip:
  - memory: arguments (the sharded train state + the batch shard), temporaries, outputs not
    aliased to donated arguments, their total, and the HBM a program may use (on TPUs the
    compiler's own figure, e.g. 15.75 of v5e's 16 GiB; on GPUs the datasheet's): `fits` when
    total <= that HBM;
  - XLA's FLOP count for one step and the ideal step time at the chip's dense bf16 peak
    (`base.hardware.PEAK_BF16_FLOPS`), a lower bound that ignores memory and communication time;
  - collective bytes per step, by kind (all-gather, reduce-scatter, all-reduce, ...): the
    operand sizes of the collectives in the compiled HLO, times their loop trip counts;
  - the fused attention kernels in the compiled HLO (`efficiency.attention`: cuDNN's
    `__cudnn$fmha*` on GPUs, Pallas `tpu_custom_call`s on TPUs) and the compile time: wall
    seconds (`compile_s`) and the process's CPU seconds (`compile_cpu_s`, all compiler threads:
    the steadier figure where other jobs share the host).
`--find_max_batch` compiles at doubled / halved global batches (multiples of the chip count)
until it brackets the largest batch that fits, then bisects to one image per chip.

Several slices (multi-slice over the data centre network): `--num_slices=2` with the mesh axis
that crosses slices named in `sharding.dcn_mesh`, e.g.
  python -m capi_jax.aot --config=configs/vitl.py --topology=v5e:16x16 --num_slices=2 \
      --config.sharding.mesh="(('data', 2), ('fsdp', -1))" \
      --config.sharding.dcn_mesh="(('data', 2),)" --config.train.global_batch_size=16384
compiles one slice's program (FSDP inside the slice, data parallel across); collectives are then
inside each slice, and the bytes a chip sends to other slices per step are reported apart.

Prints a readable report, then one JSON line with every number.
"""

from collections.abc import Sequence
import json

from absl import app
from absl import flags
import jax
from ml_collections import config_flags

from capi_jax.base import cli
from capi_jax.engine import config_checks
from capi_jax.engine import plans


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  fl = flags.FLAGS
  config, topology = fl.config, fl.topology
  # Compile-only TPU devices come from libtpu; the host runs nothing, so JAX stays on the CPU.
  jax.config.update('jax_platforms', 'cpu')
  devices = plans.topology_devices(topology, fl.num_slices)
  config_checks.validate(config, len(devices))
  if not fl.find_max_batch:
    result = plans.plan(config, topology, devices)
    print(plans.report(result), flush=True)
    print(json.dumps(result), flush=True)
    return
  largest, compiled = plans.find_max_batch(config, topology, devices)
  for p in compiled:
    print(plans.report(p), flush=True)
  asked = config.train.global_batch_size
  print(f'global batch {asked} {"fits" if largest >= asked else "does not fit"}: the largest '
        f'batch that fits is {largest} ({largest // len(devices)} per chip) on {topology}.',
        flush=True)
  print(json.dumps({'largest_fitting_batch': largest, 'plans': compiled}), flush=True)


def _run_cli() -> None:
  """Defines the flags (here, so that importing this module defines none) and runs main."""
  config_flags.DEFINE_config_file('config', None, 'Config file.', lock_config=True)
  flags.DEFINE_string('topology', None, 'CHIP:GRID, e.g. v5e:4x4, v4:2x2x4, v5p:4x4x4, v6e:16x16, '
                      'or GPU:NODESxGPUS, e.g. h100:1x8, h200:2x8, a100:1x8.')
  flags.DEFINE_bool('find_max_batch', False, 'Search the largest global batch that fits in HBM.')
  flags.DEFINE_integer('num_slices', 1, 'Slices of --topology, joined over the data centre '
                       'network (set --config.sharding.dcn_mesh to match).', lower_bound=1)
  flags.mark_flags_as_required(['config', 'topology'])
  cli.run(main)


if __name__ == '__main__':
  _run_cli()
