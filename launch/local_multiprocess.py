r"""Runs one command as N local JAX processes (a one-machine stand-in for a multi-host job).

  python launch/local_multiprocess.py --num_processes=2 --devices_per_process=4 -- \
      python -m capi_jax.main --config=configs/tiny.py --workdir=/tmp/capi_tiny_2proc

Each process gets JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID (read by
`capi_jax.engine.distributed`) and, on CPU, `devices_per_process` fake devices.
SIGTERM / SIGINT / SIGUSR1 are forwarded to every process; the exit status is the first
non-zero one of the processes (0 if all succeed). Used by tests/test_multiprocess.py.
"""

import argparse
import os
import re
import signal
import socket
import subprocess
import sys


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def launch(command: list[str], num_processes: int, devices_per_process: int,
           env: dict[str, str] | None = None) -> list[subprocess.Popen]:
  """Starts the processes; returns their handles."""
  base = dict(os.environ if env is None else env)
  base['JAX_COORDINATOR_ADDRESS'] = f'localhost:{free_port()}'
  base['JAX_NUM_PROCESSES'] = str(num_processes)
  flags = re.sub(r'--xla_force_host_platform_device_count=\S*', '', base.get('XLA_FLAGS', ''))
  base['XLA_FLAGS'] = f'{flags} --xla_force_host_platform_device_count={devices_per_process}'
  procs = []
  for i in range(num_processes):
    procs.append(subprocess.Popen(command, env={**base, 'JAX_PROCESS_ID': str(i)}))
  return procs


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--num_processes', type=int, default=2)
  parser.add_argument('--devices_per_process', type=int, default=4,
                      help='Fake CPU devices per process (ignored on GPU/TPU).')
  parser.add_argument('command', nargs=argparse.REMAINDER)
  args = parser.parse_args()
  command = args.command[1:] if args.command[:1] == ['--'] else args.command
  if not command:
    parser.error('give the command to run after --')
  procs = launch(command, args.num_processes, args.devices_per_process)

  def forward(signum, frame):
    del frame
    for p in procs:
      if p.poll() is None:
        p.send_signal(signum)

  for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
    signal.signal(sig, forward)
  codes = [p.wait() for p in procs]
  return next((c for c in codes if c), 0)


if __name__ == '__main__':
  sys.exit(main())
