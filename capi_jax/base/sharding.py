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

Tensor parallelism (Megatron-style), by logical axes (MaxText's `logical_axis_rules`): every
block parameter has named axes (`PARAM_AXES`: 'embed', 'heads', 'mlp'), and
`config.sharding.logical_rules` maps names to mesh axes, by default 'heads' and 'mlp' to
'tensor'. With a 'tensor' axis in the mesh, q/k/v (or fused qkv) and fc1 kernels are split by
columns, the attention output projection and fc2 by rows; a block then gathers its weights over
'fsdp' only (they stay split over 'tensor', `gathered_spec`), each device computes its heads and
its slice of the MLP, and GSPMD all-reduces the row-split outputs over 'tensor'. The batch is
split over every mesh axis no rule claims ('data' and 'fsdp' with the default rules), or over
the axes of an explicit 'batch' rule: activations are replicated over 'tensor'. The 'fsdp'
strategy then shards the largest remaining dimension. Without a 'tensor' axis the rules change
nothing: the FSDP recipe above is the rule set with 'tensor' of size 1.
"""

from collections.abc import Iterator, Sequence
import contextlib
import contextvars
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
TENSOR_AXIS = 'tensor'
LogicalRules = Sequence[tuple[str, str | Sequence[str]]]

# The logical axes of the blocks' parameters, per block (a scanned stack's leaves have one more,
# leading 'layers' axis): (regex on the '/'-joined path, names). The names follow
# `models.layers.Attention` and `Mlp`: q/k/v projections map 'embed' to 'heads' (a fused qkv's
# columns are [q; k; v], each heads-major), the attention output projection (under an
# attention module: ViT's `attn`, CAPI's `fn`, CAE v2's `cross_attn`) maps 'heads' back, fc1 /
# fc2 to and from 'mlp'. First match wins; other parameters have no logical axes.
PARAM_AXES = (
    (r'(^|/)(qkv|q_proj|k_proj|v_proj|q|k|v)/kernel$', ('embed', 'heads')),
    (r'(^|/)(qkv|q_proj|k_proj|v_proj|q|k|v)/bias$', ('heads',)),
    (r'(^|/)(q_bias|v_bias)$', ('heads',)),
    (r'(^|/)(attn|fn|cross_attn)/proj/kernel$', ('heads', 'embed')),
    (r'(^|/)fc1/kernel$', ('embed', 'mlp')),
    (r'(^|/)fc1/bias$', ('mlp',)),
    (r'(^|/)fc2/kernel$', ('mlp', 'embed')),
)
_PARAM_AXES = tuple((re.compile(pattern), names) for pattern, names in PARAM_AXES)
# Megatron-style tensor parallelism where the mesh has a 'tensor' axis; nothing otherwise.
DEFAULT_LOGICAL_RULES = (('heads', TENSOR_AXIS), ('mlp', TENSOR_AXIS))
_RULES = contextvars.ContextVar('logical_rules', default=DEFAULT_LOGICAL_RULES)


def _axes(mesh_axes: str | Sequence[str] | None) -> tuple[str, ...]:
  if mesh_axes is None:
    return ()
  return (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)


@contextlib.contextmanager
def use_rules(rules: LogicalRules) -> Iterator[None]:
  """`rules` are the logical-axis rules that models read (`current_rules`) inside."""
  token = _RULES.set(tuple(rules))
  try:
    yield
  finally:
    _RULES.reset(token)


def current_rules() -> LogicalRules:
  return _RULES.get()


def config_rules(config: ml_collections.ConfigDict) -> LogicalRules:
  """`config.sharding.logical_rules`, the defaults where a config predates them."""
  return tuple(config.sharding.get('logical_rules', DEFAULT_LOGICAL_RULES))


def param_axes(path: str, ndim: int) -> tuple[str | None, ...]:
  """The logical axis names of a parameter at '/'-joined `path` with `ndim` dimensions
  (all None where `PARAM_AXES` names none; 'layers' leading a scanned stack's leaf)."""
  for pattern, names in _PARAM_AXES:
    if pattern.search(path):
      if ndim == len(names) + 1:
        return ('layers', *names)
      if ndim == len(names):
        return names
  return (None,) * ndim


def logical_spec(names: Sequence[str | None], shape: Sequence[int],
                 axis_sizes: dict[str, int], rules: LogicalRules) -> list[str | None]:
  """Per dimension, the mesh axis that `rules` map its logical name to, where that axis is in
  the mesh with size > 1 and divides the dimension (None elsewhere)."""
  mapping = dict(rules)
  spec = []
  for name, size in zip(names, shape):
    axes = [a for a in _axes(mapping.get(name)) if axis_sizes.get(a, 1) > 1]
    ok = axes and size % math.prod(axis_sizes[a] for a in axes) == 0
    spec.append((axes[0] if len(axes) == 1 else tuple(axes)) if ok else None)
  return spec


def batch_axes(axis_names: Sequence[str], rules: LogicalRules | None = None
               ) -> tuple[str, ...]:
  """The mesh axes that split the batch: a 'batch' rule's, else every axis no rule claims."""
  rules = current_rules() if rules is None else rules
  explicit = dict(rules).get('batch')
  if explicit is not None:
    return tuple(a for a in _axes(explicit) if a in axis_names)
  claimed = {a for _, axes in rules for a in _axes(axes)}
  return tuple(a for a in axis_names if a not in claimed)


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


def parse_mesh(text: str) -> tuple[tuple[str, int], ...]:
  """'fsdp' -> (('fsdp', -1),); 'data=2:fsdp:tensor=4' -> (('data', 2), ('fsdp', -1),
  ('tensor', 4)): ':'-separated axes, '=size' or none (-1: the devices left)."""
  axes = []
  for part in filter(None, text.split(':')):
    name, _, size = part.partition('=')
    if not re.fullmatch(r'[a-z_]+', name) or (size and not size.isdigit()):
      raise ValueError(f'Mesh {text!r}: expected AXIS[=SIZE] parts joined by ":", e.g. '
                       "'fsdp:tensor=4'.")
    axes.append((name, int(size) if size else -1))
  if not axes:
    raise ValueError('An empty mesh.')
  return tuple(axes)


def mesh_label(mesh: Sequence[tuple[str, int]]) -> str:
  return ':'.join(name if size == -1 else f'{name}={size}' for name, size in mesh)


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


def batch_sharding(mesh: Mesh, rules: LogicalRules | None = None) -> NamedSharding:
  """Leading (batch) axis split over the batch axes of `rules` (default: the current rules;
  every mesh axis but 'tensor')."""
  return NamedSharding(mesh, P(batch_axes(mesh.axis_names, rules)))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def leaf_spec(shape: Sequence[int], strategy: str, fsdp_size: int,
              taken: Sequence[Any] = ()) -> P:
  """PartitionSpec of one array under a rule's strategy.

  `taken`: the spec the logical rules already gave (e.g. a dimension over 'tensor'); 'fsdp'
  shards the largest dimension of the others.
  """
  spec = list(taken) or [None] * len(shape)
  if strategy == 'replicate' or fsdp_size == 1 or not shape:
    return P(*spec) if any(spec) else P()
  if strategy != 'fsdp':
    raise ValueError(f"Unknown sharding strategy {strategy!r}: use 'fsdp' or 'replicate'.")
  # The largest dimension divisible by the axis size; ties go to the last dimension (the
  # output features of a kernel), which keeps the all-gather contiguous.
  candidates = [(d, i) for i, d in enumerate(shape) if d % fsdp_size == 0 and spec[i] is None]
  if not candidates:
    return P(*spec) if any(spec) else P()
  _, axis = max(candidates)
  spec[axis] = FSDP_AXIS
  return P(*spec)


def tree_shardings(mesh: Mesh, abstract_tree: PyTree, rules: Sequence[tuple[str, str]],
                   min_shard_bytes: int = 0,
                   logical_rules: LogicalRules = DEFAULT_LOGICAL_RULES) -> PyTree:
  """NamedShardings for every leaf of `abstract_tree` (arrays or ShapeDtypeStructs).

  Dimensions with logical axes (`param_axes`) are split as `logical_rules` say; then the
  regex `rules` apply. Leaves of fewer than `min_shard_bytes` bytes are not FSDP-sharded
  whatever their rule.
  """
  axis_sizes = dict(zip(mesh.axis_names, mesh.devices.shape))
  fsdp_size = axis_sizes.get(FSDP_AXIS, 1)
  compiled = [(re.compile(pattern), strategy) for pattern, strategy in rules]

  def one(path, leaf):
    name = optim.path_name(path)
    shape = np.shape(leaf)
    strategy = next((s for r, s in compiled if r.search(name)), 'replicate')
    if math.prod(shape) * np.dtype(leaf.dtype).itemsize < min_shard_bytes:
      strategy = 'replicate'
    taken = logical_spec(param_axes(name, len(shape)), shape, axis_sizes, logical_rules)
    return NamedSharding(mesh, leaf_spec(shape, strategy, fsdp_size, taken))

  return jax.tree_util.tree_map_with_path(one, abstract_tree)
