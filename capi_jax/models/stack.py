"""One block stack for every backbone, looped or scanned, and its two parameter layouts.

`block_stack` runs the blocks of CAPI's encoder and predictor, the standard ViT and CAE v2's
latent regressor. Each block is wrapped by `layers.gathered` (its FSDP shards gathered where it
runs) under the remat policy named in `layers.REMAT`, and lives in the calling module's scope.

Two layouts of the same parameters:
  loop   `{name}_{i}/...`: one subtree per block (the official checkpoints' layout). The blocks
         are a Python loop: XLA compiles every block separately.
  scan   `{name}/...`: every leaf stacked, (depth, *per-block shape). The blocks are one
         `nn.scan` (big_vision's `scan`, MaxText's `scan_layers`): XLA compiles one block, so
         compile time hardly grows with depth. Per-layer fields (stochastic depth rates) are
         scanned inputs and rngs are split per layer (the draws differ from the loop's).
`to_scan_layout` / `to_loop_layout` / `to_layout_of` move any tree between them (checkpoints,
converters of official weights, which work per block).
"""

from collections.abc import Callable, Collection, Mapping, Sequence
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from capi_jax.models import layers

Array = jax.Array
PyTree = Any

# Stack names of the backbones here: CAPI's encoder / predictor and the ViT ('blocks'), CAE v2's
# regressor ('regressor_blocks'). Layout conversion recognises these.
STACK_NAMES = ('blocks', 'regressor_blocks')
_LOOP_KEY = re.compile(r'^(?P<name>.+)_(?P<index>\d+)$')


class _Layer(nn.Module):
  """One step of a scanned stack: the block on the carry, with its per-layer fields as inputs.

  The block shares this module's scope, so the scanned parameters are `{name}/...` with no
  extra level, the same subtree as a loop's `{name}_{i}/...` plus the leading layer axis.
  """
  block_cls: type[nn.Module]
  fields: Mapping[str, Any]

  @nn.compact
  def __call__(self, carry: tuple[Array, Array | None], layer: Mapping[str, Any], *args: Any
               ) -> tuple[tuple[Array, Array | None], None]:
    x, kept = carry
    block = self.block_cls(**self.fields, **layer['fields'], name='block')
    nn.share_scope(self, block)
    x = block(x, *args)
    if kept is not None:
      # Slot `layer['slot']` of the kept outputs; layers not kept write the last, spare slot.
      kept = jax.lax.dynamic_update_index_in_dim(kept, x, layer['slot'], 0)
    return (x, kept), None


def block_stack(block_cls: type[nn.Module], fields: Mapping[str, Any], x: Array, *args: Any,
                depth: int, name: str = 'blocks', remat_policy: str = 'none',
                layer_fields: Mapping[str, Sequence[Any]] | None = None,
                n_run: int | None = None, keep: Collection[int] = (), scan: bool = False
                ) -> tuple[Array, dict[int, Array]]:
  """Runs blocks 0 .. n_run - 1 of a stack of `depth`: x <- block_i(x, *args).

  Call it from a compact method of the module that owns the blocks.

  Args:
    block_cls: the block, a Flax module class called as `block(x, *args)` -> x's shape; x and
      its output are (batch, ...) activations.
    fields: the block's fields shared by every layer.
    x: (batch, ...) the stack's input.
    *args: the same for every block (positions, a context).
    depth: blocks in the stack.
    name: the blocks' name, one of STACK_NAMES: `{name}_{i}` looped, `{name}` scanned.
    remat_policy: a key of `layers.REMAT`.
    layer_fields: fields that differ per block, {field: (value of block 0, ..., of block
      depth - 1)} (e.g. stochastic depth rates); numbers, so that a scan can take them as
      inputs (the block then sees traced values).
    n_run: run only the first n_run blocks (default all); initialisation must run all.
    keep: block indices (< n_run) whose outputs to return.
    scan: one `nn.scan` over stacked parameters instead of a loop over per-block ones.

  Returns:
    The output of block n_run - 1 (x itself when n_run is 0) and {i: output of block i} for i in
    `keep`.
  """
  if remat_policy not in layers.REMAT:
    raise ValueError(f'remat_policy must be one of {layers.REMAT_POLICIES}, got {remat_policy!r}.')
  if name not in STACK_NAMES:
    raise ValueError(f'Stack name {name!r} is not one of STACK_NAMES {STACK_NAMES}, which the '
                     'layout conversions recognise.')
  n_run = depth if n_run is None else n_run
  layer_fields = layer_fields or {}
  if not scan:
    wrapped = layers.gathered(block_cls, layers.REMAT[remat_policy])
    outputs = {}
    for i in range(n_run):
      per_layer = {field: values[i] for field, values in layer_fields.items()}
      x = wrapped(**fields, **per_layer, name=f'{name}_{i}')(x, *args)
      if i in keep:
        outputs[i] = x
    return x, outputs
  if n_run == 0:
    return x, {}
  # Inside a scan XLA's loop already keeps the forward from being CSE'd into the backward.
  wrapped = layers.gathered(block_cls, layers.REMAT[remat_policy], prevent_cse=False)
  # The last block's output is the scan's carry: no slot for it.
  kept_layers = sorted(i for i in keep if i < n_run - 1)
  slots = np.full(n_run, len(kept_layers), np.int32)
  slots[kept_layers] = np.arange(len(kept_layers))
  inputs = {'fields': {k: jnp.asarray(np.asarray(v[:n_run], np.float32))
                       for k, v in layer_fields.items()},
            'slot': jnp.asarray(slots)}
  scanned = nn.scan(_Layer, variable_axes={'params': 0},
                    split_rngs={'params': True, 'drop_path': True},
                    in_axes=(0,) + (nn.broadcast,) * len(args), length=n_run)
  if n_run < depth:
    # The first n_run layers of the stacked parameters (never at initialisation, which runs
    # every block and so creates them all).
    scanned = nn.map_variables(
        scanned, 'params', trans_in_fn=lambda tree: jax.tree.map(lambda a: a[:n_run], tree))
  kept = jnp.zeros((len(kept_layers) + 1, *x.shape), x.dtype) if kept_layers else None
  (x, kept), _ = scanned(wrapped, fields, name=name)((x, kept), inputs, *args)
  outputs = {i: kept[slot] for slot, i in enumerate(kept_layers)}
  if n_run - 1 in keep:
    outputs[n_run - 1] = x
  return x, outputs


# ---------------------------------------------------------------------------- layouts
def _loop_groups(tree: Mapping[str, Any]) -> dict[str, int]:
  """{stack name: depth} of the loop-layout stacks among a dict's keys."""
  indices: dict[str, set[int]] = {}
  for key in tree:
    match = _LOOP_KEY.match(key)
    if match and match['name'] in STACK_NAMES:
      indices.setdefault(match['name'], set()).add(int(match['index']))
  for name, found in indices.items():
    if found != set(range(len(found))):
      raise ValueError(f'Blocks {name}_i are not numbered 0..n-1: {sorted(found)}.')
  return {name: len(found) for name, found in indices.items()}


def _stack(blocks: Sequence[PyTree]) -> PyTree:
  """Per-block trees -> one tree of leaves stacked on a new leading axis."""
  structures = {jax.tree.structure(b) for b in blocks}
  if len(structures) > 1:
    raise ValueError('The blocks of a stack have different parameter trees.')
  return jax.tree.map(lambda *leaves: _stack_leaves(leaves), *blocks)


def _layer_sharding(sharding: Any, stacked: bool) -> Any:
  """A leaf's sharding with the layer axis added (stacked) or removed: unsharded."""
  if not isinstance(sharding, jax.sharding.NamedSharding):
    return sharding
  spec = tuple(sharding.spec)
  if stacked:
    spec = (None, *spec)
  elif spec:
    if spec[0] is not None:
      raise ValueError(f'A stacked leaf is sharded along its layer axis ({sharding.spec}).')
    spec = spec[1:]
  return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec))


def _stack_leaves(leaves: Sequence[Any]) -> Any:
  first = leaves[0]
  if isinstance(first, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct((len(leaves), *first.shape), first.dtype,
                                sharding=_layer_sharding(first.sharding, stacked=True))
  if isinstance(first, jax.Array):
    return jnp.stack(leaves)
  if isinstance(first, np.ndarray | np.generic):
    return np.stack(leaves)
  # A per-leaf setting (an optimiser group, a flag): one value for the whole stack.
  if any(leaf != first for leaf in leaves[1:]):
    raise ValueError(f'Blocks of one stack have different settings {set(map(repr, leaves))}: '
                     'a stacked leaf has one.')
  return first


def _unstack(tree: PyTree, depth: int) -> list[PyTree]:
  """One tree of stacked leaves -> `depth` per-block trees."""

  def layer(a: Any, i: int) -> Any:
    if isinstance(a, jax.ShapeDtypeStruct):
      return jax.ShapeDtypeStruct(a.shape[1:], a.dtype,
                                  sharding=_layer_sharding(a.sharding, stacked=False))
    if isinstance(a, jax.Array | np.ndarray):
      return a[i]
    return a  # A per-leaf setting holds for every block.

  return [jax.tree.map(lambda a, i=i: layer(a, i), tree) for i in range(depth)]


def _stack_depth(tree: PyTree) -> int:
  sizes = {np.shape(leaf)[0] for leaf in jax.tree.leaves(tree)
           if isinstance(leaf, jax.Array | jax.ShapeDtypeStruct | np.ndarray)}
  if not sizes:
    raise ValueError('A stacked subtree of settings alone (no arrays) has no layer count.')
  if len(sizes) != 1:
    raise ValueError(f'The leaves of a stacked subtree disagree on the layer count: {sizes}.')
  return sizes.pop()


def _map_dicts(tree: PyTree, fn: Callable[[dict[str, Any]], dict[str, Any]]) -> PyTree:
  """fn applied to every dict (Mapping) of a pytree, bottom up; other containers (a TrainState,
  optimiser states) are traversed and kept."""
  if isinstance(tree, Mapping):
    return fn({k: _map_dicts(v, fn) for k, v in tree.items()})
  children, treedef = jax.tree_util.tree_flatten(
      tree, is_leaf=lambda x: x is not tree and isinstance(x, Mapping))
  if treedef == jax.tree_util.tree_structure(0):  # A leaf.
    return tree
  return jax.tree_util.tree_unflatten(treedef, [_map_dicts(c, fn) for c in children])


def to_scan_layout(tree: PyTree) -> PyTree:
  """Every loop-layout stack (`{name}_{i}` for a name in STACK_NAMES) of a nested-dict tree of
  arrays or ShapeDtypeStructs stacked into `{name}` (big_vision's `pyloop_to_scan`)."""

  def fn(d: dict[str, Any]) -> dict[str, Any]:
    groups = _loop_groups(d)
    out = {k: v for k, v in d.items()
           if not (_LOOP_KEY.match(k) and _LOOP_KEY.match(k)['name'] in groups)}
    for name, depth in groups.items():
      if name in out:
        raise ValueError(f'Both {name} and {name}_0.. are present.')
      out[name] = _stack([d[f'{name}_{i}'] for i in range(depth)])
    return out

  return _map_dicts(tree, fn)


def to_loop_layout(tree: PyTree) -> PyTree:
  """Every scanned stack (`{name}` for a name in STACK_NAMES, leaves with a leading layer
  axis) of a nested-dict tree split into `{name}_{i}` (the inverse of `to_scan_layout`)."""

  def fn(d: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in d.items():
      if k in STACK_NAMES and isinstance(v, Mapping):
        for i, block in enumerate(_unstack(v, _stack_depth(v))):
          out[f'{k}_{i}'] = block
      else:
        out[k] = v
    return out

  return _map_dicts(tree, fn)


def _dicts(tree: PyTree) -> list[Mapping[str, Any]]:
  """Every dict (Mapping) in a pytree."""
  found = []
  _map_dicts(tree, lambda d: found.append(d) or d)
  return found


def is_scanned(tree: PyTree) -> bool:
  """Whether a pytree holds a scanned stack (a dict entry `{name}` for a name in STACK_NAMES
  that is itself a dict)."""
  return any(k in STACK_NAMES and isinstance(v, Mapping) for d in _dicts(tree)
             for k, v in d.items())


def has_loop_stack(tree: PyTree) -> bool:
  """Whether a pytree holds a loop-layout stack (`{name}_0`, ...)."""
  return any(_loop_groups(d) for d in _dicts(tree))


def to_layout_of(tree: PyTree, target: PyTree) -> PyTree:
  """`tree` in the stack layout of `target` (any pytrees whose stacks are in one layout each):
  unchanged when they agree, or when `target` has no stack."""
  if is_scanned(target) and has_loop_stack(tree):
    return to_scan_layout(tree)
  if has_loop_stack(target) and is_scanned(tree):
    return to_loop_layout(tree)
  return tree


def block_ndim(path: str, ndim: int) -> int:
  """The per-block ndim of a parameter at '/'-joined `path` with `ndim` dims: one less under a
  scanned stack (its leading layer axis), for rules written per block (weight decay by ndim)."""
  return ndim - 1 if any(part in STACK_NAMES for part in path.split('/')) else ndim
