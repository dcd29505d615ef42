"""Official-format weight files and capi_jax parameter directories: reading and writing.

Official files (`OFFICIAL_SUFFIXES`): `.npz` (no PyTorch needed), `.pth` / `.pt` / `.th` (PyTorch,
the `capi_jax[torch]` extra), read into flat {name: numpy array} state dicts with dtypes kept
(bfloat16 through ml_dtypes). Parameter directories (`save_params` / `restore_params`) are what
`python -m capi_jax.convert --to=capi_jax` writes: an Orbax StandardCheckpointer checkpoint of
named parameter trees under `OUT/params`. Any of these may be local or gs:// (official files are
read from a local copy and written locally, then uploaded).
"""

from collections.abc import Mapping
import os
import pickle
from typing import Any
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
  official training checkpoint) or 'state_dict' (MIM-Refiner), or a TorchScript archive (OpenAI
  CLIP), whose module's `state_dict()` is read.

  Raises:
    UnreadableCheckpointError: the file is missing, truncated, or not a checkpoint.
  """
  path = storage.path(path)
  if path.suffix not in OFFICIAL_SUFFIXES:
    raise UnreadableCheckpointError(f'Unknown checkpoint format {path.suffix!r} for {path}: use '
                                    '.pth or .npz.')
  if not path.is_file():
    raise UnreadableCheckpointError(f'{path} does not exist or is not a file.')
  torch = _import_torch() if path.suffix != '.npz' else None
  with storage.local_copy(path) as local:
    return _read_local_state_dict(local, path, torch)

def _read_local_state_dict(path: str | os.PathLike[str], name: Any, torch: Any) -> StateDict:
  """`read_state_dict` of local file `path` (`name`: the file as the user named it)."""
  path = os.fspath(path)
  suffix = os.path.splitext(path)[1]
  try:
    if torch is None:
      with np.load(path) as f:
        return {k: f[k] for k in f.files}
    if _is_torchscript(path):
      sd = torch.jit.load(path, map_location='cpu').state_dict()
    else:
      sd = torch.load(path, map_location='cpu', weights_only=True)
  except (OSError, EOFError, ValueError, RuntimeError, zipfile.BadZipFile,
          pickle.UnpicklingError) as e:
    raise UnreadableCheckpointError(
        f'Cannot read {name} ({type(e).__name__}: {str(e).strip()[:200]}): it is truncated, '
        f'damaged, or not a {suffix} checkpoint.') from e
  if not isinstance(sd, Mapping):
    raise UnreadableCheckpointError(f'{name} holds a {type(sd).__name__}, not a state_dict.')
  for wrapper in ('model', 'state_dict'):
    if wrapper in sd and isinstance(sd[wrapper], Mapping):
      sd = sd[wrapper]  # A training checkpoint (with optimizer states, constructor kwargs...).
  return {k: _torch_to_numpy(torch, v) for k, v in sd.items() if isinstance(v, torch.Tensor)}

def write_state_dict(sd: Mapping[str, np.ndarray], path: str | os.PathLike[str]) -> None:
  """Writes {official name: array} to `.npz`, or `.pth` / `.pt` (PyTorch)."""
  path = storage.path(path)
  if path.suffix not in ('.npz', '.pth', '.pt'):
    raise ValueError(f'Unknown checkpoint format {path.suffix!r} for {path}: use .pth or .npz.')
  torch = _import_torch() if path.suffix != '.npz' else None
  with storage.staged_file(path) as local:
    if torch is None:
      np.savez(os.fspath(local), **sd)
    else:
      torch.save({k: _numpy_to_torch(torch, v) for k, v in sd.items()}, os.fspath(local))

def save_params(parts: Mapping[str, Params], directory: str | os.PathLike[str]) -> epath.Path:
  """Saves capi_jax parameter trees with Orbax's StandardCheckpointer to `directory/params`."""
  target = storage.path(directory) / 'params'
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(target, jax.tree_util.tree_map(np.asarray, dict(parts)))
  return target

def restore_params(path: str | os.PathLike[str]) -> dict[str, Params]:
  """Restores what `save_params` wrote (numpy arrays, as saved)."""
  with ocp.StandardCheckpointer() as checkpointer:
    restored = checkpointer.restore(storage.path(path))
  return jax.tree_util.tree_map(np.asarray, restored)
