"""The coordination service of a multi-process run, in a child process of process 0.

  python -m capi_jax.engine.coordination_service BIND_ADDRESS NUM_PROCESSES HEARTBEAT_S LINGER_S

`jax.distributed.initialize` runs JAX's coordination service (the processes' key-value store,
barriers and heartbeats) inside process 0. When process 0 dies, the service dies with it and
every other process aborts within milliseconds with a C++ stack trace (its error poll fails),
before anything can say which process died. Here the service lives in this small process
(jaxlib only, no devices), which `engine.distributed` starts beside process 0: a killed
process 0 leaves the service up, so the other processes' watchdogs (`engine.peers`) see its
heartbeat stop and name it.

Protocol with the parent: 'ready' on stdout once the service listens; the service then runs
until stdin reaches EOF (the parent exited or was killed), plus LINGER_S seconds so the others
can still read why (`engine.peers` timeouts are shorter). Terminal and scheduler signals are
ignored: the parent's own stop (a checkpoint on SIGTERM) needs the service until it exits.
"""

import os
import signal
import sys
import time

from jaxlib import _jax


def main(argv: list[str]) -> None:
  bind_address, num_processes, heartbeat_s, linger_s = argv[1:]
  for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP):
    signal.signal(sig, signal.SIG_IGN)
  service = _jax.get_distributed_runtime_service(
      bind_address, int(num_processes), heartbeat_timeout=int(heartbeat_s))
  print('ready', flush=True)
  _serve_until_parent_exits(service, float(linger_s))


def _serve_until_parent_exits(service: _jax.DistributedRuntimeService, linger_s: float) -> None:
  """Keeps `service` running until stdin's EOF plus `linger_s`; then exits the process."""
  del service  # Held by the caller's frame, which never returns.
  sys.stdin.buffer.read()  # Returns at EOF: the parent is gone.
  time.sleep(linger_s)
  # Not service.shutdown(): it would wait for tasks that are gone, and nothing is left to flush.
  os._exit(0)


if __name__ == '__main__':
  main(sys.argv)
