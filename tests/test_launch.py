"""The launch scripts and the multi-process start (`engine.distributed`), without a cluster.

launch/slurm_gpu.sbatch runs under tests/fake_slurm.py (sbatch / srun as local processes, all
nodes 'localhost'); the training command is replaced by tests/launch_probe.py, which joins the
run as the engine does and counts the "GPUs" (CPU devices) its process drives. What this cannot
show: real GPUs, real SLURM (its cgroups, `--gpu-bind`), a coordinator on another host.
"""

import json
import os
import pathlib
import socket
import subprocess
import sys

import pytest

from capi_jax.base import errors
from capi_jax.engine import distributed
import fake_slurm  # tests/ is on sys.path (pytest's rootdir insertion)

ROOT = pathlib.Path(__file__).resolve().parents[1]
TESTS = pathlib.Path(__file__).resolve().parent


@pytest.mark.parametrize('nodelist,host', [
    ('gpu[003-010,012],login1', 'gpu003'), ('node001', 'node001'), ('a1,b2', 'a1'),
    ('rack-[7,9]', 'rack-7'), ('n[1-4]', 'n1')])
def test_first_host(nodelist, host):
  assert distributed.first_host(nodelist) == host


def test_tasks_per_node():
  assert distributed.tasks_per_node('8(x2),4') == [8, 8, 4]
  assert distributed.tasks_per_node('1') == [1]
  with pytest.raises(errors.UserError):
    distributed.tasks_per_node('8x2')


@pytest.mark.parametrize('tasks,local,visible,on_node,expected', [
    (1, 0, 8, 8, list(range(8))),  # One task per node: every GPU (JAX's detection: [0]).
    (1, 0, None, None, None),  # No GPU variables: all devices.
    (8, 5, 8, 8, [5]),  # One task per GPU, each seeing the whole node.
    (2, 1, 8, 8, [4, 5, 6, 7]),  # Two tasks sharing eight GPUs.
    (8, 5, 1, 8, [0]),  # --gpus-per-task=1: the task sees only its own GPU.
    (4, 3, 2, 8, [0, 1]),
    (4, 2, None, None, [2]),
])
def test_slurm_local_device_ids(tasks, local, visible, on_node, expected):
  assert distributed.slurm_local_device_ids(tasks, local, visible, on_node) == expected


def test_slurm_uneven_share_is_refused():
  with pytest.raises(errors.UserError, match='cannot be shared out evenly'):
    distributed.slurm_local_device_ids(3, 0, 8, 8)


def test_init_args_from_each_launcher():
  slurm = {'SLURM_JOB_ID': '70000', 'SLURM_STEP_NODELIST': 'gpu[01-04]', 'SLURM_NTASKS': '4',
           'SLURM_PROCID': '2', 'SLURM_LOCALID': '0', 'SLURM_NODEID': '2',
           'SLURM_STEP_TASKS_PER_NODE': '1(x4)', 'SLURM_GPUS_ON_NODE': '8',
           'CUDA_VISIBLE_DEVICES': '0,1,2,3,4,5,6,7'}
  args = distributed.init_args(slurm)
  assert args.launcher == 'slurm'
  assert args.kwargs == {
      'coordinator_address': f'gpu01:{65536 - 4096 + 70000 % 4096}', 'num_processes': 4,
      'process_id': 2, 'local_device_ids': list(range(8)),
      'cluster_detection_method': 'deactivate'}
  assert distributed.init_args({**slurm, 'JAX_COORDINATOR_PORT': '1234'}).kwargs[
      'coordinator_address'] == 'gpu01:1234'
  assert distributed.init_args({**slurm, 'JAX_LOCAL_DEVICE_IDS': '3'}).kwargs[
      'local_device_ids'] == [3]
  # The batch script itself (no step) and single-task steps run alone.
  assert distributed.init_args({k: v for k, v in slurm.items()
                                if k != 'SLURM_STEP_NODELIST'}) is None
  assert distributed.init_args({**slurm, 'SLURM_NTASKS': '1'}) is None
  # Explicit settings win over SLURM's, and JAX's detection stays off.
  explicit = distributed.init_args({**slurm, 'JAX_COORDINATOR_ADDRESS': 'h:1',
                                    'JAX_NUM_PROCESSES': '2', 'JAX_PROCESS_ID': '1'})
  assert (explicit.launcher, explicit.kwargs['local_device_ids'],
          explicit.kwargs['cluster_detection_method']) == ('explicit', None, 'deactivate')
  # Cloud TPU: JAX finds the workers itself (and never restricts a TPU process's devices).
  assert distributed.init_args({'CAPI_JAX_DISTRIBUTED': '1'}) == distributed.InitArgs(
      'cloud_tpu', {})
  assert distributed.init_args({}) is None


def _sbatch(tmp_path: pathlib.Path, options: dict[str, str], jax_detection: bool = False
            ) -> tuple[list[dict], str]:
  """Runs launch/slurm_gpu.sbatch under fake SLURM with the probe: (the probes' reports, the
  coordinator address they should share)."""
  with socket.socket() as s:
    s.bind(('localhost', 0))
    port = s.getsockname()[1]
  python = tmp_path / 'python'
  python.write_text(f'#!/bin/sh\nexec {sys.executable} {TESTS / "launch_probe.py"} "$@"\n')
  python.chmod(0o755)
  env = {**os.environ, 'PYTHON': str(python), 'JAX_PLATFORMS': 'cpu',
         'PYTHONPATH': f'{ROOT}{os.pathsep}{TESTS}', 'JAX_COORDINATOR_PORT': str(port),
         'PROBE_JAX_DETECTION': '1' if jax_detection else '0'}
  env.pop('XLA_FLAGS', None)
  workdir = tmp_path / 'run'
  done = fake_slurm.sbatch(ROOT / 'launch' / 'slurm_gpu.sbatch',
                           [str(workdir), 'configs/tiny.py', '--config.train.total_iters=3'],
                           options, env, tmp_path, timeout=300)
  assert done.returncode == 0, done.stdout + done.stderr
  reports = sorted((json.loads(p.read_text()) for p in workdir.glob('probe_*.json')),
                   key=lambda r: r['process_index'])
  return reports, f'localhost:{port}'


@pytest.mark.parametrize('options,nodes,tasks_per_node,gpus_per_node', [
    ({'nodes': '2', 'gpus-per-node': '4'}, 2, 1, 4),  # The script's layout: a task per node.
    ({'nodes': '2', 'gpus-per-node': '2', 'ntasks-per-node': '2'}, 2, 2, 2),  # A task per GPU.
])
def test_slurm_script_uses_every_gpu_of_every_node(tmp_path, options, nodes, tasks_per_node,
                                                   gpus_per_node):
  reports, coordinator = _sbatch(tmp_path, options)
  processes = nodes * tasks_per_node
  assert [r['process_index'] for r in reports] == list(range(processes))
  assert all(r['process_index'] == r['slurm_procid'] and r['process_count'] == processes
             for r in reports)
  assert {r['coordinator'] for r in reports} == {coordinator}
  for node in range(nodes):
    on_node = [gpu for r in reports if r['node'] == node for gpu in r['gpus']]
    # Every GPU of the node driven, by exactly one process.
    assert sorted(on_node, key=int) == [str(g) for g in range(gpus_per_node)], reports
  assert all(r['local_device_count'] == gpus_per_node // tasks_per_node for r in reports)
  assert all(r['device_count'] == nodes * gpus_per_node for r in reports)
  # sharding.dcn_mesh over processes: each 'data' row is one process's devices.
  assert reports[0]['mesh_rows'] == [[p] * (gpus_per_node // tasks_per_node)
                                     for p in range(processes)]
  assert reports[0]['argv'][:2] == ['-m', 'capi_jax.main']
  assert '--config.train.total_iters=3' in reports[0]['argv']


def test_jax_detection_alone_drives_one_gpu_per_node(tmp_path):
  """Why engine.distributed exists: bare jax.distributed.initialize() under the same launch."""
  reports, _ = _sbatch(tmp_path, {'nodes': '2', 'gpus-per-node': '4'}, jax_detection=True)
  assert [r['gpus'] for r in reports] == [['0'], ['0']]
  assert reports[0]['device_count'] == 2


_FAKE_GCLOUD = """#!{python}
# Stands in for `gcloud compute tpus tpu-vm ssh ... --worker=all --command=CMD`: runs CMD with
# bash in $HOME (where ssh starts) once per worker of a 2-worker pod.
import os, subprocess, sys
command = next(a.split('=', 1)[1] for a in sys.argv if a.startswith('--command='))
assert '--worker=all' in sys.argv, sys.argv
codes = [subprocess.run(['bash', '-c', command], cwd=os.environ['HOME'],
                        env={{**os.environ, 'TPU_WORKER_ID': str(w)}}).returncode for w in (0, 1)]
sys.exit(max(codes))
"""

# The worker's `.venv/bin/python`: records its command line and how the engine would join.
_RECORDER = """#!{python}
import json, os, sys
sys.path.insert(0, {root!r})
from capi_jax.engine import distributed
args = distributed.init_args(os.environ)
with open(os.path.join(os.environ['HOME'], f"worker_{{os.environ['TPU_WORKER_ID']}}.json"), 'w') as f:
  json.dump({{'argv': sys.argv[1:], 'cwd': os.getcwd(), 'launcher': args and args.launcher}}, f)
"""


def _tpu_pod(tmp_path: pathlib.Path, *args: str, **env: str) -> subprocess.CompletedProcess:
  """launch/tpu_pod.sh with a fake gcloud on PATH and a fake checkout in a fake $HOME."""
  bin_dir, home = tmp_path / 'bin', tmp_path / 'home'
  venv_bin = home / 'my repo' / '.venv' / 'bin'
  for path, text in ((bin_dir / 'gcloud', _FAKE_GCLOUD.format(python=sys.executable)),
                     (venv_bin / 'python', _RECORDER.format(python=sys.executable,
                                                            root=str(ROOT)))):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)
  return subprocess.run(
      ['bash', str(ROOT / 'launch' / 'tpu_pod.sh'), *args], capture_output=True, text=True,
      timeout=120, env={**os.environ, 'PATH': f'{bin_dir}{os.pathsep}{os.environ["PATH"]}',
                        'HOME': str(home), 'REPO_DIR': 'my repo', **env})


def test_tpu_pod_script_runs_the_same_command_on_every_worker(tmp_path):
  extra = ["--config.data.data_dir=gs://b/tfds dir", "--config.name=it's"]
  done = _tpu_pod(tmp_path, 'capi-v5e-32', 'us-west4-a', 'gs://bucket/run', 'configs/vitl.py',
                  *extra)
  assert done.returncode == 0, done.stdout + done.stderr
  for worker in (0, 1):
    got = json.loads((tmp_path / 'home' / f'worker_{worker}.json').read_text())
    # Every argument arrives unchanged through the remote shell; the engine joins as a Cloud
    # TPU worker (jax.distributed.initialize() without arguments).
    assert got['argv'] == ['-m', 'capi_jax.main', '--config=configs/vitl.py',
                           '--workdir=gs://bucket/run', *extra]
    assert got['cwd'] == str(tmp_path / 'home' / 'my repo')
    assert got['launcher'] == 'cloud_tpu'


def test_tpu_pod_script_refuses_a_local_workdir(tmp_path):
  done = _tpu_pod(tmp_path, 'capi-v5e-32', 'us-west4-a', '/tmp/run')
  assert done.returncode == 2 and 'is not gs://' in done.stderr
  assert not list((tmp_path / 'home').glob('worker_*.json'))
  assert _tpu_pod(tmp_path, 'capi-v5e-32', 'us-west4-a', '/nfs/run',
                  SHARED_WORKDIR='1').returncode == 0
