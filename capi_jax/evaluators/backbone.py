"""The frozen network every protocol evaluates, and feature extraction with it.

A `Backbone` is a forward function `(params, images (B, H, W, 3)) -> (global_repr (B, D),
registers (B, R, D), feature_map (B, h, w, D))` with its parameters placed on a device mesh:
any method's evaluation model (`Method.eval_model()`), or the official CAPI encoder. Protocols
call `forward` inside their own jitted steps (the online probes) or `extract` (segmentation,
pictures, k-NN): fixed-size global batches split over every device, outputs gathered to the
host as float32.

Protocols that read tokens of chosen blocks (MIM-Refiner's and CAE v2's) use `tokens`, present
when the model has the per-block `encode` API (`layers.Encoded`: `vit.ViT`, CAPI's
`EncoderDecoder`, MIM-Refiner's `EvalEncoder`): `tokens.forward(blocks)` is a forward giving the
final tokens (after the last norm) and the raw outputs of `blocks`, and `extract_with` runs any
such forward over a dataset.
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


@dataclasses.dataclass(frozen=True)
class EncodeForward:
  """`encode` of a Flax module as a forward: (params, images (B, H, W, 3)) -> {'tokens': (B, T,
  D) the final output [prefix, patches] after the last norm, 'blocks': (B, len(blocks), T, D) the
  raw outputs of `blocks` (0-indexed), in the order given}, float32."""
  module: nn.Module
  blocks: tuple[int, ...]

  def __call__(self, params: PyTree, images: jax.Array) -> dict[str, jax.Array]:
    out = self.module.apply({'params': params}, images, blocks=self.blocks, method='encode')
    blocks = [out.blocks[i].astype(jnp.float32) for i in self.blocks]
    tokens = out.tokens.astype(jnp.float32)
    if not blocks:
      return {'tokens': tokens, 'blocks': jnp.zeros(tokens.shape[:1] + (0,) + tokens.shape[1:])}
    return {'tokens': tokens, 'blocks': jnp.stack(blocks, 1)}


@dataclasses.dataclass(frozen=True)
class Tokens:
  """A model's token outputs (see the module docstring).

  Attributes:
    module: a Flax module with `encode(images, blocks=...) -> layers.Encoded`.
    depth: its number of blocks.
    n_prefix: tokens before the patches (1: a class token; a CAPI encoder's registers).
  """
  module: nn.Module
  depth: int
  n_prefix: int

  def forward(self, blocks: Sequence[int]) -> EncodeForward:
    """The forward giving the final tokens and the raw outputs of `blocks` (negative indices
    count from the end)."""
    resolved = tuple(b % self.depth if -self.depth <= b < self.depth else b for b in blocks)
    bad = [b for b, r in zip(blocks, resolved) if not 0 <= r < self.depth]
    if bad:
      raise ValueError(f'Blocks {bad} out of range: the model has {self.depth} blocks.')
    return EncodeForward(self.module, resolved)

  @classmethod
  def of(cls, module: nn.Module) -> 'Tokens | None':
    """The token outputs of `module`, or None when it has no `encode`. Its depth is `depth` or
    `encoder_depth`; its prefix tokens `n_prefix`, else `n_registers`, else 1 (a class token)."""
    if not hasattr(module, 'encode'):
      return None
    depth = getattr(module, 'depth', None) or getattr(module, 'encoder_depth', None)
    if not depth:
      return None
    prefix = getattr(module, 'n_prefix', None)
    prefix = getattr(module, 'n_registers', 1) if prefix is None else prefix
    return cls(module, int(depth), int(prefix))


@dataclasses.dataclass(frozen=True)
class _Named:
  """The chosen OUTPUTS of a (global_repr, registers, feature_map) forward, as a dict."""
  forward: Callable[[PyTree, jax.Array], Features]
  outputs: tuple[str, ...]

  def __call__(self, params: PyTree, images: jax.Array) -> dict[str, jax.Array]:
    return {name: value for name, value in zip(OUTPUTS, self.forward(params, images))
            if name in self.outputs}


@functools.partial(jax.jit, static_argnames=('forward',))
def _apply(params: PyTree, images: jax.Array, *, forward: Callable[..., Any]) -> Any:
  return forward(params, images)


@dataclasses.dataclass(frozen=True)
class Backbone:
  """forward(params, images) -> (global_repr, registers, feature_map), all float32.

  Attributes:
    forward: a pure, hashable function (jitted steps are cached by it).
    params: its parameters, placed on `mesh`.
    mesh: devices; batches are split over all of them.
    batch_size: images per forward in `extract` (a multiple of the device count).
    tokens: the model's token outputs, or None when it has no `encode`.
  """
  forward: Callable[[PyTree, jax.Array], Features]
  params: PyTree
  mesh: jax.sharding.Mesh
  batch_size: int
  tokens: Tokens | None = None

  @classmethod
  def from_module(cls, module: nn.Module, params: PyTree, mesh: jax.sharding.Mesh,
                  param_rules: Sequence[tuple[str, str]], batch_size: int) -> 'Backbone':
    """A Flax module whose apply({'params': p}, images) gives the three outputs."""
    n_dev = mesh.devices.size
    params = jax.device_put(params, sharding.tree_shardings(mesh, params, param_rules))
    return cls(ModuleForward(module), params, mesh, -(-batch_size // n_dev) * n_dev,
               Tokens.of(module))

  def require_tokens(self, protocol: str) -> Tokens:
    """`tokens`, or a ValueError naming `protocol` when the model has no per-block outputs."""
    if self.tokens is None:
      raise ValueError(f'{protocol} reads the outputs of chosen blocks: the evaluated model '
                       'needs the per-block `encode` API (layers.Encoded), which this one lacks.')
    return self.tokens

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
    named = _Named(self.forward, tuple(o for o in OUTPUTS if o in outputs))
    return self.extract_with(named, batches, keep_images='images' in outputs)

  def extract_with(self, forward: Callable[[PyTree, jax.Array], dict[str, jax.Array]],
                   batches: Iterable[dict[str, np.ndarray]], keep_images: bool = False
                   ) -> dict[str, np.ndarray]:
    """As `extract`, with any hashable forward `(params, images) -> {name: (b, ...)}` (e.g.
    `tokens.forward(blocks)` or a pooling of it): {name: (n, ...)} plus the batches' other keys
    ('images' only with `keep_images`), for the n valid rows."""
    out: dict[str, list[np.ndarray]] = {}
    gather = lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True))

    def collect(batch: dict[str, np.ndarray], features: dict[str, jax.Array]) -> None:
      valid = gather(batch['valid'])
      parts = dict(features)
      parts.update({k: v for k, v in batch.items()
                    if k != 'valid' and (k != 'images' or keep_images)})
      for k, v in parts.items():
        out.setdefault(k, []).append(gather(v)[valid])

    pending = None
    for batch in batches:
      # Dispatch this batch before fetching the previous one: the devices never wait for the
      # host to read the next images.
      features = _apply(self.params, self.global_array(batch['images']), forward=forward)
      if pending is not None:
        collect(*pending)
      pending = (batch, features)
    if pending is None:
      raise ValueError('The evaluation dataset yielded no images.')
    collect(*pending)
    return {k: np.concatenate(v) for k, v in out.items()}
