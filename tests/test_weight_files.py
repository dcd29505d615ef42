"""Official weight files: TorchScript archives are read as data, and nothing in them runs.

OpenAI CLIP ships TorchScript archives (`ViT-B-16.pt`); `torch.jit.load` compiles and runs the
archive's code (a class's `__setstate__`), so a hostile `.pt` could write files through
`convert`, `evaluate --checkpoint` or a run's pretrained checkpoints. `files.read_state_dict`
reads the tensors from the zip instead. The malicious archive here is checked to be armed (the
test's own `torch.jit.load` of it writes the marker file) before the product paths are shown
not to write it.
"""

import os
import pathlib
import pickle
import re
import subprocess
import sys
import zipfile

import jax
import numpy as np
import pytest

from capi_jax import methods
from capi_jax.engine import pretrained
from capi_jax.weights import files
from configs.caev2 import tiny as caev2_tiny
from configs.mim_refiner import tiny as mim_refiner_tiny

REPO = pathlib.Path(__file__).resolve().parents[1]
ENV = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'PYTHONPATH': str(REPO)}

torch = pytest.importorskip('torch')


def _state_dict_of(module_file: pathlib.Path) -> dict[str, np.ndarray]:
  """What the old reader returned: `torch.jit.load(...).state_dict()` (test-only, own files)."""
  sd = torch.jit.load(str(module_file), map_location='cpu').state_dict()
  to_numpy = files._torch_to_numpy  # pylint: disable=protected-access
  return {k: to_numpy(torch, v) for k, v in sd.items()}


def _assert_identical(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
  assert list(got) == list(want)  # Same names, in state_dict order.
  for name, value in want.items():
    assert got[name].dtype == value.dtype and got[name].shape == value.shape, name
    assert got[name].tobytes() == value.tobytes(), name


class _Attention(torch.nn.Module):

  def __init__(self, dim: int):
    super().__init__()
    self.in_proj_weight = torch.nn.Parameter(torch.randn(3 * dim, dim))
    self.out_proj = torch.nn.Linear(dim, dim)

  def forward(self, x):
    q, k, v = (x @ self.in_proj_weight.t()).chunk(3, -1)
    return self.out_proj(torch.softmax(q @ k.transpose(-1, -2), -1) @ v)


class _TinyViT(torch.nn.Module):
  """CLIP-like: tokens, a patch conv without bias, blocks, a transposed (non-contiguous)
  projection, a parameter that views its storage at an offset, buffers of several dtypes (one
  not persistent: TorchScript keeps it), and a tensor attribute that is neither."""

  def __init__(self, dim: int = 4):
    super().__init__()
    self.class_embedding = torch.nn.Parameter(torch.randn(5 * dim)[dim:2 * dim])
    self.positional_embedding = torch.nn.Parameter(torch.randn(5, dim))
    self.conv1 = torch.nn.Conv2d(3, dim, 2, 2, bias=False)
    self.blocks = torch.nn.ModuleList([_Attention(dim), _Attention(dim)])
    self.ln_post = torch.nn.LayerNorm(dim)
    self.proj = torch.nn.Parameter(torch.randn(2, dim).t())
    self.register_buffer('steps', torch.tensor([3, 4], dtype=torch.int64))
    self.register_buffer('flags', torch.tensor([True, False]), persistent=False)
    self.plain = torch.zeros(3)

  def forward(self, x):
    x = self.conv1(x).flatten(2).transpose(1, 2)
    cls = self.class_embedding.expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], 1)
    x = x + self.positional_embedding[:x.shape[1]]
    for block in self.blocks:
      x = x + block(x.to(block.in_proj_weight.dtype)).float()
    return self.ln_post(x[:, 0]) @ self.proj


def _tiny_vit():
  model = _TinyViT()
  model.blocks[0].half()  # OpenAI's release: float16 linear weights beside float32 norms.
  model.blocks[1].bfloat16()
  assert not model.proj.is_contiguous() and model.class_embedding.storage_offset() == 4
  return model


@pytest.mark.parametrize('how', ['script', 'trace'])
def test_torchscript_reads_as_jit_load_state_dict(how, tmp_path):
  model = _tiny_vit().eval()
  if how == 'script':
    scripted = torch.jit.script(model)
  else:  # CLIP's files are traced: classes with mangled names (___torch_mangle_N).
    wrapped = torch.nn.Sequential(model)
    scripted = torch.jit.trace(wrapped, torch.randn(1, 3, 4, 4), check_trace=False)
  scripted.save(str(tmp_path / 'model.pt'))
  want = _state_dict_of(tmp_path / 'model.pt')
  assert {str(v.dtype) for v in want.values()} >= {'float32', 'float16', 'bfloat16', 'int64',
                                                  'bool'}
  _assert_identical(files.read_state_dict(tmp_path / 'model.pt'), want)


def test_torchscript_needs_no_torch(tmp_path):
  torch.jit.script(_tiny_vit()).save(str(tmp_path / 'model.pt'))
  code = ('import sys; sys.modules["torch"] = None\n'  # `import torch` now fails.
          'import numpy as np\n'
          'from capi_jax.weights import files\n'
          f'sd = files.read_state_dict({str(tmp_path / "model.pt")!r})\n'
          f'np.savez({str(tmp_path / "read.npz")!r}, **sd)\n')
  subprocess.run([sys.executable, '-c', code], cwd=REPO, env=ENV, check=True)
  with np.load(tmp_path / 'read.npz') as read:
    got = {k: read[k] for k in read.files}
  # npz keeps bfloat16 as raw 2-byte records: compare those by bytes.
  want = _state_dict_of(tmp_path / 'model.pt')
  assert sorted(got) == sorted(want)
  for name, value in want.items():
    assert got[name].tobytes() == value.tobytes() and got[name].shape == value.shape, name


def _rewrite(archive: pathlib.Path, change) -> None:
  """Rewrites every record of the zip `archive` through `change(name, bytes) -> bytes | None`
  (None drops the record)."""
  with zipfile.ZipFile(archive) as z:
    records = [(name, z.read(name)) for name in z.namelist()]
  with zipfile.ZipFile(archive, 'w') as z:
    for name, data in records:
      data = change(name, data)
      if data is not None:
        z.writestr(name, data)


def test_torchscript_big_endian(tmp_path):
  torch.jit.script(torch.nn.Linear(3, 2)).save(str(tmp_path / 'model.pt'))
  want = _state_dict_of(tmp_path / 'model.pt')

  def to_big_endian(name, data):
    if name.endswith('/byteorder'):
      return b'big'
    if '/data/' in name:  # All float32.
      return np.frombuffer(data, '<f4').astype('>f4').tobytes()
    return data

  _rewrite(tmp_path / 'model.pt', to_big_endian)
  _assert_identical(files.read_state_dict(tmp_path / 'model.pt'), want)


@pytest.mark.parametrize('damage, message', [
    (lambda n, d: d[:-4] if n.endswith('/data/0') else d, 'fewer than the 24 bytes'),
    (lambda n, d: None if '/code/' in n else d, 'Linear is not defined in'),
    (lambda n, d: d.replace(b'__parameters__ = [', b'__parameters__ = [len(), ')
     if n.endswith('.py') else d, 'ValueError'),
    # The weight (storage '0', 6 elements) asked for as 10**6 x 3 by stride 0: 12 MB from 24 B.
    (lambda n, d: d.replace(b'(K\x02K\x03t(K\x03K\x01t', b'(J@B\x0f\x00K\x03t(K\x00K\x01t')
     if n.endswith('data.pkl') else d, 'not weights'),
])
def test_damaged_torchscript_is_one_clear_error(damage, message, tmp_path):
  # (Linear's source may be linear.py or, once other Linears were scripted in this process,
  # linear/___torch_mangle_N.py.)
  torch.jit.script(torch.nn.Linear(3, 2)).save(str(tmp_path / 'model.pt'))
  _rewrite(tmp_path / 'model.pt', damage)
  with pytest.raises(files.UnreadableCheckpointError, match=message):
    files.read_state_dict(tmp_path / 'model.pt')


# ------------------------------------------------------------------------- hostile files
class _WritesAFile(torch.nn.Module):
  """Restores itself with code that writes `MARKER` (`torch.from_file(shared=True)`), as the
  probe of issue 23 did. The marker's path is set into the source before scripting."""

  def __init__(self):
    super().__init__()
    self.weight = torch.nn.Parameter(torch.ones(2))

  def forward(self, x):
    return x * self.weight

  @torch.jit.export
  def __getstate__(self) -> tuple[torch.Tensor, bool]:
    return (self.weight, self.training)

  @torch.jit.export
  def __setstate__(self, state: tuple[torch.Tensor, bool]) -> None:
    written = torch.from_file('MARKER', shared=True, size=8, dtype=torch.uint8)
    written.fill_(65)
    # Used, so that TorchScript keeps the call (an unused one is dropped when compiled).
    self.weight = state[0] + written[:1].float() * 0
    self.training = state[1]


class _CLIPLike(torch.nn.Module):

  def __init__(self):
    super().__init__()
    self.visual = _WritesAFile()
    self.token_embedding = torch.nn.Embedding(4, 2)

  def forward(self, x):
    return self.visual(x)


@pytest.fixture(name='hostile')
def _hostile(tmp_path) -> tuple[pathlib.Path, pathlib.Path]:
  """(an armed TorchScript archive, the file its code writes when torch.jit.load runs it)."""
  marker = tmp_path / 'written_by_the_archive'
  archive = tmp_path / 'ViT-B-16.pt'
  torch.jit.script(_CLIPLike()).save(str(archive))
  _rewrite(archive, lambda name, data: data.replace(b'"MARKER"', repr(str(marker)).encode())
           if name.endswith('.py') else data)
  assert not marker.exists()
  torch.jit.load(str(archive))  # The old reader's call: the archive's code writes the marker.
  assert marker.read_bytes() == b'A' * 8, 'the hostile archive is not armed'
  marker.unlink()
  return archive, marker


def _raised(call) -> Exception | None:
  """What `call()` raises (None: nothing): the marker is checked first, whatever happened."""
  try:
    call()
  except Exception as e:  # pylint: disable=broad-exception-caught
    return e
  return None


def test_hostile_archive_is_refused_and_nothing_runs(hostile):
  archive, marker = hostile
  error = _raised(lambda: files.read_state_dict(archive))
  assert not marker.exists(), 'the archive\'s code ran'
  assert isinstance(error, files.UnreadableCheckpointError), error
  assert re.search(r"'visual' \(class __torch__.*_WritesAFile\).*__setstate__.*refused \(nothing "
                   r'was run\)', str(error)), error


def test_hostile_archive_runs_nothing_through_the_commands(hostile, tmp_path):
  archive, marker = hostile
  commands = {
      'convert': ['-m', 'capi_jax.convert', '--config=configs/caev2/tiny.py', '--family=clip',
                  '--section=caev2.teacher.model', '--to=capi_jax', f'--input={archive}',
                  f'--output={tmp_path / "converted"}'],
      'evaluate': ['-m', 'capi_jax.evaluate', '--config=configs/tiny.py',
                   f'--workdir={tmp_path / "eval"}', f'--checkpoint={archive}'],
  }
  for name, args in commands.items():
    run = subprocess.run([sys.executable, *args], cwd=REPO, env=ENV, capture_output=True,
                         text=True, timeout=300)
    assert not marker.exists(), f'{name}: the archive\'s code ran'
    assert run.returncode != 0, name
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith('error: ') and '__setstate__' in last, (name, run.stderr[-2000:])
    assert 'Traceback' not in run.stderr, name

  # A run's pretrained checkpoints: config.init.checkpoint (MIM-Refiner) and CAE v2's teacher.
  refiner = mim_refiner_tiny.get_config()
  refiner.init.checkpoint = str(archive)
  caev2 = caev2_tiny.get_config()
  caev2.caev2.teacher.checkpoint = str(archive)
  for config in (refiner, caev2):
    method = methods.from_config(config)
    assert list(method.pretrained_paths().values()) == [str(archive)], config.name
    error = _raised(lambda: pretrained.apply(  # pylint: disable=cell-var-from-loop
        method, jax.eval_shape(method.init, jax.random.key(0))))
    assert not marker.exists(), f'{config.name}: the archive\'s code ran'
    assert isinstance(error, files.UnreadableCheckpointError), error
    assert '__setstate__' in str(error), error


class _Calls:
  """Pickles as a call of `function(*args)`: what a hostile pickle does."""

  def __init__(self, function, *args):
    self.function, self.args = function, args

  def __reduce__(self):
    return self.function, self.args


@pytest.mark.parametrize('make_call', [
    lambda marker: _Calls(os.system, f'touch {marker}'),
    lambda marker: _Calls(open, str(marker), 'w'),
], ids=['os.system', 'builtins.open'])
def test_forbidden_global_is_refused_and_nothing_runs(make_call, tmp_path):
  marker = tmp_path / 'written_by_the_pickle'
  data_pkl = pickle.dumps({'weight': make_call(marker)}, protocol=2)
  pickle.loads(data_pkl)  # Armed: an unrestricted unpickler writes the marker.
  assert marker.exists()
  marker.unlink()
  archive = tmp_path / 'hostile.pt'
  with zipfile.ZipFile(archive, 'w') as z:
    z.writestr('hostile/data.pkl', data_pkl)
    z.writestr('hostile/constants.pkl', pickle.dumps((), protocol=2))
    z.writestr('hostile/version', '3\n')
  error = _raised(lambda: files.read_state_dict(archive))
  assert not marker.exists(), 'the pickle\'s call ran'
  assert isinstance(error, files.UnreadableCheckpointError), error
  function = make_call(marker).function
  assert re.search(rf'calls \S+\.{function.__name__}, .*refused \(nothing was run\)',
                   str(error)), error
