"""One ID head's training objective: head forward, queue lookup, NNA loss.

The method sums `head_objective` over its heads (each fed its own pooled features), takes the
gradient of the sum, and after the optimiser update writes each head's new BatchNorm statistics
(`HeadOutputs.batch_stats`) and enqueues its global view 0 anchors (`HeadOutputs.enqueue_rows`)
with `queue.enqueue`, as the official `ContrastiveModel` + `ContrastiveTrainer` step does.
"""

from typing import Any, NamedTuple

import jax

from capi_jax.methods.mim_refiner import heads
from capi_jax.methods.mim_refiner import loss
from capi_jax.methods.mim_refiner import queue

Array = jax.Array
PyTree = Any


class HeadOutputs(NamedTuple):
  """What one head's step computed besides its loss (nothing here carries a gradient path
  except `predicted`)."""
  anchors: Array  # (n_global * batch, dim) projector outputs of the global views ("preswap").
  predicted: Array  # (n_views * batch, dim) predictor outputs of all views.
  lookup: queue.Lookup  # neighbours ("postswap"), their indices and the nn-* metrics.
  parts: dict[str, Array]  # nna_loss's global/local losses and alignments.
  batch_stats: PyTree  # the head's BatchNorm running statistics after this batch.

  def enqueue_rows(self, batch: int) -> Array:
    """(batch, dim) anchors of global view 0: what the queue stores after the update."""
    return self.anchors[:batch]


def head_objective(head: heads.IdHead, params: PyTree, batch_stats: PyTree,
                   queue_state: queue.Queue, features: Array, idx: Array, labels: Array,
                   choice: Array, *, n_global: int, topk: int, temperature: float
                   ) -> tuple[Array, HeadOutputs]:
  """The head's NNA loss (differentiable in `params` and `features`) and its `HeadOutputs`.

  Args:
    head: the head's module.
    params: its params.
    batch_stats: its BatchNorm running statistics before this batch.
    queue_state: its queue before this step's update.
    features: (n_views * batch, in_dim) pooled encoder features of all views, view-major,
      global views first.
    idx: (batch,) sample ids (a sample never retrieves itself from the queue).
    labels: (batch,) class labels (stored in the queue; the nn-accuracy metric only).
    choice: (n_global * batch,) int in [0, topk): the pick among the top k of each anchor row
      (`queue.random_choice` in training).
    n_global: G, the number of global views (the first G views).
    topk: k of the neighbour lookup.
    temperature: the loss temperature.
  """
  (projected, predicted), updated = head.apply(
      {'params': params, 'batch_stats': batch_stats}, features, mutable=['batch_stats'])
  anchors = jax.lax.stop_gradient(projected[:n_global * idx.shape[0]])
  found = queue.lookup(queue_state, anchors, idx, labels, choice, topk)
  total, parts = loss.nna_loss(anchors, found.neighbours, predicted, n_global, temperature)
  return total, HeadOutputs(anchors, predicted, found, parts, updated['batch_stats'])
