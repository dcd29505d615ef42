"""Stands in for `python -m capi_jax.main` under tests/fake_slurm.py: joins the run, reports.

Called as `launch_probe.py -m capi_jax.main --config=... --workdir=W ...` (the sbatch script's
command line with this file as $PYTHON). It joins the multi-process run as the engine does
(`engine.distributed.initialize`, or JAX's own detection with PROBE_JAX_DETECTION=1), then plays
the GPU runtime: it makes as many CPU devices as the GPUs the process would drive (the ids
`jax_cuda_visible_devices` selects among CUDA_VISIBLE_DEVICES), lays a mesh data-parallel across
processes and FSDP within each (`sharding.dcn_mesh`), and writes what it got to
W/probe_<process id>.json.
"""

import json
import os
import pathlib
import sys

import jax
import ml_collections

from capi_jax.base import sharding
from capi_jax.engine import distributed


def main(argv: list[str]) -> None:
  workdir = pathlib.Path(next(a.split('=', 1)[1] for a in argv if a.startswith('--workdir=')))
  if os.environ.get('PROBE_JAX_DETECTION') == '1':
    jax.distributed.initialize()
  else:
    distributed.initialize()
  selected = jax.config.values['jax_cuda_visible_devices']
  visible = os.environ['CUDA_VISIBLE_DEVICES'].split(',')
  gpu_ids = list(range(len(visible))) if selected == 'all' else [int(i) for i in
                                                                 selected.split(',')]
  jax.config.update('jax_num_cpu_devices', len(gpu_ids))
  # Data parallel across processes (the DCN granules off TPU), FSDP within each.
  n = jax.process_count()
  mesh = sharding.make_mesh(ml_collections.ConfigDict({'sharding': {
      'mesh': (('data', n), ('fsdp', -1)), 'dcn_mesh': (('data', n),)}}))
  report = {
      'process_index': jax.process_index(), 'process_count': jax.process_count(),
      'slurm_procid': int(os.environ['SLURM_PROCID']),
      'node': int(os.environ['SLURM_NODEID']),
      'coordinator': jax._src.distributed.global_state.coordinator_address,  # pylint: disable=protected-access
      'gpus': [visible[i] for i in gpu_ids], 'local_device_count': jax.local_device_count(),
      'device_count': jax.device_count(), 'argv': argv,
      'mesh_rows': [[d.process_index for d in row] for row in mesh.devices],
  }
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / f'probe_{report["process_index"]}.json').write_text(json.dumps(report))


if __name__ == '__main__':
  main(sys.argv[1:])
