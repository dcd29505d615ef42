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

When one process dies or fails, the others stop within seconds, each with one line naming it
(`engine.peers`: a watchdog thread per process). For that, the coordination service that JAX
would run inside process 0 runs in a small child process of it (`engine.coordination_service`;
explicit and SLURM launches): a killed process 0 would otherwise take the service down and make
every other process abort at once with a C++ stack trace, naming nobody.
"""

from collections.abc import Iterator, Mapping
import atexit
import contextlib
import dataclasses
import logging
import os
import pathlib
import re
import subprocess
import sys
import tempfile
from typing import Any

import jax
from jax._src import distributed as jax_distributed

from capi_jax.base import errors
from capi_jax.engine import peers

logger = logging.getLogger(__name__)

# SLURM jobs without JAX_COORDINATOR_PORT: a port in the ephemeral range derived from the job id,
# the same on every task (the range JAX's own SLURM detection uses).
_PORT_BASE, _PORT_SPAN = 65536 - 4096, 4096
# JAX's default: its own backstop, after the watchdogs' (`peers.TIMEOUT_S`), for a process whose
# Python threads are stuck.
HEARTBEAT_TIMEOUT_S = 100
# The project's root (the folder holding capi_jax/), for the service's child process.
_ROOT = pathlib.Path(__file__).resolve().parents[2]
# This process's coordination service child and watchdog, once `initialize` has run.
_service: subprocess.Popen | None = None
_watchdog: peers.Watchdog | None = None


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


def start_service(coordinator_address: str, num_processes: int, linger_s: float,
                  env: Mapping[str, str]) -> subprocess.Popen:
  """Starts the coordination service in a child process (`engine.coordination_service`).

  It binds where JAX's would (JAX_COORDINATOR_BIND_ADDRESS, else all addresses on the
  coordinator's port) and lives until this process exits, plus `linger_s`.
  """
  port = coordinator_address.rsplit(':', 1)[1]
  bind = env.get('JAX_COORDINATOR_BIND_ADDRESS') or f'[::]:{port}'
  path = os.pathsep.join(filter(None, (str(_ROOT), env.get('PYTHONPATH'))))
  log = tempfile.TemporaryFile()
  child = subprocess.Popen(
      [sys.executable, '-m', 'capi_jax.engine.coordination_service', bind, str(num_processes),
       str(HEARTBEAT_TIMEOUT_S), str(linger_s)],
      stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, env={**env, 'PYTHONPATH': path},
      start_new_session=True)  # Ctrl-C in a terminal reaches the training processes only.
  if child.stdout.readline().strip() != b'ready':
    child.wait()
    log.seek(0)
    lines = log.read().decode(errors='replace').strip().splitlines()
    raise errors.UserError(
        f'The coordination service for {num_processes} processes could not start on {bind} '
        f'(exit status {child.returncode}: {lines[-1] if lines else "no output"}). Is the port '
        'in use? Set JAX_COORDINATOR_ADDRESS (or JAX_COORDINATOR_PORT under SLURM) to a free one.')
  return child


class _WithoutService:
  """jaxlib's module as `jax._src.distributed` sees it, except that it starts no service."""

  def __init__(self, real: Any):
    self._real = real

  def __getattr__(self, name: str) -> Any:
    return getattr(self._real, name)

  @staticmethod
  def get_distributed_runtime_service(*args, **kwargs) -> None:
    del args, kwargs  # The service runs in `start_service`'s child.


@contextlib.contextmanager
def _service_elsewhere() -> Iterator[None]:
  """Within: `jax.distributed.initialize` in process 0 connects without starting a service."""
  real = jax_distributed._jax  # pylint: disable=protected-access
  jax_distributed._jax = _WithoutService(real)  # pylint: disable=protected-access
  try:
    yield
  finally:
    jax_distributed._jax = real  # pylint: disable=protected-access


def initialize(env: Mapping[str, str] | None = None) -> InitArgs | None:
  """`jax.distributed.initialize(...)` per `init_args` (once per process), then the watchdog
  (`peers`); returns the args."""
  global _service, _watchdog
  env = os.environ if env is None else env
  args = init_args(env)
  if args is None or jax.distributed.is_initialized():
    return args
  logger.info('jax.distributed.initialize (%s launch): %s', args.launcher,
              {k: v for k, v in args.kwargs.items() if k != 'cluster_detection_method'})
  timeout_s = peers.timeout_from(env)
  kwargs = {**args.kwargs, 'heartbeat_timeout_seconds': HEARTBEAT_TIMEOUT_S}
  if args.launcher != 'cloud_tpu' and kwargs['process_id'] == 0:
    # The others may still read why this process stopped, after it is gone.
    _service = start_service(kwargs['coordinator_address'], kwargs['num_processes'],
                             linger_s=timeout_s + 5 * peers.BEAT_PERIOD_S, env=env)
    with _service_elsewhere():
      jax.distributed.initialize(**kwargs)
  else:
    jax.distributed.initialize(**kwargs)
  state = jax_distributed.global_state
  _watchdog = peers.Watchdog(state.client, state.process_id, state.num_processes,
                             timeout_s).start()
  # Registered after JAX's `clean_up` (at `import jax`), so it runs before JAX's shutdown.
  atexit.register(_watchdog.close)
  return args


# Status codes that start the message of an error from XLA's runtime (a collective that lost its
# peer: 'UNKNOWN: Gloo AllGather failed: ... Connection closed by peer'); some reach Python as
# ValueError (jax.experimental.multihost_utils' barriers, Orbax's), not JaxRuntimeError.
_RUNTIME_STATUS = re.compile(r'(UNKNOWN|INTERNAL|UNAVAILABLE|ABORTED|DEADLINE_EXCEEDED|'
                             r'CANCELLED|FAILED_PRECONDITION): ')


def _from_the_runtime(error: BaseException) -> bool:
  return (isinstance(error, jax.errors.JaxRuntimeError)
          or _RUNTIME_STATUS.match(str(error)) is not None)


def finished(error: BaseException | None) -> None:
  """This process ends: normally (`error` None, or a stop every process shares: Ctrl-C), or
  with `error`, which the other processes are told (they stop, naming this one and `error`).

  An error a dead peer may have caused (a collective that lost it) first gives the watchdog
  time to find that peer: it then ends this process with the line that names it. A failed
  process exits without JAX's shutdown barrier, where it would wait for the stopped others.
  """
  if _watchdog is None:
    return
  if error is None or isinstance(error, KeyboardInterrupt | SystemExit):
    _watchdog.finish(None)
    return
  if _from_the_runtime(error):
    _watchdog.wait_for_verdict()
  _watchdog.finish(error)
  peers.exit_without_shutdown_barrier(1)
