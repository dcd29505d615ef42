"""The frozen network every protocol evaluates, and feature extraction with it.

A `Backbone` is a forward function `(params, images (B, H, W, 3)) -> (global_repr (B, D),
registers (B, R, D), feature_map (B, h, w, D))` with its parameters placed on a device mesh:
any method's evaluation model (`Method.eval_model()`), or the official CAPI encoder. Protocols
call `forward` inside their own jitted steps (the online probes) or `extract` (segmentation,
pictures, k-NN): fixed-size global batches split over every device, outputs gathered to the
host as float32.
"""

from collections.abc import Callable, Iterable, Sequence
import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np

from capi_jax.base import sharding

PyTree = Any
Features = tuple[jax.Array, jax.Array, jax.Array]
OUTPUTS = ('global_repr', 'registers', 'feature_map')


@dataclasses.dataclass(frozen=True)
class ModuleForward:
  """A Flax module's apply as a forward; equal modules give equal (cache-sharing) forwards."""
  module: nn.Module

  def __call__(self, params: PyTree, images: jax.Array) -> Features:
    return tuple(x.astype(jnp.float32) for x in self.module.apply({'params': params}, images))


@functools.partial(jax.jit, static_argnames=('forward',))
def _apply(params: PyTree, images: jax.Array, *, forward: Callable[..., Features]) -> Features:
  return forward(params, images)


@dataclasses.dataclass(frozen=True)
class Backbone:
  """forward(params, images) -> (global_repr, registers, feature_map), all float32.

  Attributes:
    forward: a pure, hashable function (jitted steps are cached by it).
    params: its parameters, placed on `mesh`.
    mesh: devices; batches are split over all of them.
    batch_size: images per forward in `extract` (a multiple of the device count).
  """
  forward: Callable[[PyTree, jax.Array], Features]
  params: PyTree
  mesh: jax.sharding.Mesh
  batch_size: int

  @classmethod
  def from_module(cls, module: nn.Module, params: PyTree, mesh: jax.sharding.Mesh,
                  param_rules: Sequence[tuple[str, str]], batch_size: int) -> 'Backbone':
    """A Flax module whose apply({'params': p}, images) gives the three outputs."""
    n_dev = mesh.devices.size
    params = jax.device_put(params, sharding.tree_shardings(mesh, params, param_rules))
    return cls(ModuleForward(module), params, mesh, -(-batch_size // n_dev) * n_dev)

  @property
  def batch_sharding(self) -> jax.sharding.NamedSharding:
    return sharding.batch_sharding(self.mesh)

  def global_array(self, local: np.ndarray) -> jax.Array:
    """This process's rows of a global batch -> one array split over every device."""
    return jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(local))

  def extract(self, batches: Iterable[dict[str, np.ndarray]],
              outputs: Sequence[str] = OUTPUTS) -> dict[str, np.ndarray]:
    """Runs every image of `batches` through the backbone; results on every process.

    Args:
      batches: this process's rows of global batches (`datasets.stream`, `seg_data.batches`):
        dicts with 'images' (b, H, W, 3) float32, 'index' (b,) dataset positions (-1 for
        padding), 'valid' (b,) (padding and undecodable images are not) and any other
        per-image arrays (labels, masks), b = batch_size / processes.
      outputs: which of OUTPUTS to keep (feature maps are most of the bytes), and 'images' to
        keep the input images too.

    Returns:
      {output: (n, ...) float32 for each kept output} plus the batches' other keys, for the n
      valid rows, in the order of the global batches.
    """
    out: dict[str, list[np.ndarray]] = {}
    gather = lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True))

    def collect(batch: dict[str, np.ndarray], features: Features) -> None:
      valid = gather(batch['valid'])
      parts = {name: value for name, value in zip(OUTPUTS, features) if name in outputs}
      parts.update({k: v for k, v in batch.items()
                    if k != 'valid' and (k != 'images' or k in outputs)})
      for k, v in parts.items():
        out.setdefault(k, []).append(gather(v)[valid])

    pending = None
    for batch in batches:
      # Dispatch this batch before fetching the previous one: the devices never wait for the
      # host to read the next images.
      features = _apply(self.params, self.global_array(batch['images']), forward=self.forward)
      if pending is not None:
        collect(*pending)
      pending = (batch, features)
    if pending is None:
      raise ValueError('The evaluation dataset yielded no images.')
    collect(*pending)
    return {k: np.concatenate(v) for k, v in out.items()}
