"""One block stack for every backbone: `depth` blocks, each gathered and rematerialised.

`block_stack` runs the blocks of CAPI's encoder and predictor, the standard ViT and CAE v2's
latent regressor. Each block is wrapped by `layers.gathered` (its FSDP shards gathered where it
runs) under the remat policy named in `layers.REMAT`, and created in the calling module's
scope, so its parameters are `{name}_{i}/...` there (the official checkpoints' per-block
layout).
"""

from collections.abc import Collection, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax

from capi_jax.models import layers

Array = jax.Array


def block_stack(block_cls: type[nn.Module], fields: Mapping[str, Any], x: Array, *args: Any,
                depth: int, name: str = 'blocks', remat_policy: str = 'none',
                layer_fields: Mapping[str, Sequence[Any]] | None = None,
                n_run: int | None = None, keep: Collection[int] = ()
                ) -> tuple[Array, dict[int, Array]]:
  """Runs blocks 0 .. n_run - 1 of a stack of `depth`: x <- block_i(x, *args).

  Call it from a compact method (or `setup`-less `__call__`) of the module that owns the
  blocks.

  Args:
    block_cls: the block, a Flax module class called as `block(x, *args)` -> x's shape; x and
      its output are (batch, ...) activations.
    fields: the block's fields shared by every layer.
    x: (batch, ...) the stack's input.
    *args: the same for every block (positions, a context); per-sample arrays are split along
      the batch like x where `layers.gathered` constrains them.
    depth: blocks in the stack.
    name: blocks are named `{name}_{i}`.
    remat_policy: a key of `layers.REMAT`.
    layer_fields: fields that differ per block, {field: (value of block 0, ..., of block
      depth - 1)} (e.g. stochastic depth rates).
    n_run: run only the first n_run blocks (default all); initialisation must run all.
    keep: block indices (< n_run) whose outputs to return.

  Returns:
    The output of block n_run - 1 (x itself when n_run is 0) and {i: output of block i} for i in
    `keep`.
  """
  if remat_policy not in layers.REMAT:
    raise ValueError(f'remat_policy must be one of {layers.REMAT_POLICIES}, got {remat_policy!r}.')
  n_run = depth if n_run is None else n_run
  layer_fields = layer_fields or {}
  wrapped = layers.gathered(block_cls, layers.REMAT[remat_policy])
  outputs = {}
  for i in range(n_run):
    per_layer = {field: values[i] for field, values in layer_fields.items()}
    x = wrapped(**fields, **per_layer, name=f'{name}_{i}')(x, *args)
    if i in keep:
      outputs[i] = x
  return x, outputs
