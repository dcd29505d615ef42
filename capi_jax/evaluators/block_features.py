r"""Pooled features of chosen blocks, as MIM-Refiner's release extracts them.

A feature is named '<pooling>_<source>':
  source   'last<n>'  the raw outputs of the last n blocks (before the encoder's last norm),
                      concatenated on channels in ascending block order (the release's
                      `vit_block_extractor`: negative indices made positive, deduplicated and
                      sorted, then its concat finaliser), so 'last4' is [block L-4, ..., L-1];
           'main'     the encoder's final output (after its last norm, where it has one).
  pooling  'cls'      the first token (the class token; a CAPI encoder's first register);
           'avg'      the mean of the patch tokens (the release's `mean_patch`);
           'concat'   [cls, avg] (the release's `concat_class_average`).
Pooling the channel-concatenated tokens of several blocks gives [cls of each block, ...] and
[mean patch of each block, ...] ('concat': all the class tokens, then all the means), as the
release pools after its finaliser.
"""

from collections.abc import Sequence
import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np

from capi_jax.evaluators import backbone as backbone_lib
from capi_jax.evaluators import datasets

POOLINGS = ('cls', 'avg', 'concat')
_NAME = re.compile(r'(cls|avg|concat)_(main|last([1-9][0-9]*))')


@dataclasses.dataclass(frozen=True)
class Feature:
  """A parsed feature name: `pooling` of `last` raw blocks (0: the final output)."""
  name: str
  pooling: str
  last: int


def parse(name: str) -> Feature:
  """'cls_last4' -> Feature('cls_last4', 'cls', 4); 'concat_main' -> (..., 'concat', 0).

  Raises:
    ValueError: a name not of the form above.
  """
  match = _NAME.fullmatch(name) if isinstance(name, str) else None
  if match is None:
    raise ValueError(f'Feature {name!r} is not <pooling>_<source> with pooling in {POOLINGS} '
                     "and source 'main' or 'last<n>' (e.g. 'cls_last1', 'avg_last1', "
                     "'cls_last4', 'concat_main').")
  return Feature(name, match.group(1), int(match.group(3) or 0))


def is_name(name: object) -> bool:
  return isinstance(name, str) and _NAME.fullmatch(name) is not None


def pool(tokens: jax.Array, pooling: str, n_prefix: int) -> jax.Array:
  """(B, T, D) tokens -> (B, D) ('cls', 'avg') or (B, 2D) ('concat'), float32."""
  tokens = tokens.astype(jnp.float32)
  cls, avg = tokens[:, 0], tokens[:, n_prefix:].mean(1)
  if pooling == 'cls':
    return cls
  if pooling == 'avg':
    return avg
  return jnp.concatenate([cls, avg], -1)


def concat_blocks(blocks: jax.Array) -> jax.Array:
  """(B, n, T, D) raw block outputs -> (B, T, n D), blocks side by side on channels."""
  b, n, t, d = blocks.shape
  return blocks.transpose(0, 2, 1, 3).reshape(b, t, n * d)


@dataclasses.dataclass(frozen=True)
class Pooled:
  """A forward giving pooled features: (params, images) -> {name: (B, D')} float32.

  Attributes:
    encode: the token forward, with the blocks of the deepest 'last<n>' feature (ascending).
    features: the parsed features.
    n_prefix: tokens before the patches.
  """
  encode: backbone_lib.EncodeForward
  features: tuple[Feature, ...]
  n_prefix: int

  def __call__(self, params, images) -> dict[str, jax.Array]:
    out = self.encode(params, images)
    result = {}
    for f in self.features:
      # encode's blocks are ascending and end at the last block: the last n are the tail.
      tokens = out['tokens'] if f.last == 0 else concat_blocks(out['blocks'][:, -f.last:])
      result[f.name] = pool(tokens, f.pooling, self.n_prefix)
    return result


def pooled_forward(tokens: backbone_lib.Tokens, names: Sequence[str]) -> Pooled:
  """The forward of the features `names` of a model's token outputs."""
  features = tuple(parse(n) for n in names)
  deepest = max((f.last for f in features), default=0)
  if deepest > tokens.depth:
    raise ValueError(f'Feature(s) {[f.name for f in features if f.last > tokens.depth]} read '
                     f'more blocks than the model has ({tokens.depth}).')
  blocks = tuple(range(tokens.depth - deepest, tokens.depth))
  return Pooled(tokens.forward(blocks), features, tokens.n_prefix)


def extract(backbone: backbone_lib.Backbone, protocol: str, dataset: datasets.ClassifSet,
            names: Sequence[str], resolution: int, *, num_workers: int,
            positions: np.ndarray | None = None) -> dict[str, np.ndarray]:
  """{feature name: (n, D') float32, 'labels': (n,)} of every image of `dataset` (or of
  `positions`), evaluation transform (shorter side to resolution x 256 / 224, central crop)."""
  forward = pooled_forward(backbone.require_tokens(protocol), names)
  positions = np.arange(len(dataset)) if positions is None else positions
  stream = datasets.stream(dataset, positions, backbone.batch_size,
                           datasets.ClassifTransform(resolution), resolution, seed=0,
                           num_workers=num_workers)
  out = backbone.extract_with(forward, stream)
  return {**{n: out[n] for n in names}, 'labels': out['labels']}
