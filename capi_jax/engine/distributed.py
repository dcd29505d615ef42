"""Multi-process start: which arguments `jax.distributed.initialize` gets, from the environment.

Three ways a run is launched as several processes (`launch/`):
  - explicit (launch/local_multiprocess.py, any launcher): JAX_COORDINATOR_ADDRESS,
    JAX_NUM_PROCESSES, JAX_PROCESS_ID;
  - SLURM (launch/slurm_gpu.sbatch), more than one task: the coordinator is the first host of
    the step's node list, the process id is SLURM_PROCID, and the GPUs of a node are shared
    out among its tasks (`local_device_ids`, below);
  - Cloud TPU pods (launch/tpu_pod.sh sets CAPI_JAX_DISTRIBUTED=1): `jax.distributed.initialize()`
    finds the workers itself; JAX never restricts a TPU process's devices.
A single process (none of the above) initialises nothing.

Why not JAX's own SLURM detection: with `local_device_ids` unset it gives every task
`[SLURM_LOCALID]`, one GPU, so a launch of one task per node drives one GPU of eight. Here the
arguments are computed in full (all four given, detection off), and a node's GPUs go to its
tasks as follows, with `visible` the GPUs a task sees (CUDA_VISIBLE_DEVICES) and `on_node` the
GPUs allocated on its node (SLURM_GPUS_ON_NODE, else `visible`):
  - one task on the node: all of them;
  - the task sees fewer than the node has (SLURM bound GPUs to tasks, `--gpus-per-task`): all
    it sees;
  - every task sees all of the node's GPUs: task L of T gets the L-th block of on_node / T.
JAX_LOCAL_DEVICE_IDS, when set, overrides that (as it does in JAX).
"""

from collections.abc import Mapping
import dataclasses
import logging
import os
import re
from typing import Any

import jax

from capi_jax.base import errors

logger = logging.getLogger(__name__)

# SLURM jobs without JAX_COORDINATOR_PORT: a port in the ephemeral range derived from the job id,
# the same on every task (the range JAX's own SLURM detection uses).
_PORT_BASE, _PORT_SPAN = 65536 - 4096, 4096


@dataclasses.dataclass(frozen=True)
class InitArgs:
  """What `jax.distributed.initialize` is called with, and how the launch was recognised."""
  launcher: str  # 'explicit', 'slurm' or 'cloud_tpu'.
  kwargs: dict[str, Any]


def first_host(nodelist: str) -> str:
  """The first host name of a SLURM host list: 'gpu[003-010,012],login1' -> 'gpu003'."""
  match = re.match(r'([^,\[]*)(?:\[([^\],-]+))?', nodelist.strip())
  if not match or not match.group(1) + (match.group(2) or ''):
    raise errors.UserError(f'Cannot read a host name from SLURM_STEP_NODELIST={nodelist!r}.')
  return match.group(1) + (match.group(2) or '')


def tasks_per_node(spec: str) -> list[int]:
  """SLURM's compressed task counts per node: '8(x2),4' -> [8, 8, 4]."""
  counts = []
  for part in filter(None, spec.split(',')):
    match = re.fullmatch(r'(\d+)(?:\(x(\d+)\))?', part.strip())
    if not match:
      raise errors.UserError(f'Cannot read SLURM tasks per node from {spec!r}.')
    counts += [int(match.group(1))] * int(match.group(2) or 1)
  return counts


def slurm_local_device_ids(tasks_on_node: int, local_id: int, visible: int | None,
                           on_node: int | None) -> list[int] | None:
  """The GPU indices (among those the task sees) that one SLURM task drives; None: all.

  See the module docstring for the rules; `visible` / `on_node` are None when unknown (no GPU
  variables: a CPU cluster, where the ids change nothing).
  """
  on_node = visible if on_node is None else on_node
  if tasks_on_node == 1:
    return None if visible is None else list(range(visible))
  if visible is None or on_node is None:
    return [local_id]
  if visible < on_node:
    return list(range(visible))
  if on_node % tasks_on_node:
    raise errors.UserError(
        f'{tasks_on_node} SLURM tasks on a node with {on_node} GPUs, each task seeing all of '
        'them: the GPUs cannot be shared out evenly. Run one task per node (all its GPUs) or one '
        'per GPU (--ntasks-per-node equal to --gpus-per-node).')
  share = on_node // tasks_on_node
  return list(range(local_id * share, (local_id + 1) * share))


def _count(devices: str | None) -> int | None:
  """Number of entries of a CUDA_VISIBLE_DEVICES-style list; None when unset."""
  if devices is None:
    return None
  return len([d for d in devices.split(',') if d.strip()])


def _slurm_args(env: Mapping[str, str]) -> dict[str, Any]:
  node_id = int(env.get('SLURM_NODEID', '0'))
  spec = env.get('SLURM_STEP_TASKS_PER_NODE') or env.get('SLURM_TASKS_PER_NODE')
  counts = tasks_per_node(spec) if spec else []
  tasks_on_node = counts[node_id] if node_id < len(counts) else int(
      env.get('SLURM_NTASKS_PER_NODE', '1'))
  port = env.get('JAX_COORDINATOR_PORT') or str(
      _PORT_BASE + int(env['SLURM_JOB_ID']) % _PORT_SPAN)
  host = first_host(env['SLURM_STEP_NODELIST'])
  on_node = env.get('SLURM_GPUS_ON_NODE')
  return {
      'coordinator_address': f'{host}:{port}',
      'num_processes': int(env['SLURM_NTASKS']),
      'process_id': int(env['SLURM_PROCID']),
      'local_device_ids': slurm_local_device_ids(
          tasks_on_node, int(env.get('SLURM_LOCALID', '0')),
          _count(env.get('CUDA_VISIBLE_DEVICES')), int(on_node) if on_node else None),
  }


def init_args(env: Mapping[str, str]) -> InitArgs | None:
  """How this process joins a multi-process run (see the module docstring); None: it runs alone."""
  if 'JAX_COORDINATOR_ADDRESS' in env:
    args = InitArgs('explicit', {
        'coordinator_address': env['JAX_COORDINATOR_ADDRESS'],
        'num_processes': int(env['JAX_NUM_PROCESSES']),
        'process_id': int(env['JAX_PROCESS_ID']), 'local_device_ids': None})
  elif 'SLURM_STEP_NODELIST' in env and int(env.get('SLURM_NTASKS', '1')) > 1:
    # An srun step of several tasks (the batch script itself has no step node list).
    args = InitArgs('slurm', _slurm_args(env))
  elif env.get('CAPI_JAX_DISTRIBUTED') == '1':
    return InitArgs('cloud_tpu', {})
  else:
    return None
  if env.get('JAX_LOCAL_DEVICE_IDS'):
    args.kwargs['local_device_ids'] = [int(i) for i in env['JAX_LOCAL_DEVICE_IDS'].split(',')]
  # Everything is given: JAX's cluster detection would replace local_device_ids=None (all
  # devices) by [SLURM_LOCALID] whenever SLURM variables are around.
  args.kwargs['cluster_detection_method'] = 'deactivate'
  return args


def initialize(env: Mapping[str, str] | None = None) -> InitArgs | None:
  """`jax.distributed.initialize(...)` per `init_args` (once per process); returns the args."""
  args = init_args(os.environ if env is None else env)
  if args is None or jax.distributed.is_initialized():
    return args
  logger.info('jax.distributed.initialize (%s launch): %s', args.launcher,
              {k: v for k, v in args.kwargs.items() if k != 'cluster_detection_method'})
  jax.distributed.initialize(**args.kwargs)
  return args
