"""CAPI's heads and losses: online clustering (teacher) and the L2-normalised student head.

Reproduces `OnlineClustering`, `sinkhorn_knopp`, `L2NormLinear` and the losses of the official
release (facebookresearch/capi, commit 98b4fa1); see `docs/reference/capi_algorithm.md`.
Heads compute in float32 whatever the backbone's compute dtype.

Parameters: `ClusteringHead` has `kernel (D, K)` and `bias (K,)` (official `layer.weight (K, D)`,
`layer.bias`); `L2NormLinear` has `kernel_v (D, K)` and `kernel_g (1, K)` (official
`last_layer.weight_v (K, D)`, `last_layer.weight_g (K, 1)`).
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from capi_jax.models import layers

Array = jax.Array
Params = Any

# The release shifts the logits so their max over the batch is 50 before exp (float32/bf16).
_SK_EXP_MAX = 50.0
_SK_EPS = 1e-8
_WEIGHT_NORM_EPS = 1e-8


def sinkhorn_knopp(scores: Array, n_iterations: int) -> Array:
  """Sinkhorn-Knopp over the sample axis (-2) and the cluster axis (-1), as the release.

  Written on global arrays: under `jax.jit` with the sample axis sharded over devices, the max
  and sums over that axis are global (GSPMD inserts the all-reduces the release does by hand).

  Args:
    scores: (..., samples, clusters) logits / temperature.
    n_iterations: number of {samples, clusters} normalisation rounds.

  Returns:
    (..., samples, clusters) float32 assignments; each row sums to ~1 over clusters.
  """
  scores = scores.astype(jnp.float32)
  shift = jnp.max(scores, axis=-2, keepdims=True)
  m = jnp.exp(scores + (_SK_EXP_MAX - shift))
  for _ in range(n_iterations):
    m = m / (jnp.sum(m, axis=-2, keepdims=True) + _SK_EPS)
    m = m / (jnp.sum(m, axis=-1, keepdims=True) + _SK_EPS)
  return m


def soft_cross_entropy(logits: Array, targets: Array, temperature: float) -> Array:
  """Mean over rows of -sum_k targets * log_softmax(logits / temperature); (..., K) inputs."""
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32) / temperature, axis=-1)
  return -jnp.mean(jnp.sum(targets.astype(jnp.float32) * log_probs, axis=-1))


def target_entropy(targets: Array) -> Array:
  """The release's `target_entropy` metric: mean over tokens of -sum_k t log t; (..., K) -> ()."""
  t = targets.astype(jnp.float32)
  return -jnp.mean(jnp.sum(jax.scipy.special.xlogy(t, t), axis=-1))


class ClusteringHead(nn.Module):
  """Online clustering head: L2-normalise, then linear dim -> K (init N(0, 1), bias 0)."""
  num_clusters: int
  use_bias: bool = True

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """(..., D) -> logits (..., num_clusters), float32."""
    x = layers.l2_normalize(x.astype(jnp.float32), eps=1e-7)
    kernel = self.param('kernel', nn.initializers.normal(1.0), (x.shape[-1], self.num_clusters))
    logits = jnp.matmul(x, kernel, precision=jax.lax.Precision.HIGHEST)
    if self.use_bias:
      logits = logits + self.param('bias', nn.initializers.zeros, (self.num_clusters,))
    return logits


def clustering_targets_and_loss(head_params: Params, patches: Array, target_temp: float,
                                pred_temp: float, n_sk_iter: int) -> tuple[Array, Array]:
  """Position-wise Sinkhorn targets and the clustering loss (differentiable in head_params).

  Args:
    head_params: `ClusteringHead` params ({'kernel': (D, K)} and optionally {'bias': (K,)}).
    patches: (n_pos, batch, D) teacher patch outputs; batch is the *global* batch.
    target_temp: temperature of the Sinkhorn input logits.
    pred_temp: temperature of the predicted distribution.
    n_sk_iter: Sinkhorn iterations.

  Returns:
    loss (): mean over (position, sample) of the cross-entropy between the (detached) targets
      and softmax(logits / pred_temp);
    assignments (n_pos, batch, K): the targets, without gradient.
  """
  num_clusters = head_params['kernel'].shape[-1]
  head = ClusteringHead(num_clusters, use_bias='bias' in head_params)
  logits = head.apply({'params': head_params}, patches)
  assignments = jax.lax.stop_gradient(sinkhorn_knopp(logits / target_temp, n_sk_iter))
  return soft_cross_entropy(logits, assignments, pred_temp), assignments


class L2NormLinear(nn.Module):
  """Student head: L2-normalise, then a weight-normalised linear `w = g * v / ||v||`, no bias.

  `kernel_v` is (D, K) (init normal std 0.02: the release's trunc_normal_(std=0.02) truncates at
  +-2 absolute, i.e. never), `kernel_g` (1, K) init 1; the norm runs over D for each cluster.
  """
  num_clusters: int

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """(..., D) -> logits (..., num_clusters), float32."""
    x = layers.l2_normalize(x.astype(jnp.float32), eps=1e-12)
    v = self.param('kernel_v', nn.initializers.normal(0.02), (x.shape[-1], self.num_clusters))
    g = self.param('kernel_g', nn.initializers.ones, (1, self.num_clusters))
    v_norm = jnp.sqrt(jnp.sum(jnp.square(v), axis=0, keepdims=True))
    w = v * (g / (v_norm + _WEIGHT_NORM_EPS))
    return jnp.matmul(x, w, precision=jax.lax.Precision.HIGHEST)


def capi_loss(logits: Array, targets: Array, student_temp: float) -> Array:
  """CAPI loss: mean over predicted tokens of CE(targets, softmax(logits / student_temp)).

  Args:
    logits: (..., K) student head output at the predicted positions.
    targets: (..., K) teacher Sinkhorn assignments at the same positions.
    student_temp: temperature.

  Returns:
    () float32.
  """
  return soft_cross_entropy(logits, targets, student_temp)
