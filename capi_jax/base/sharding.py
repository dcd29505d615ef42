"""Device mesh, regex parameter-sharding rules and batch sharding: FSDP (ZeRO-3).

The mesh comes from `config.sharding.mesh`, e.g. (('data', 1), ('fsdp', -1)): named axes and
their sizes, -1 taking the devices left. Runs over several TPU slices (or GPU nodes, one
process each) say which axes cross the slow network between them in `config.sharding.dcn_mesh`,
e.g. (('data', 2),) for 2 slices: 'data' is then split over the slices (data parallel over
DCN: one gradient all-reduce per step) and 'fsdp' stays inside each slice (its per-block
gathers and reduce-scatters on the fast ICI links), as `mesh_utils.create_hybrid_device_mesh`
lays them out. Parameters (and everything shaped like them: EMA,
optimiser moments) are stored as placed by `config.sharding.param_rules`, a sequence of
(regex on the '/'-joined path, strategy), first match wins:
  'fsdp'       shard the largest dimension divisible by the 'fsdp' axis size over it;
  'replicate'  a full copy on every device.
Arrays smaller than `config.sharding.min_shard_bytes` are replicated whatever their rule: their
shards would cost more in collective latency than they save in memory.
The batch's leading axis is split over all mesh axes, so every device holds distinct samples
('data' and 'fsdp' both split the batch; they differ only in how parameters are stored).

Parameters stay sharded through the whole step: the models' transformer blocks gather their
own weights where they run (`models.layers.gathered`, under the mesh the step puts in context),
so GSPMD all-gathers one block's weights at a time and reduces its gradients back to the
shards; per-device state memory falls as 1 / (fsdp axis size).
"""

from collections.abc import Sequence
import math
import re
from typing import Any

import jax
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import ml_collections
import numpy as np

from capi_jax.base import optim

PyTree = Any
FSDP_AXIS = 'fsdp'


def mesh_shape(axes: Sequence[tuple[str, int]], n_devices: int
               ) -> tuple[tuple[str, ...], tuple[int, ...]]:
  """Resolves one -1 in the axis sizes so that their product is `n_devices`."""
  names = tuple(name for name, _ in axes)
  sizes = [int(size) for _, size in axes]
  known = math.prod(s for s in sizes if s != -1)
  if sizes.count(-1) > 1:
    raise ValueError(f'At most one mesh axis may have size -1, got {axes}.')
  if -1 in sizes:
    if n_devices % known:
      raise ValueError(f'{n_devices} devices do not split into mesh {axes}.')
    sizes[sizes.index(-1)] = n_devices // known
  if math.prod(sizes) != n_devices:
    raise ValueError(f'Mesh {axes} needs {math.prod(sizes)} devices, but {n_devices} are given. '
                     'Set config.sharding.mesh sizes to multiply to the device count, or use -1.')
  return names, tuple(sizes)


def granules(devices: Sequence[jax.Device]) -> tuple[str, int]:
  """(what a DCN granule is, how many `devices` span): TPU slices, else processes (a GPU node
  runs one process in the default SLURM launch; GPUs report slice_index 0 on every node)."""
  if devices[0].platform == 'tpu':
    # Compile-only devices of a single slice have no slice_index.
    return 'slice', len({getattr(d, 'slice_index', 0) for d in devices})
  return 'process', len({d.process_index for d in devices})


def dcn_shape(dcn_axes: Sequence[tuple[str, int]], names: Sequence[str],
              sizes: Sequence[int]) -> tuple[int, ...]:
  """Per mesh axis, how many granules it spans (1 for axes `dcn_axes` does not name)."""
  dcn = {name: int(size) for name, size in dcn_axes}
  unknown = set(dcn) - set(names)
  if unknown:
    raise ValueError(f'names {sorted(unknown)}, not axes of the mesh {list(names)}.')
  shape = tuple(dcn.get(name, 1) for name in names)
  for name, size, across in zip(names, sizes, shape):
    if size % across:
      raise ValueError(f'mesh axis {name!r} of size {size} cannot span {across} slices evenly.')
  return shape


def make_mesh(config: ml_collections.ConfigDict,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """The mesh of `config.sharding.mesh` over `devices` (default: all devices of all processes),
  hybrid over slices per `config.sharding.dcn_mesh`."""
  devices = list(jax.devices() if devices is None else devices)
  names, sizes = mesh_shape(config.sharding.mesh, len(devices))
  # Auto axes: GSPMD propagates shardings through the model, which is written for global arrays.
  axis_types = (jax.sharding.AxisType.Auto,) * len(names)
  try:
    across = dcn_shape(config.sharding.get('dcn_mesh') or (), names, sizes)
  except ValueError as e:
    raise ValueError(f'sharding.dcn_mesh: {e}') from e
  kind, count = granules(devices)
  if math.prod(across) == 1:
    if kind == 'slice' and count > 1:
      raise ValueError(
          f'The {len(devices)} devices span {count} TPU slices: say which mesh axis crosses them, '
          f"e.g. --config.sharding.mesh=\"(('data', {count}), ('fsdp', -1))\" "
          f"--config.sharding.dcn_mesh=\"(('data', {count}),)\".")
    return jax.make_mesh(sizes, names, axis_types=axis_types, devices=devices)
  if math.prod(across) != count:
    raise ValueError(f'sharding.dcn_mesh spans {math.prod(across)} {kind}s, but the '
                     f'{len(devices)} devices are on {count}.')
  per_granule = tuple(size // n for size, n in zip(sizes, across))
  grid = mesh_utils.create_hybrid_device_mesh(per_granule, across, devices,
                                              process_is_granule=kind == 'process')
  return Mesh(grid, names, axis_types=axis_types)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over every mesh axis."""
  return NamedSharding(mesh, P(mesh.axis_names))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def leaf_spec(shape: Sequence[int], strategy: str, fsdp_size: int) -> P:
  """PartitionSpec of one array under a rule's strategy."""
  if strategy == 'replicate' or fsdp_size == 1 or not shape:
    return P()
  if strategy != 'fsdp':
    raise ValueError(f"Unknown sharding strategy {strategy!r}: use 'fsdp' or 'replicate'.")
  # The largest dimension divisible by the axis size; ties go to the last dimension (the
  # output features of a kernel), which keeps the all-gather contiguous.
  candidates = [(d, i) for i, d in enumerate(shape) if d % fsdp_size == 0]
  if not candidates:
    return P()
  _, axis = max(candidates)
  spec = [None] * len(shape)
  spec[axis] = FSDP_AXIS
  return P(*spec)


def tree_shardings(mesh: Mesh, abstract_tree: PyTree, rules: Sequence[tuple[str, str]],
                   min_shard_bytes: int = 0) -> PyTree:
  """NamedShardings for every leaf of `abstract_tree` (arrays or ShapeDtypeStructs).

  Leaves of fewer than `min_shard_bytes` bytes are replicated whatever their rule.
  """
  fsdp_size = dict(zip(mesh.axis_names, mesh.devices.shape)).get(FSDP_AXIS, 1)
  compiled = [(re.compile(pattern), strategy) for pattern, strategy in rules]

  def one(path, leaf):
    name = optim.path_name(path)
    strategy = next((s for r, s in compiled if r.search(name)), 'replicate')
    if math.prod(np.shape(leaf)) * np.dtype(leaf.dtype).itemsize < min_shard_bytes:
      strategy = 'replicate'
    return NamedSharding(mesh, leaf_spec(np.shape(leaf), strategy, fsdp_size))

  return jax.tree_util.tree_map_with_path(one, abstract_tree)
