"""MIM-Refiner's nearest-neighbour queue: lookup of the swapped positives and FIFO update.

Reproduces `NnclrQueue` of the official release (`modules/ssl/nnclr_queue.py`, guidance 'none',
no random swap) in training mode. One step, for every head:
  1. `lookup`: cosine similarity of each L2-normalised anchor (projector output of a global
     view, detached) to each L2-normalised stored row; rows holding the anchor's own sample id
     get exactly -1; `top_k`; one of the k taken per anchor row by `choice` (uniformly random in
     training: `random_choice`; the recorded pick in parity checks). The neighbour is the stored
     row as it is (raw, unnormalised).
  2. after the update, `enqueue` the anchors of global view 0 only: FIFO at the pointer with
     wrap-around; written rows get age 0, then every age grows by the number written.
The lookup precedes the update, so a batch never retrieves itself from this step.

Everything is written on global arrays: the rows enqueued are global view 0 of the global batch
in sample order, which is the official order (all ranks gathered in rank order) when the batch
is split over devices in contiguous blocks.
"""

from collections.abc import Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from capi_jax.models import layers

Array = jax.Array

# F.normalize's eps (lookup) and F.cosine_similarity's (the nn-similarity metric).
_NORMALIZE_EPS = 1e-12
_COSINE_EPS = 1e-8


class Queue(NamedTuple):
  """Queue buffers (official names `queue.{x,idx,cls,age,ptr}`).

  x: (size, dim) float32 stored projector outputs; idx: (size,) int32 sample ids (-1 empty);
  labels: (size,) int32 class labels (-1 empty; used by the nn-accuracy metric only);
  age: (size,) int32 rows written to the queue since each row was written;
  ptr: () int32 next row to write.
  """
  x: Array
  idx: Array
  labels: Array
  age: Array
  ptr: Array


class Lookup(NamedTuple):
  """The result of `lookup` for (rows,) = (n_global * batch,) anchors, view-major."""
  topk_index: Array  # (rows, k) int32, by descending similarity.
  nn_index: Array  # (rows,) int32: topk_index[r, choice[r]].
  neighbours: Array  # (rows, dim) float32: x[nn_index], raw.
  metrics: dict[str, Array]  # 'nn-similarity', 'nn-age', 'nn-accuracy': () float32 means.


def init(rng: Array, size: int, dim: int) -> Queue:
  """The official initial queue: x ~ N(0, 1), ids and labels -1, ages 0, pointer 0."""
  return Queue(x=jax.random.normal(rng, (size, dim), jnp.float32),
               idx=jnp.full((size,), -1, jnp.int32), labels=jnp.full((size,), -1, jnp.int32),
               age=jnp.zeros((size,), jnp.int32), ptr=jnp.zeros((), jnp.int32))


def random_choice(rng: Array, rows: int, topk: int) -> Array:
  """Training's pick among the top k: uniform in [0, topk) for each anchor row, (rows,) int32."""
  return jax.random.randint(rng, (rows,), 0, topk, jnp.int32)


def lookup(queue: Queue, anchors: Array, idx: Array, labels: Array, choice: Array,
           topk: int) -> Lookup:
  """Nearest-neighbour lookup of `anchors` in `queue`, with the official metrics.

  Args:
    queue: the buffers before this step's update.
    anchors: (n_global * batch, dim) projector outputs of the global views, view-major.
    idx: (batch,) sample ids; rows of the same sample are never retrieved.
    labels: (batch,) class labels (for 'nn-accuracy').
    choice: (n_global * batch,) int in [0, topk): which of the top k each row takes.
    topk: k.

  Returns:
    `Lookup`; nothing in it carries a gradient.
  """
  anchors = jax.lax.stop_gradient(anchors.astype(jnp.float32))
  n_views = anchors.shape[0] // idx.shape[0]
  sim = (layers.l2_normalize(anchors, _NORMALIZE_EPS)
         @ layers.l2_normalize(queue.x, _NORMALIZE_EPS).T)
  same_sample = jnp.tile(idx, n_views)[:, None] == queue.idx[None, :]
  sim = jnp.where(same_sample, -1.0, sim)
  _, topk_index = jax.lax.top_k(sim, topk)
  nn_index = jnp.take_along_axis(topk_index, choice[:, None].astype(jnp.int32), axis=1)[:, 0]
  neighbours = queue.x[nn_index]
  norms = jnp.linalg.norm(anchors, axis=-1) * jnp.linalg.norm(neighbours, axis=-1)
  cosine = jnp.sum(anchors * neighbours, axis=-1) / jnp.maximum(norms, _COSINE_EPS)
  metrics = {
      'nn-similarity': jnp.mean(cosine),
      'nn-age': jnp.mean(queue.age[nn_index].astype(jnp.float32)),
      'nn-accuracy': jnp.mean((jnp.tile(labels, n_views) == queue.labels[nn_index])
                              .astype(jnp.float32)),
  }
  return Lookup(topk_index.astype(jnp.int32), nn_index.astype(jnp.int32), neighbours, metrics)


def enqueue(queue: Queue, rows: Array, idx: Array, labels: Array) -> Queue:
  """FIFO write of global view 0's anchors at the pointer, wrapping around the end.

  Args:
    queue: the buffers before the write.
    rows: (batch, dim) raw projector outputs of global view 0 (not normalised).
    idx: (batch,) their sample ids.
    labels: (batch,) their class labels.

  Raises:
    ValueError: more rows than the queue holds (the official code cannot do it either).
  """
  n, size = rows.shape[0], queue.x.shape[0]
  if n > size:
    raise ValueError(f'Cannot enqueue {n} rows into a queue of {size}: the queue size must be '
                     'at least the global batch size.')
  positions = (queue.ptr + jnp.arange(n, dtype=jnp.int32)) % size
  return Queue(
      x=queue.x.at[positions].set(jax.lax.stop_gradient(rows).astype(queue.x.dtype)),
      idx=queue.idx.at[positions].set(idx.astype(jnp.int32)),
      labels=queue.labels.at[positions].set(labels.astype(jnp.int32)),
      age=queue.age.at[positions].set(0) + n,
      ptr=(queue.ptr + n) % size)


# ---------------------------------------------------------------------------- official names
_OFFICIAL = {'x': 'x', 'idx': 'idx', 'labels': 'cls', 'age': 'age', 'ptr': 'ptr'}


def from_official(state_dict: Mapping[str, np.ndarray], prefix: str = 'queue.') -> Queue:
  """Official `queue.*` buffers (x (Q, O), idx / cls / age (Q,), ptr (1,)) -> `Queue`.

  Raises:
    ValueError: a buffer is missing or its shape does not fit the others.
  """
  missing = [prefix + n for n in _OFFICIAL.values() if prefix + n not in state_dict]
  if missing:
    raise ValueError(f'Missing queue buffers: {missing}.')
  get = lambda field: np.asarray(state_dict[prefix + _OFFICIAL[field]])
  size = get('x').shape[0]
  expected = {'x': (size, get('x').shape[-1]), 'idx': (size,), 'labels': (size,),
              'age': (size,), 'ptr': (1,)}
  wrong = [f'{prefix}{_OFFICIAL[f]}: expected {s}, found {get(f).shape}'
           for f, s in expected.items() if get(f).shape != s]
  if get('x').ndim != 2 or wrong:
    raise ValueError('Queue buffers of inconsistent shapes: ' + '; '.join(wrong or [
        f'{prefix}x must be (size, dim), found {get("x").shape}']))
  return Queue(x=jnp.asarray(get('x'), jnp.float32),
               idx=jnp.asarray(get('idx'), jnp.int32), labels=jnp.asarray(get('labels'), jnp.int32),
               age=jnp.asarray(get('age'), jnp.int32), ptr=jnp.asarray(get('ptr')[0], jnp.int32))


def to_official(queue: Queue, prefix: str = 'queue.') -> dict[str, np.ndarray]:
  """`Queue` -> official buffers (ids, labels, ages and pointer int64, pointer shaped (1,))."""
  out = {prefix + _OFFICIAL[f]: np.asarray(getattr(queue, f)).astype(np.int64)
         for f in ('idx', 'labels', 'age')}
  out[prefix + 'x'] = np.asarray(queue.x, np.float32)
  out[prefix + 'ptr'] = np.asarray(queue.ptr, np.int64).reshape(1)
  return out
