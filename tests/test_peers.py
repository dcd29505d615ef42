"""A multi-process run stops together, naming the process that died or failed (`engine.peers`).

The watchdog's judgement against a fake key-value store; then real local processes joined by
`engine.distributed` (JAX's coordination service in process 0's child, Gloo collectives on CPU):
process 0 killed with -9 while the others wait in a collective, process 0 failing with an
error, and a training run whose process 1 is killed after a few steps.

Run as a script (`python tests/test_peers.py FAILING_PROCESS FAIL_AT`), this file is a process
that loops over cross-process collectives and, when it is FAILING_PROCESS, fails at loop FAIL_AT
(-1: never); as `python tests/test_peers.py exit BEAT_PERIOD_S`, a process that runs one
collective and ends normally, its watchdog beating every BEAT_PERIOD_S.
"""

import os
import pathlib
import socket
import subprocess
import sys
import threading
import time

import itertools
import jax
from jax.experimental import multihost_utils
import numpy as np
import pytest

from capi_jax.base import errors
from capi_jax.engine import distributed
from capi_jax.engine import peers

ROOT = pathlib.Path(__file__).resolve().parents[1]
TESTS = pathlib.Path(__file__).resolve().parent
HOST = socket.gethostname()


class FakeStore:
  """The two key-value calls the watchdog makes; `down` makes every call fail like a lost
  service."""

  def __init__(self):
    self.values, self.down = {}, False

  def key_value_set(self, key, value, allow_overwrite=False):
    assert allow_overwrite
    if self.down:
      raise RuntimeError('UNAVAILABLE: Socket closed\nmore lines')
    self.values[key] = value

  def key_value_dir_get(self, prefix):
    return [(k, v) for k, v in self.values.items() if k.startswith(prefix)]


def test_watchdog_names_the_stale_the_failed_and_the_lost_service():
  store = FakeStore()
  me = peers.Watchdog(store, 0, 3, timeout_s=0.3)
  store.values[f'{peers.PREFIX}beat/1'] = '5 hostb 77'
  store.values[f'{peers.PREFIX}beat/2'] = '1 hostc 88'
  assert me.check() is None
  time.sleep(0.2)
  store.values[f'{peers.PREFIX}beat/1'] = '6 hostb 77'  # 1 beats on, 2 does not.
  assert me.check() is None
  time.sleep(0.2)
  assert me.check().startswith('process 2 of 3 (host hostc, pid 88) died (no sign of life for 0.3 s')
  assert store.values[f'{peers.PREFIX}beat/0'].startswith('3 ')  # Its own beats, counted.
  # A finished peer is not judged by its beat; a failed one is named with its reason.
  store.values[f'{peers.PREFIX}done/2'] = ''
  store.values[f'{peers.PREFIX}beat/1'] = '7 hostb 77'
  assert me.check() is None
  other = peers.Watchdog(store, 1, 3, timeout_s=10)
  other.finish(ValueError('bad value\nsecond line'))
  assert me.check() == 'process 1 of 3 (host hostb, pid 77) failed: ValueError: bad value'
  store.down = True
  assert me.check() == ('the coordination service (beside process 0) cannot be reached '
                        '(RuntimeError: UNAVAILABLE: Socket closed): process 0 or its host is '
                        'gone')
  # Telling the others is best effort: the process's own ending goes on without the service.
  me.finish(None)
  me.finish(RuntimeError('own error'))


def test_timeout_variable():
  assert peers.timeout_from({}) == peers.TIMEOUT_S
  assert peers.timeout_from({'CAPI_JAX_PEER_TIMEOUT': '30'}) == 30
  for bad in ('abc', '1', 'nan', '-5'):
    with pytest.raises(errors.UserError, match=f"CAPI_JAX_PEER_TIMEOUT='{bad}' must be a number "
                                               'of seconds above 2'):
      peers.timeout_from({'CAPI_JAX_PEER_TIMEOUT': bad})


def test_errors_a_lost_peer_may_cause_wait_for_the_watchdog():
  """A collective's failure reaches Python as JaxRuntimeError or, through JAX's and Orbax's
  barriers, as ValueError with XLA's status: both wait for the verdict naming the peer."""
  lost = 'UNKNOWN: Gloo AllGather failed: [pair.cc:547] Connection closed by peer [127.0.0.1]:1'
  from_the_runtime = distributed._from_the_runtime  # pylint: disable=protected-access
  assert from_the_runtime(ValueError(lost))
  assert from_the_runtime(jax.errors.JaxRuntimeError(lost))
  assert not from_the_runtime(ValueError('config.x must be > 0'))


def test_watchdog_thread_stops_once_and_not_after_its_own_failure():
  store, lines = FakeStore(), []
  quiet = peers.Watchdog(store, 0, 2, timeout_s=0.1, stop=lines.append).start()
  assert quiet.wait_for_verdict().startswith('process 1 of 2 (host unknown: no beat) died')
  assert lines == [quiet.verdict + '; stopping process 0 too.']
  failing = peers.Watchdog(FakeStore(), 0, 2, timeout_s=0.1, stop=lines.append).start()
  failing.finish(RuntimeError('own'))
  time.sleep(0.5)
  assert len(lines) == 1 and failing.verdict is None


def test_close_waits_for_the_peers_then_joins_the_thread(monkeypatch):
  monkeypatch.setattr(peers, 'BEAT_PERIOD_S', 0.01)
  store = FakeStore()
  me = peers.Watchdog(store, 0, 2, timeout_s=5).start()
  peer = peers.Watchdog(store, 1, 2, timeout_s=5).start()
  threading.Timer(0.5, peer.finish, (None,)).start()
  start = time.monotonic()
  me.close()  # Publishes its own end (it had not), then waits for the peer's.
  assert 0.5 <= time.monotonic() - start < 3
  assert f'{peers.PREFIX}done/0' in store.values and not me._thread.is_alive()  # pylint: disable=protected-access
  peer.close()
  assert not peer._thread.is_alive()  # pylint: disable=protected-access


@pytest.fixture(name='started')
def _started():
  """The processes a test starts (`_start`); those still running at its end are killed."""
  procs = []
  yield procs
  for proc, _ in procs:
    if proc.poll() is None:
      proc.kill()
      proc.wait()


def _start(count: int, command: list[str], tmp_path: pathlib.Path, started: list,
           **env: str) -> list[tuple[subprocess.Popen, pathlib.Path]]:
  """`count` local processes of `command` joined by engine.distributed; (handle, stderr file)."""
  with socket.socket() as s:
    s.bind(('localhost', 0))
    port = s.getsockname()[1]
  base = {**os.environ, 'PYTHONPATH': f'{ROOT}{os.pathsep}{TESTS}', 'JAX_PLATFORMS': 'cpu',
          'XLA_FLAGS': '--xla_force_host_platform_device_count=2',
          'JAX_COORDINATOR_ADDRESS': f'localhost:{port}', 'JAX_NUM_PROCESSES': str(count), **env}
  procs = []
  for i in range(count):
    err = tmp_path / f'stderr_{i}.txt'
    with open(err, 'w') as f, open(tmp_path / f'stdout_{i}.txt', 'w') as out:
      procs.append((subprocess.Popen(command, cwd=ROOT, env={**base, 'JAX_PROCESS_ID': str(i)},
                                     stdout=out, stderr=f), err))
  started.extend(procs)
  return procs


def _wait_until(predicate, timeout_s: float, what: str) -> None:
  deadline = time.monotonic() + timeout_s
  while not predicate():
    assert time.monotonic() < deadline, f'timed out waiting for {what}'
    time.sleep(0.1)


def _ended_within(proc: subprocess.Popen, seconds: float) -> float:
  start = time.monotonic()
  try:
    proc.wait(timeout=seconds)
  except subprocess.TimeoutExpired:
    proc.kill()
    pytest.fail(f'process {proc.pid} still running {seconds} s after its peer stopped')
  return time.monotonic() - start


def _errors(stderr: pathlib.Path) -> list[str]:
  """The stderr lines of a stopped survivor that are not the start-up chatter."""
  text = stderr.read_text()
  for flood in ('Traceback', 'Check failure', 'Fatal Python error', 'Gloo AllGather'):
    assert flood not in text, text
  return [l for l in text.splitlines() if l.startswith('error:')]


def _loop_started(tmp_path: pathlib.Path, count: int):
  return lambda: all('collectives running' in (tmp_path / f'stdout_{i}.txt').read_text()
                     for i in range(count))


def test_a_finished_run_exits_cleanly_while_its_watchdog_is_busy(tmp_path, started):
  # With beats every millisecond, the watchdog is nearly always inside a key-value call: left
  # running into interpreter finalization, that call aborted 5 of 6 exits ('terminate called
  # after throwing an instance of ...', exit 134) before `Watchdog.close`.
  for attempt in range(3):
    (tmp_path / str(attempt)).mkdir()
    procs = _start(2, [sys.executable, __file__, 'exit', '0.001'], tmp_path / str(attempt),
                   started)
    for proc, stderr in procs:
      assert _ended_within(proc, 60) < 60
      assert proc.returncode == 0, stderr.read_text()
      assert 'terminate' not in stderr.read_text()


def test_killed_process_0_is_named_by_the_others(tmp_path, started):
  # Process 0 holds the coordination service's parent: the others must still learn who died.
  procs = _start(3, [sys.executable, __file__, '-1', '0'], tmp_path, started,
                 CAPI_JAX_PEER_TIMEOUT='3')
  _wait_until(_loop_started(tmp_path, 3), 120, 'the collectives loop')
  victim = procs[0][0]
  victim.kill()
  for proc, stderr in procs[1:]:
    assert _ended_within(proc, 3 + 4) < 3 + 4
    assert proc.returncode == peers.PEER_FAILED_EXIT_CODE
    assert _errors(stderr) == [
        f'error: process 0 of 3 (host {HOST}, pid {victim.pid}) died (no sign of life for 3 s: '
        'killed, out of memory, or its host failed; its own log may say more); stopping '
        f'process {procs.index((proc, stderr))} too.']


def test_a_failing_coordinator_names_its_reason_and_does_not_wait_for_the_others(tmp_path, started):
  procs = _start(2, [sys.executable, __file__, '0', '20'], tmp_path, started)
  _wait_until(_loop_started(tmp_path, 2), 120, 'the collectives loop')
  (failed, failed_err), (other, other_err) = procs
  # Loop 20 comes about a second later; then neither waits for the other (JAX's shutdown
  # barrier would hold the failed one until its heartbeat timeout, 100 s).
  for proc in (failed, other):
    assert _ended_within(proc, 10) < 10
  assert failed.returncode == 1
  assert failed_err.read_text().strip().splitlines()[-1] == 'error: probe failure at loop 20'
  assert other.returncode == peers.PEER_FAILED_EXIT_CODE
  assert _errors(other_err) == [
      f'error: process 0 of 2 (host {HOST}, pid {failed.pid}) failed: UserError: probe failure '
      'at loop 20; stopping process 1 too.']


def test_killed_training_process_stops_the_other_within_seconds(tmp_path, started):
  """The issue's case: training on 2 processes, process 1 killed with -9 after a few steps."""
  workdir = tmp_path / 'run'
  # A shorter timeout than the default 10 s keeps the test short: the stop takes the timeout
  # and a beat or two at most.
  procs = _start(2, [sys.executable, str(TESTS / 'test_multiprocess.py'), str(workdir), '1000'],
                 tmp_path, started, CAPI_JAX_PEER_TIMEOUT='3')
  metrics = workdir / 'metrics.jsonl'
  _wait_until(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 3, 240,
              'three training steps')
  (survivor, stderr), (victim, _) = procs
  victim.kill()
  assert _ended_within(survivor, 3 + 4) < 3 + 4
  assert survivor.returncode == peers.PEER_FAILED_EXIT_CODE
  assert _errors(stderr) == [
      f'error: process 1 of 2 (host {HOST}, pid {victim.pid}) died (no sign of life for 3 s: '
      'killed, out of memory, or its host failed; its own log may say more); stopping process 0 '
      'too.']


def _main(failing_process: int, fail_at: int) -> None:
  distributed.initialize()
  try:
    try:
      for i in itertools.count():
        # Cross-process collectives (Gloo on CPU), like the training steps'.
        multihost_utils.process_allgather(np.array(i))
        if i == 1:
          print('collectives running', flush=True)
        if jax.process_index() == failing_process and i == fail_at:
          raise errors.UserError(f'probe failure at loop {i}')
        time.sleep(0.05)
    except BaseException as e:
      distributed.finished(e)
      raise
  except errors.UserError as e:
    sys.exit(f'error: {e}')  # As the command line does (`base.cli`).


def _exit_after_one_collective(beat_period_s: float) -> None:
  peers.BEAT_PERIOD_S = beat_period_s
  distributed.initialize()
  multihost_utils.process_allgather(np.array(1))
  distributed.finished(None)


if __name__ == '__main__':
  if sys.argv[1] == 'exit':
    _exit_after_one_collective(float(sys.argv[2]))
  else:
    _main(int(sys.argv[1]), int(sys.argv[2]))
