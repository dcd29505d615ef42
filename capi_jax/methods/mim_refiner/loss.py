"""MIM-Refiner's nearest-neighbour contrastive loss (NNA), as the official `NnclrLoss` computes it.

For anchor (global) view i and prediction view j, with z the anchors, n their neighbours from
the queue and p the predictions, each L2-normalised (eps 1e-12):
  logits[a, c] = n_i[a] . p_j[c] / T   if c == a   (the positive is the neighbour)
               = z_i[a] . p_j[c] / T   otherwise   (negatives: the sample's own projection
                                                    against the other samples' predictions)
  term(i, j) = mean over rows a of cross_entropy(logits[a], a).
Terms, as `losses/ssl/nnclr_loss.py` (release commit cc57423) sums them:
  - global: every ordered pair i != j of the G global views;
  - local: for every global i and j = 0 .. L-1, prediction view j counted from the *first
    global view* (so with G = 2 and L = 10 the local terms use views 0..9: both globals,
    including the pair (i, i), and locals 0..7; the last two local views enter only through
    BatchNorm statistics). Reproduced as written.
total = (sum of all terms) / (G (G - 1) + G L); only p carries gradient (z and n are detached).

Written on global arrays (the batch axis may be sharded): the official gathers the predictions
of all devices for the negatives and averages the per-device means, which is the mean over
the global batch computed here.
"""

import jax
import jax.numpy as jnp
import numpy as np

from capi_jax.models import layers

Array = jax.Array

_NORMALIZE_EPS = 1e-12


def nna_loss(anchors: Array, neighbours: Array, predictions: Array, n_global: int,
             temperature: float) -> tuple[Array, dict[str, Array]]:
  """The NNA loss of one head and its official parts.

  Args:
    anchors: (n_global * batch, dim) projector outputs of the global views, view-major.
    neighbours: (n_global * batch, dim) the queue rows swapped in for them.
    predictions: (n_views * batch, dim) predictor outputs of all views, view-major, global
      views first.
    n_global: G.
    temperature: T.

  Returns:
    total () float32 and {'global_loss', 'global_alignment'} plus, when there are local views,
    {'local_loss', 'local_alignment'}: the mean term and the mean softmax probability of the
    positive (no gradient) over the global terms and over the local terms.
  """
  batch = anchors.shape[0] // n_global
  n_views = predictions.shape[0] // batch
  n_local = n_views - n_global
  normalize = lambda x, views: layers.l2_normalize(
      x.astype(jnp.float32), _NORMALIZE_EPS).reshape(views, batch, -1)
  z = normalize(jax.lax.stop_gradient(anchors), n_global)
  n = normalize(jax.lax.stop_gradient(neighbours), n_global)
  # Prediction views the terms read: 0 .. max(G, L) - 1.
  used = max(n_global, n_local)
  p = normalize(predictions, n_views)[:used]

  negatives = jnp.einsum('iad,jcd->ijac', z, p) / temperature  # (G, used, batch, batch)
  positives = jnp.einsum('iad,jad->ija', n, p) / temperature  # (G, used, batch)
  eye = jnp.eye(batch, dtype=bool)
  logits = jnp.where(eye, positives[..., None], negatives)
  log_prob = jnp.diagonal(jax.nn.log_softmax(logits, axis=-1), axis1=-2, axis2=-1)
  terms = -jnp.mean(log_prob, axis=-1)  # (G, used)
  alignment = jnp.mean(jnp.exp(jax.lax.stop_gradient(log_prob)), axis=-1)

  i, j = np.meshgrid(np.arange(n_global), np.arange(used), indexing='ij')
  global_pairs = ((j < n_global) & (i != j)).astype(np.float32)
  local_pairs = (j < n_local).astype(np.float32)
  n_global_terms, n_local_terms = n_global * (n_global - 1), n_global * n_local
  global_sum, local_sum = jnp.sum(terms * global_pairs), jnp.sum(terms * local_pairs)
  total = (global_sum + local_sum) / max(n_global_terms + n_local_terms, 1)
  parts = {
      'global_loss': global_sum / max(n_global_terms, 1),
      'global_alignment': jnp.sum(alignment * global_pairs) / max(n_global_terms, 1),
  }
  if n_local_terms:
    parts['local_loss'] = local_sum / n_local_terms
    parts['local_alignment'] = jnp.sum(alignment * local_pairs) / n_local_terms
  return total, parts
