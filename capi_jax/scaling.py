r"""Scaling studies without the hardware: models x TPU slices x meshes, planned ahead of time.

Run (on any host, CPU only; needs libtpu: `pip install '.[tpu]'`):
  python -m capi_jax.scaling --config=configs/vitl.py --models=vitl,vith,vitg,vit7b \
      --topologies=v5p:4x4x4,v5p:4x4x8,v5p:8x8x8 --meshes=fsdp,fsdp:tensor=4 \
      --batch_per_device=8 --out=/tmp/scaling

Every (model, topology, mesh) point compiles the engine's real train step for one slice
(engine/scaling.py, on top of `capi_jax.aot`'s plans), one after another (a compile of a large
model holds many GiB of host memory). Each point's result goes to OUT/points.jsonl as soon as
it is known, and points already there are skipped: rerun the same command to resume an
interrupted sweep (--retry_errors retries the points that failed). Then OUT/table.csv,
OUT/table.json, OUT/memory.png (per-chip memory vs model size) and OUT/bounds.png (step-time
bound vs chips, the bottleneck marked) are written from every point.

--models: members of capi_jax/models/family.py (vits, vitb, vitl, vith, vitg, vit7b; CAPI
configs), or `config` for the config's own model. --meshes: ':'-joined AXIS[=SIZE] (no size:
the chips left), e.g. `fsdp`, `data=2:fsdp`, `fsdp:tensor=4`. The global batch is
--batch_per_device x the slice's chips.

The step times reported are BOUNDS from published peak FLOP/s and bandwidths
(`base.hardware`), never measurements: compute, memory (HBM) and interconnect (ICI, DCN), the
largest named the bottleneck.
"""

from collections.abc import Sequence

from absl import app
from absl import flags
from etils import epath
import jax
from ml_collections import config_flags

from capi_jax.base import cli
from capi_jax.base import sharding
from capi_jax.engine import scaling


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  fl = flags.FLAGS
  # Compile-only TPU devices come from libtpu; the host runs nothing, so JAX stays on the CPU.
  jax.config.update('jax_platforms', 'cpu')
  for mesh in fl.meshes:
    sharding.parse_mesh(mesh)  # Fail on a mistyped mesh before the first compile.
  rows = scaling.sweep(fl.config, fl.models, fl.topologies, fl.meshes, fl.batch_per_device,
                       epath.Path(fl.out), retry_errors=fl.retry_errors,
                       log=lambda line: print(line, flush=True))
  print(f'{len(rows)} points in {fl.out}/table.csv (bounds, not measurements).', flush=True)


def _run_cli() -> None:
  """Defines the flags (here, so that importing this module defines none) and runs main."""
  config_flags.DEFINE_config_file('config', None, 'Base config file.', lock_config=True)
  flags.DEFINE_list('models', ['config'], 'Family members (capi_jax/models/family.py) or '
                    '"config".')
  flags.DEFINE_list('topologies', None, 'TPU slices CHIP:GRID, e.g. v5e:4x4,v5p:4x4x4.')
  flags.DEFINE_list('meshes', ['fsdp'], 'Meshes, e.g. fsdp,fsdp:tensor=4,data=2:fsdp.')
  flags.DEFINE_integer('batch_per_device', 8, 'Images per chip.', lower_bound=1)
  flags.DEFINE_string('out', None, 'Directory of the results (resumable).')
  flags.DEFINE_bool('retry_errors', False, 'Plan again the points that failed.')
  flags.mark_flags_as_required(['config', 'topologies', 'out'])
  cli.run(main)


if __name__ == '__main__':
  _run_cli()
