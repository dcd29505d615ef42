"""A multi-process run stops together: when one process dies or fails, the others name it.

Without this, JAX's coordination service notices a dead process only at its heartbeat timeout
(100 s) and then aborts every other process with a C++ stack trace; a collective that loses its
peer raises a Gloo/NCCL error that names nobody; a process that fails waits in JAX's shutdown
barrier for peers that never come.

Here every process runs a `Watchdog` thread on the coordination service's key-value store:
  - every BEAT_PERIOD_S it writes a beat (a counter, its host and pid) and reads the others';
  - a peer whose beat has not changed for `timeout_s` seconds (default TIMEOUT_S, environment
    variable CAPI_JAX_PEER_TIMEOUT) died: killed, out of memory, or its host failed;
  - a peer that failed published its reason first (`Watchdog.finish`): it is named with it;
  - the service unreachable: process 0's host is gone (the service runs beside process 0, see
    `engine.coordination_service`, so a killed process 0 is seen as a stopped beat instead);
and then ends its own process with one line, 'error: process 1 of 2 (host h, pid 123) died
(...); stopping process 0 too.', exit status PEER_FAILED_EXIT_CODE, without JAX's shutdown
barrier (it would wait for the dead one). Time to stop: `timeout_s` + BEAT_PERIOD_S at most.

At a normal exit the thread is stopped and joined (`Watchdog.close`, before JAX's own atexit
shutdown) once every peer has finished: a daemon thread still inside a key-value call when the
interpreter finalizes is unwound through jaxlib's C++ frames, which aborts the process
('terminate called after throwing ...', exit 134) after a run that succeeded.

Beats are counted, not time-stamped: each watcher times changes with its own clock, so hosts'
clocks need not agree. The beat thread needs the GIL for a moment each second; a healthy
process holding it for longer than `timeout_s` would be declared dead, hence the generous
default and the variable. None of the engine's steps does: XLA compiles release it (during a
17 s CPU compile the longest gap between a 0.1 s thread's ticks was 0.12 s).
"""

import atexit
from collections.abc import Mapping
import dataclasses
import logging
import os
import socket
import sys
import threading
import time
from typing import Any, Callable

from capi_jax.base import errors

logger = logging.getLogger(__name__)

PREFIX = 'capi_jax/peers/'
BEAT_PERIOD_S = 1.0
TIMEOUT_S = 10.0
TIMEOUT_VARIABLE = 'CAPI_JAX_PEER_TIMEOUT'
PEER_FAILED_EXIT_CODE = 1
# How long an exiting process waits for its peers to finish (JAX's own shutdown barrier's
# default timeout): a peer still running after that is left to JAX's barrier.
CLOSE_WAIT_S = 300.0
# A peer's published reason is cut to this many characters in the line that names it.
_REASON_CHARS = 300


def timeout_from(env: Mapping[str, str]) -> float:
  """Seconds without a beat after which a peer is dead (CAPI_JAX_PEER_TIMEOUT, else TIMEOUT_S).

  Raises:
    errors.UserError: the variable is not a number of seconds above two beats.
  """
  value = env.get(TIMEOUT_VARIABLE)
  if not value:
    return TIMEOUT_S
  try:
    seconds = float(value)
  except ValueError:
    seconds = float('nan')
  if not seconds > 2 * BEAT_PERIOD_S:  # NaN too.
    raise errors.UserError(f'{TIMEOUT_VARIABLE}={value!r} must be a number of seconds above '
                           f'{2 * BEAT_PERIOD_S:g} (the beat period is {BEAT_PERIOD_S:g} s).')
  return seconds


@dataclasses.dataclass
class _Peer:
  beat: str = ''  # The last beat read: 'COUNT HOST PID'.
  changed: float = 0.0  # time.monotonic() when `beat` last changed.

  def who(self, index: int, count: int) -> str:
    parts = self.beat.split(' ')
    where = f'host {parts[1]}, pid {parts[2]}' if len(parts) == 3 else 'host unknown: no beat'
    return f'process {index} of {count} ({where})'


def one_line(error: BaseException) -> str:
  """'TypeName: first line of the message', cut to _REASON_CHARS, without a final period."""
  return errors.summary(error)[:_REASON_CHARS].rstrip('.')


class Watchdog:
  """Beats for this process and watches the others' beats and failures (module docstring).

  `client` is JAX's distributed runtime client (its key-value store); `stop` ends the process
  with a line (the default writes it to stderr and exits; tests pass their own).
  """

  def __init__(self, client: Any, index: int, count: int, timeout_s: float,
               stop: Callable[[str], None] | None = None):
    self._client = client
    self._index, self._count = index, count
    self._timeout_s = timeout_s
    self._stop = stop or _exit_with_line
    self._beats = 0
    self._me = f'{socket.gethostname()} {os.getpid()}'
    self._peers = {i: _Peer(changed=time.monotonic()) for i in range(count) if i != index}
    self._lock = threading.Lock()  # Held while deciding to stop, and by `finish`.
    self._finished = threading.Event()
    self._published = False  # `finish` has told the others.
    self.verdict: str | None = None
    self._verdict_ready = threading.Event()
    self._settled = threading.Event()  # Every peer finished, or a verdict.
    self._thread = threading.Thread(target=self._run, name='capi_jax-peers', daemon=True)

  def start(self) -> 'Watchdog':
    now = time.monotonic()
    for peer in self._peers.values():
      peer.changed = now
    self._beat()
    self._thread.start()
    return self

  def _beat(self) -> None:
    self._beats += 1
    self._client.key_value_set(f'{PREFIX}beat/{self._index}', f'{self._beats} {self._me}',
                               allow_overwrite=True)

  def check(self) -> str | None:
    """One look at the store: the line naming a dead or failed peer, or None."""
    try:
      self._beat()
      entries = dict(self._client.key_value_dir_get(PREFIX))
    except Exception as e:  # pylint: disable=broad-except  (any RPC failure: the service is gone)
      return (f'the coordination service (beside process 0) cannot be reached ({one_line(e)}): '
              'process 0 or its host is gone')
    now = time.monotonic()
    for index, peer in self._peers.items():
      beat = entries.get(f'{PREFIX}beat/{index}', '')
      if beat != peer.beat:
        peer.beat, peer.changed = beat, now
      failed = entries.get(f'{PREFIX}failed/{index}')
      if failed is not None:
        return f'{peer.who(index, self._count)} failed: {failed}'
      if f'{PREFIX}done/{index}' in entries:
        continue
      if now - peer.changed > self._timeout_s:
        return (f'{peer.who(index, self._count)} died (no sign of life for '
                f'{self._timeout_s:g} s: killed, out of memory, or its host failed; its own log '
                'may say more)')
    if all(f'{PREFIX}done/{index}' in entries for index in self._peers):
      self._settled.set()
    return None

  def _run(self) -> None:
    while not self._finished.wait(BEAT_PERIOD_S):
      verdict = self.check()
      if verdict is None:
        continue
      with self._lock:
        if self._finished.is_set():
          return
        self.verdict = verdict
        self._verdict_ready.set()
        self._settled.set()
        self._stop(f'{verdict}; stopping process {self._index} too.')
        return

  def wait_for_verdict(self) -> str | None:
    """Waits (up to the timeout and a beat) for this watchdog to find a dead or failed peer.

    For an error that a lost peer may have caused (a collective whose peer vanished): when a
    verdict comes, `stop` has ended the process (or, in tests, returned).
    """
    self._verdict_ready.wait(self._timeout_s + 2 * BEAT_PERIOD_S)
    return self.verdict

  def finish(self, error: BaseException | None) -> None:
    """This process is done (`error` None) or failed with `error`: tells the others.

    A failure stops the watching (the failure is this process's own line) and publishes the
    reason; a finished process keeps watching, so that it does not wait in JAX's shutdown
    barrier for a peer that failed later.
    """
    with self._lock:
      if error is not None:
        self._finished.set()
    key, value = (f'{PREFIX}done/{self._index}', '') if error is None else (
        f'{PREFIX}failed/{self._index}', one_line(error))
    self._published = True
    try:
      self._client.key_value_set(key, value, allow_overwrite=True)
    except Exception as e:  # pylint: disable=broad-except  (the service is gone: say so, go on)
      logger.warning('Could not tell the other processes that process %d %s: %s', self._index,
                     'finished' if error is None else 'failed', one_line(e))

  def close(self, wait_s: float = CLOSE_WAIT_S) -> None:
    """At interpreter exit: waits (watching) up to `wait_s` for every peer to finish, then
    stops and joins the thread, so that no key-value call is under way when the client shuts
    down and the interpreter finalizes (module docstring).

    A process that exits without `finish` (a script's normal end) is done. A verdict meanwhile
    ends the process, as always.
    """
    if not self._thread.is_alive():
      return
    if not self._published:
      self.finish(None)
    self._settled.wait(wait_s)
    with self._lock:
      self._finished.set()
    self._thread.join()


def _flush_streams() -> None:
  """Flushes stdout and stderr before an `os._exit`, which would drop what they buffer."""
  for stream in (sys.stdout, sys.stderr):
    try:
      stream.flush()
    except Exception:  # pylint: disable=broad-except  (a closed stream: still exit)
      pass


def _exit_with_line(line: str) -> None:
  """Ends the process at once with `line`: no atexit (JAX's shutdown barrier waits for all)."""
  _flush_streams()
  os.write(2, f'error: {line}\n'.encode())
  os._exit(PEER_FAILED_EXIT_CODE)


def exit_without_shutdown_barrier(code: int) -> None:
  """At interpreter exit (before JAX's own handler), exits with `code` at once.

  For a process that failed in a multi-process run: JAX's atexit `distributed.shutdown()`
  waits in a barrier for every process, and the others have stopped (they saw the failure).
  Its own error line is printed before atexit handlers run.
  """
  def leave() -> None:
    logging.shutdown()
    _flush_streams()
    os._exit(code)

  atexit.register(leave)
