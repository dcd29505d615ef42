"""Official-format weight files and capi_jax parameter directories: reading and writing.

Official files (`OFFICIAL_SUFFIXES`): `.npz` (no PyTorch needed), `.pth` / `.pt` / `.th` (PyTorch,
the `capi_jax[torch]` extra: `torch.load(weights_only=True)`), read into flat {name: numpy array}
state dicts with dtypes kept (bfloat16 through ml_dtypes). TorchScript archives (OpenAI CLIP's
`.pt`) are read here, without PyTorch and running nothing from the file (`torch.jit.load` would
compile and run the archive's code: its `__setstate__` methods). Parameter directories
(`save_params` / `restore_params`) are what `python -m capi_jax.convert --to=capi_jax` writes: an
Orbax StandardCheckpointer checkpoint of named parameter trees under `OUT/params`. Any of these
may be local or gs:// (official files are read from a local copy and written locally, then
uploaded).
"""

import ast
import collections
from collections.abc import Mapping
import math
import os
import pickle
from typing import IO, Any, NamedTuple
import uuid
import zipfile

from etils import epath
import jax
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp

from capi_jax.base import errors
from capi_jax.base import storage

Params = Any
StateDict = dict[str, np.ndarray]
# Files read as official state dicts.
OFFICIAL_SUFFIXES = ('.pth', '.pt', '.th', '.npz')


class UnreadableCheckpointError(errors.UserError, ValueError):
  """A checkpoint file cannot be read (truncated, damaged, or not a checkpoint)."""


class ArchiveStateDict(dict):
  """The state dict of a TorchScript archive, with what its pickle says of its modules.

  Attributes:
    module_classes: {module path ('' for the root, 'visual.transformer.resblocks.0.mlp.gelu'):
      its TorchScript class without `__torch__.` and the `___torch_mangle_N` parts, e.g.
      'multimodal.model.multimodal_transformer.QuickGELU' or 'torch.nn.modules.activation.GELU'}.
      A plain state dict (`.pth` of tensors, `.npz`) has no such record: its module classes,
      and so e.g. a CLIP's MLP activation, are not in the file.
  """

  def __init__(self, tensors: StateDict, module_classes: dict[str, str]):
    super().__init__(tensors)
    self.module_classes = module_classes


# ---------------------------------------------------------------------------- files
def _import_torch():
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError('Reading or writing .pth needs PyTorch: pip install "capi_jax[torch]", '
                      'or use .npz files with the same names.') from e
  return torch


def _torch_to_numpy(torch, tensor) -> np.ndarray:
  """Exact copy; bfloat16 (unknown to numpy) goes through its bits into ml_dtypes.bfloat16."""
  tensor = tensor.detach().cpu()
  if tensor.dtype == torch.bfloat16:
    return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
  return tensor.numpy()


def _numpy_to_torch(torch, array: np.ndarray):
  array = np.ascontiguousarray(array)
  if array.dtype == ml_dtypes.bfloat16:
    return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
  return torch.from_numpy(array)


def _is_torchscript(path: str | os.PathLike[str]) -> bool:
  """A TorchScript archive (e.g. OpenAI's CLIP `.pt`): a zip with `<root>/constants.pkl`."""
  if not zipfile.is_zipfile(path):
    return False
  with zipfile.ZipFile(path) as archive:
    return any(name.endswith('/constants.pkl') for name in archive.namelist())


def read_state_dict(path: str | os.PathLike[str]) -> StateDict:
  """Reads an official-format checkpoint into a flat {name: array} mapping.

  `.npz`; or `.pth` / `.pt` / `.th` (needs PyTorch): a state_dict, one wrapped in 'model' (an
  official training checkpoint) or 'state_dict' (MIM-Refiner); or a TorchScript archive (OpenAI
  CLIP; no PyTorch needed), whose module's parameters and buffers are read by name as
  `torch.jit.load(path).state_dict()` names them, running nothing from the file: an
  `ArchiveStateDict`, which also says the class of each module (the only record of e.g. which
  activation a CLIP applies: OpenAI's QuickGELU or torch's GELU under the same weight names).

  Raises:
    UnreadableCheckpointError: the file is missing, truncated, not a checkpoint, or a
      TorchScript archive whose tensors cannot be read without running its code.
  """
  path = storage.path(path)
  if path.suffix not in OFFICIAL_SUFFIXES:
    raise UnreadableCheckpointError(f'Unknown checkpoint format {path.suffix!r} for {path}: use '
                                    '.pth or .npz.')
  if not path.is_file():
    raise UnreadableCheckpointError(f'{path} does not exist or is not a file.')
  with storage.local_copy(path) as local:
    return _read_local_state_dict(storage.path(local), path)


def _read_local_state_dict(path: epath.Path, name: epath.Path) -> StateDict:
  """`read_state_dict` of the local file `path` (`name`: the file as the user named it)."""
  try:
    if path.suffix == '.npz':
      with np.load(path) as f:
        return {k: f[k] for k in f.files}
    if _is_torchscript(path):
      return _read_torchscript(path)
    torch = _import_torch()
    sd = torch.load(path, map_location='cpu', weights_only=True)
  except UnreadableCheckpointError:
    raise
  except (OSError, EOFError, ValueError, RuntimeError, zipfile.BadZipFile,
          pickle.UnpicklingError) as e:
    raise _damaged(name, e) from e
  if not isinstance(sd, Mapping):
    raise UnreadableCheckpointError(f'{name} holds a {type(sd).__name__}, not a state_dict.')
  for wrapper in ('model', 'state_dict'):
    if wrapper in sd and isinstance(sd[wrapper], Mapping):
      sd = sd[wrapper]  # A training checkpoint (with optimizer states, constructor kwargs...).
  return {k: _torch_to_numpy(torch, v) for k, v in sd.items() if isinstance(v, torch.Tensor)}


def _damaged(path: epath.Path, error: BaseException) -> UnreadableCheckpointError:
  return UnreadableCheckpointError(
      f'Cannot read {path} ({type(error).__name__}: {str(error).strip()[:200]}): it is '
      f'truncated, damaged, or not a {path.suffix} checkpoint.')


# ---------------------------------------------------------------------------- TorchScript archives
# The zip `<root>/...` that `torch.jit.save` writes holds `data.pkl`, a pickle of the module tree:
# each module an instance of a class `__torch__.<...>` given its attributes as a dict (or, for a
# class with `__setstate__`, whatever its `__getstate__` returned), each tensor
# `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)` whose storage is the
# persistent id ('storage', torch.<Type>Storage, key, location, numel) with its bytes in
# `<root>/data/<key>`. The TorchScript source of class `__torch__.a.b.C` is `class C(Module):` in
# `<root>/code/__torch__/a/b.py`; it lists the attributes that are parameters and buffers
# (`__parameters__ = [...]`, `__buffers__ = [...]`). All of it is read as data: the pickle with an
# allowlist of globals, the source with `ast` (parsed, never run), the lists with `literal_eval`.

_STORAGE_DTYPES = {
    'DoubleStorage': np.dtype(np.float64), 'FloatStorage': np.dtype(np.float32),
    'HalfStorage': np.dtype(np.float16), 'BFloat16Storage': np.dtype(ml_dtypes.bfloat16),
    'LongStorage': np.dtype(np.int64), 'IntStorage': np.dtype(np.int32),
    'ShortStorage': np.dtype(np.int16), 'CharStorage': np.dtype(np.int8),
    'ByteStorage': np.dtype(np.uint8), 'BoolStorage': np.dtype(np.bool_),
}
# The way out, in every refusal.
_NEVER_RUN = ('capi_jax never runs code from a checkpoint file: load it in a PyTorch you trust '
              'and save `module.state_dict()` with torch.save (or as .npz with the same names)')


class _StorageType(NamedTuple):
  """`torch.<name>` of a storage persistent id."""
  name: str
  dtype: np.dtype


class _ScriptObject:
  """An instance of a TorchScript class (`__torch__.*`) as inert data: its class and state."""
  qualname = ''
  state: Any = None  # Until the pickle's BUILD gives it one.

  def __init__(self, *args):  # Called only by a REDUCE (cls(*args)); NEWOBJ skips it.
    self.state = args

  def __setstate__(self, state: Any) -> None:
    self.state = state


class _ClassInfo(NamedTuple):
  """What the archive's source says of one class."""
  is_module: bool
  parameters: tuple[str, ...]
  buffers: tuple[str, ...]
  has_setstate: bool


def _name_list(node: ast.expr, what: str) -> tuple[str, ...]:
  """The literal list of names `node` (e.g. `["weight", "bias", ]`)."""
  value = ast.literal_eval(node)
  if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
    raise ValueError(f'{what} is not a list of names: {value!r}')
  return tuple(value)


def _class_infos(source: str) -> dict[str, _ClassInfo]:
  """{class name: _ClassInfo} for the top-level classes of one TorchScript source file."""
  infos = {}
  for node in ast.parse(source).body:
    if not isinstance(node, ast.ClassDef):
      continue
    lists = {'__parameters__': (), '__buffers__': ()}  # Old archives have no __buffers__.
    for item in node.body:
      if (isinstance(item, ast.Assign) and len(item.targets) == 1
          and isinstance(item.targets[0], ast.Name) and item.targets[0].id in lists):
        lists[item.targets[0].id] = _name_list(item.value, f'{node.name}.{item.targets[0].id}')
    infos[node.name] = _ClassInfo(
        is_module=[ast.unparse(b) for b in node.bases] == ['Module'],
        parameters=lists['__parameters__'], buffers=lists['__buffers__'],
        has_setstate=any(isinstance(item, ast.FunctionDef) and item.name == '__setstate__'
                         for item in node.body))
  return infos


def _as_strided_copy(storage: np.ndarray, offset: int, shape: tuple[int, ...],
                     stride: tuple[int, ...]) -> np.ndarray:
  """A C-contiguous copy of `storage` (1-D) seen as torch's `as_strided(shape, stride, offset)`."""
  if any(n == 0 for n in shape):
    return np.zeros(shape, storage.dtype)
  last = offset + sum((n - 1) * s for n, s in zip(shape, stride))
  if offset < 0 or min(stride, default=0) < 0 or last >= storage.size:
    raise ValueError(f'a tensor of shape {shape}, stride {stride} at offset {offset} reaches '
                     f'past its storage of {storage.size} elements')
  view = np.lib.stride_tricks.as_strided(storage[offset:], shape,
                                         [s * storage.itemsize for s in stride], writeable=False)
  return np.array(view, order='C')


def _is_int(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _is_int_tuple(value: Any) -> bool:
  return isinstance(value, tuple) and all(_is_int(v) for v in value)


class _ArchiveUnpickler(pickle.Unpickler):
  """Unpickles `<root>/data.pkl` into _ScriptObjects and numpy arrays, calling nothing but an
  allowlist of data constructors; any other global is refused, naming it."""

  def __init__(self, data_pkl: IO[bytes], archive: zipfile.ZipFile, root: str,
               path: epath.Path):
    super().__init__(data_pkl)
    self._archive, self._root, self._path = archive, root, path
    byteorder = f'{root}/byteorder'
    self._big_endian = (byteorder in archive.namelist()
                        and archive.read(byteorder).strip() == b'big')
    self._storages: dict[str, np.ndarray] = {}
    # Tensors are copied out of their storages, so a few bytes of pickle could ask for terabytes
    # (a view repeated, or one with stride 0): the copies may take 4x the archive's data bytes.
    self._bytes_left = 4 * sum(info.file_size for info in archive.infolist()
                               if info.filename.startswith(f'{root}/data/'))
    self._classes: dict[str, type[_ScriptObject]] = {}
    self._globals = {
        ('torch._utils', '_rebuild_tensor_v2'): self._rebuild_tensor,
        ('collections', 'OrderedDict'): collections.OrderedDict,  # Tensors' backward hooks.
        # Lists of TorchScript attributes (List[int], ...) and their type tags: plain data.
        ('torch.jit._pickle', 'build_intlist'): list,
        ('torch.jit._pickle', 'build_doublelist'): list,
        ('torch.jit._pickle', 'build_boollist'): list,
        ('torch.jit._pickle', 'build_tensorlist'): list,
        ('torch.jit._pickle', 'restore_type_tag'): lambda value, type_tag: value,
    }

  def find_class(self, module: str, name: str) -> Any:
    if module == '__torch__' or module.startswith('__torch__.'):
      qualname = f'{module}.{name}'
      if qualname not in self._classes:
        self._classes[qualname] = type('ScriptObject', (_ScriptObject,), {'qualname': qualname})
      return self._classes[qualname]
    if module == 'torch' and name in _STORAGE_DTYPES:
      return _StorageType(name, _STORAGE_DTYPES[name])
    if (module, name) in self._globals:
      return self._globals[(module, name)]
    raise UnreadableCheckpointError(
        f'{self._path} is a TorchScript archive whose data.pkl calls {module}.{name}, which is '
        f'not one of the tensor and container constructors a weights file needs: refused '
        f'(nothing was run). {_NEVER_RUN}.')

  def persistent_load(self, pid: Any) -> np.ndarray:
    """('storage', _StorageType, key, location, numel) -> the storage's elements (1-D)."""
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == 'storage'
            and isinstance(pid[1], _StorageType) and isinstance(pid[2], str)
            and _is_int(pid[4]) and pid[4] >= 0):
      raise ValueError(f'unknown persistent id {pid!r}')
    _, storage_type, key, _, numel = pid
    if key not in self._storages:
      dtype = storage_type.dtype
      nbytes = numel * dtype.itemsize
      record = f'{self._root}/data/{key}'
      if self._archive.getinfo(record).file_size < nbytes:
        raise ValueError(f'{record} holds fewer than the {nbytes} bytes of its storage')
      with self._archive.open(record) as f:
        data = f.read(nbytes)
      # Through unsigned integers of the same width: byte order applies to every type alike.
      words = np.frombuffer(data, np.dtype(f'u{dtype.itemsize}').newbyteorder(
          '>' if self._big_endian else '<'))
      if not words.dtype.isnative:
        words = words.astype(words.dtype.newbyteorder('='))
      self._storages[key] = words.view(dtype)  # Read-only: tensors are copied out of it.
    storage = self._storages[key]
    if storage.dtype != pid[1].dtype:
      raise ValueError(f'storage {key} is read as both {storage.dtype} and {pid[1].dtype}')
    return storage

  def _rebuild_tensor(self, storage: Any, offset: Any, size: Any, stride: Any, *_) -> np.ndarray:
    if not (isinstance(storage, np.ndarray) and _is_int(offset) and _is_int_tuple(size)
            and _is_int_tuple(stride) and len(size) == len(stride)):
      raise ValueError('a tensor record is not (storage, offset, size, stride, ...)')
    self._bytes_left -= math.prod(size) * storage.itemsize
    if math.prod(size) > storage.size or self._bytes_left < 0:
      raise ValueError(f'a tensor of shape {size} over a storage of {storage.size} elements, or '
                       'views that repeat storages many times: not weights')
    return _as_strided_copy(storage, offset, size, stride)


def _plain_class_name(qualname: str) -> str:
  """'__torch__.a.b.___torch_mangle_12.C' -> 'a.b.C' (the class as its Python source names it;
  `torch.jit.trace` numbers each traced copy of a class)."""
  parts = qualname.split('.')[1:]  # Without '__torch__'.
  return '.'.join(p for p in parts if not p.startswith('___torch_mangle_'))


def _read_torchscript(path: epath.Path) -> ArchiveStateDict:
  """The parameters and buffers of the TorchScript module in `path`, by state_dict name, with
  the classes of its modules.

  Raises:
    UnreadableCheckpointError: damaged, or not readable without running the archive's code.
  """
  with zipfile.ZipFile(path) as archive:
    names = set(archive.namelist())
    root = archive.namelist()[0].split('/')[0]  # As PyTorch finds it: the first record's folder.
    if f'{root}/data.pkl' not in names:
      raise UnreadableCheckpointError(f'{path} looks like a TorchScript archive but has no '
                                      f'{root}/data.pkl: it is damaged or not a checkpoint.')
    sources: dict[str, dict[str, _ClassInfo]] = {}

    def class_info(qualname: str) -> _ClassInfo:
      module, name = qualname.rsplit('.', 1)
      source = f'{root}/code/{module.replace(".", "/")}.py'
      if source not in sources:
        sources[source] = (_class_infos(archive.read(source).decode('utf-8'))
                           if source in names else {})
      if name not in sources[source]:
        raise UnreadableCheckpointError(f'{path}: the TorchScript class {qualname} is not defined '
                                        f'in {source}: the archive is damaged.')
      return sources[source][name]

    module_classes: dict[str, str] = {}

    def module_state_dict(module: _ScriptObject, prefix: str) -> StateDict:
      """Parameters, then buffers, then submodules': the order of `Module.state_dict()`."""
      info = class_info(module.qualname)
      module_classes[prefix[:-1]] = _plain_class_name(module.qualname)
      if info.has_setstate or not isinstance(module.state, dict):
        raise UnreadableCheckpointError(
            f'{path}: the TorchScript module {repr(prefix[:-1]) if prefix else "at the root"} '
            f'(class {module.qualname}) restores itself with its own __setstate__ code, which '
            f'torch.jit.load would run: refused (nothing was run). {_NEVER_RUN}.')
      sd = {}
      for kind, names_of_kind in (('parameter', info.parameters), ('buffer', info.buffers)):
        for attr, value in module.state.items():
          if attr not in names_of_kind or value is None:  # None: e.g. Linear(bias=False).
            continue
          if not isinstance(value, np.ndarray):
            raise ValueError(f'{kind} {prefix}{attr} holds a {type(value).__name__}')
          sd[prefix + attr] = value
      for attr, value in module.state.items():
        if isinstance(value, _ScriptObject) and class_info(value.qualname).is_module:
          sd.update(module_state_dict(value, f'{prefix}{attr}.'))
      return sd

    try:
      with archive.open(f'{root}/data.pkl') as data_pkl:
        tree = _ArchiveUnpickler(data_pkl, archive, root, path).load()
      if not isinstance(tree, _ScriptObject) or not class_info(tree.qualname).is_module:
        raise ValueError(f'data.pkl holds a {type(tree).__name__}, not a TorchScript module')
      return ArchiveStateDict(module_state_dict(tree, ''), module_classes)
    except UnreadableCheckpointError:
      raise
    except Exception as e:  # pylint: disable=broad-exception-caught
      # Any failure to parse an untrusted file (pickle, zip, source) means it cannot be read.
      raise _damaged(path, e) from e


class OutputExistsError(errors.UserError, FileExistsError):
  """A weights file would replace an existing file."""


def write_state_dict(sd: Mapping[str, np.ndarray], path: str | os.PathLike[str],
                     overwrite: bool = False) -> None:
  """Writes {official name: array} to `.npz`, or `.pth` / `.pt` (PyTorch), whole or not at all.

  Raises:
    OutputExistsError: `path` exists and not `overwrite` (as save_params refuses a folder).
  """
  path = storage.path(path)
  if path.suffix not in ('.npz', '.pth', '.pt'):
    raise ValueError(f'Unknown checkpoint format {path.suffix!r} for {path}: use .pth or .npz.')
  if not overwrite and path.exists():
    raise OutputExistsError(f'{path} exists: give another --output, or remove it first.')
  torch = _import_torch() if path.suffix != '.npz' else None
  with storage.staged_file(path) as local:
    # Locally, written beside and renamed when complete (a full disk leaves no truncated file
    # under the name); on GCS the staged file is one upload.
    aside = local if storage.is_gcs(path) else local.with_name(
        f'.{local.name}.{uuid.uuid4().hex[:8]}.tmp{local.suffix}')
    try:
      if torch is None:
        np.savez(os.fspath(aside), **sd)
      else:
        torch.save({k: _numpy_to_torch(torch, v) for k, v in sd.items()}, os.fspath(aside))
      if aside != local:
        os.replace(aside, local)
    finally:
      if aside != local and os.path.exists(aside):
        os.remove(aside)


def save_params(parts: Mapping[str, Params], directory: str | os.PathLike[str]) -> epath.Path:
  """Saves capi_jax parameter trees with Orbax's StandardCheckpointer to `directory/params`."""
  target = storage.path(directory) / 'params'
  if target.exists():
    raise OutputExistsError(f'{target} exists: give another --output, or remove it first.')
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(target, jax.tree_util.tree_map(np.asarray, dict(parts)))
  return target


def restore_params(path: str | os.PathLike[str]) -> dict[str, Params]:
  """Restores what `save_params` wrote (numpy arrays, as saved)."""
  with ocp.StandardCheckpointer() as checkpointer:
    restored = checkpointer.restore(storage.path(path))
  return jax.tree_util.tree_map(np.asarray, restored)
