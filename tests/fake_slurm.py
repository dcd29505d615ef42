"""A one-machine stand-in for SLURM's `sbatch` and `srun`, to run launch/slurm_gpu.sbatch in tests.

`sbatch(script, args, options)` reads the script's `#SBATCH` lines (command-line `options`
override them, as with sbatch), sets the allocation's variables and runs the script with bash;
`srun` on its PATH is this file, which starts the step's tasks as local processes with the
variables a SLURM task gets (SLURM_PROCID, SLURM_LOCALID, SLURM_NODEID, SLURM_STEP_NODELIST,
SLURM_STEP_TASKS_PER_NODE, SLURM_NTASKS, SLURM_GPUS_ON_NODE, CUDA_VISIBLE_DEVICES: every GPU of
the node, or the task's own with --gpus-per-task). All nodes are 'localhost'; there are no GPUs
(the tasks' programs stand CPU devices in for them).
"""

import os
import pathlib
import re
import subprocess
import sys

_OPTION = re.compile(r'--([\w-]+)=(\S+)')


def script_options(script: pathlib.Path) -> dict[str, str]:
  """The `#SBATCH --key=value` lines of a batch script."""
  found = {}
  for line in script.read_text().splitlines():
    match = re.match(r'#SBATCH\s+' + _OPTION.pattern, line)
    if match:
      found[match.group(1)] = match.group(2)
  return found


def sbatch(script: pathlib.Path, args: list[str], options: dict[str, str], env: dict[str, str],
           cwd: pathlib.Path, timeout: float) -> subprocess.CompletedProcess:
  """Runs `script args` as the batch step of an allocation of `options` (+ the script's own)."""
  opts = {**script_options(script), **options}
  nodes = int(opts.get('nodes', '1'))
  per_node = int(opts.get('ntasks-per-node', '1'))
  bin_dir = cwd / 'fake_slurm_bin'
  bin_dir.mkdir(exist_ok=True)
  srun = bin_dir / 'srun'
  srun.write_text(f'#!/bin/sh\nexec {sys.executable} {pathlib.Path(__file__).resolve()} "$@"\n')
  srun.chmod(0o755)
  allocation = {
      **env, 'PATH': f'{bin_dir}{os.pathsep}{env.get("PATH", "")}', 'SLURM_JOB_ID': '4242',
      'SLURM_JOB_NUM_NODES': str(nodes), 'SLURM_NNODES': str(nodes),
      'SLURM_JOB_NODELIST': ','.join(['localhost'] * nodes),
      'SLURM_NTASKS_PER_NODE': str(per_node), 'SLURM_NTASKS': str(nodes * per_node),
      'SLURM_TASKS_PER_NODE': f'{per_node}(x{nodes})', 'SLURM_SUBMIT_DIR': str(cwd),
  }
  for key, var in (('gpus-per-node', 'SLURM_GPUS_PER_NODE'),
                   ('gpus-per-task', 'SLURM_GPUS_PER_TASK')):
    if key in opts:
      allocation[var] = opts[key]
  return subprocess.run(['bash', str(script), *args], env=allocation, cwd=cwd,
                        capture_output=True, text=True, timeout=timeout)


def srun(command: list[str]) -> int:
  """Starts one process per task of the allocation; the first non-zero exit status, or 0."""
  env = os.environ
  nodes, per_node = int(env['SLURM_NNODES']), int(env['SLURM_NTASKS_PER_NODE'])
  gpus = int(env.get('SLURM_GPUS_PER_NODE', '0'))
  per_task = int(env.get('SLURM_GPUS_PER_TASK', '0'))
  procs = []
  for node in range(nodes):
    for local in range(per_node):
      task = {**env, 'SLURM_PROCID': str(node * per_node + local), 'SLURM_LOCALID': str(local),
              'SLURM_NODEID': str(node), 'SLURM_STEP_NODELIST': env['SLURM_JOB_NODELIST'],
              'SLURM_STEP_NUM_NODES': str(nodes), 'SLURM_STEP_NUM_TASKS': str(nodes * per_node),
              'SLURM_STEP_TASKS_PER_NODE': f'{per_node}(x{nodes})',
              'SLURM_NTASKS': str(nodes * per_node)}
      if gpus:
        # SLURM's cgroup shows a task its own GPUs only when bound (--gpus-per-task).
        mine = range(local * per_task, (local + 1) * per_task) if per_task else range(gpus)
        task['SLURM_GPUS_ON_NODE'] = str(gpus)
        task['CUDA_VISIBLE_DEVICES'] = ','.join(map(str, mine))
      procs.append(subprocess.Popen(command, env=task))
  codes = [p.wait() for p in procs]
  return next((c for c in codes if c), 0)


if __name__ == '__main__':
  argv = sys.argv[1:]
  while argv and argv[0].startswith('-'):  # srun's own options (--kill-on-bad-exit=1, ...).
    argv = argv[1:]
  sys.exit(srun(argv))
