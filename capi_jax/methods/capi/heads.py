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
  # Whole on every device (64 MiB for ViT-L's 1024 x 16384): from the kernel's FSDP shards, XLA
  # computed the (n_pos, batch, K) logits as a collective matmul whose partial sums were each a
  # new logits-sized buffer.
  logits = head.apply({'params': layers.gather_weights(head_params)}, patches)
  assignments = jax.lax.stop_gradient(sinkhorn_knopp(logits / target_temp, n_sk_iter))
  return soft_cross_entropy(logits, assignments, pred_temp), assignments


def clustering_step(head_params: Params, patches: Array, picked: Array, target_temp: float,
                    pred_temp: float, n_sk_iter: int, chunks: int = 1, unroll: bool = False
                    ) -> tuple[Array, Params, Array]:
  """`clustering_targets_and_loss`, its gradient and the targets at `picked`, `chunks` groups of
  positions at a time.

  Sinkhorn runs per position, so groups of positions are independent: each group's logits,
  assignments and loss gradient are computed and dropped in turn (a scan), and per-device
  memory holds one group's (positions / chunks, local batch, K) arrays instead of the whole
  step's (a GiB each for ViT-L at 64 images per device). The loss and gradient are the means
  of the groups' (equal-sized) means: the whole step's, up to float32 summation order.

  Args:
    head_params: `ClusteringHead` params.
    patches: (n_pos, batch, D) teacher patch outputs; batch is the global batch.
    picked: (batch, n_pick) int positions whose assignments are returned.
    target_temp, pred_temp, n_sk_iter: as `clustering_targets_and_loss`.
    chunks: groups of positions; divides n_pos.
    unroll: the groups one after the other in the program instead of a loop (XLA's cost
      analysis counts a loop's body once; the step's FLOPs are counted with loops unrolled).

  Returns:
    loss (), grads like head_params, targets (batch, n_pick, K): the (detached) assignments of
    each sample at its picked positions.
  """
  n_pos, batch = patches.shape[:2]
  if n_pos % chunks:
    raise ValueError(f'chunks={chunks} must divide the {n_pos} positions.')
  size = n_pos // chunks
  loss_fn = lambda p, x: clustering_targets_and_loss(p, x, target_temp, pred_temp, n_sk_iter)

  def group(start: Array, x: Array) -> tuple[Array, Params, Array, Array]:
    loss, vjp, assignments = jax.vjp(lambda p: loss_fn(p, x), head_params, has_aux=True)
    (grads,) = vjp(jnp.ones_like(loss))
    local = picked - start
    mine = (local >= 0) & (local < size)
    # Per sample (vmapped: a gather with a batch dimension, which stays on each batch shard).
    rows = jax.vmap(lambda a, i: a[i], in_axes=(1, 0))(assignments, jnp.clip(local, 0, size - 1))
    return loss, grads, rows, mine  # rows: (batch, n_pick, K)

  if chunks == 1:
    loss, grads, targets, _ = group(jnp.int32(0), patches)
    return loss, grads, targets

  def body(carry, xs):
    loss_sum, grads_sum, targets = carry
    loss, grads, rows, mine = group(*xs)
    targets = jnp.where(mine[..., None], rows, targets)
    return (loss_sum + loss, jax.tree.map(jnp.add, grads_sum, grads), targets), None

  num_clusters = head_params['kernel'].shape[-1]
  init = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, head_params),
          layers.shard_batch(jnp.zeros((batch, picked.shape[1], num_clusters), jnp.float32)))
  starts = jnp.arange(chunks, dtype=picked.dtype) * size
  groups = patches.reshape(chunks, size, *patches.shape[1:])
  (loss_sum, grads_sum, targets), _ = jax.lax.scan(body, init, (starts, groups), unroll=unroll)
  return loss_sum / chunks, jax.tree.map(lambda g: g / chunks, grads_sum), targets


def position_chunks(n_pos: int, local_batch: int, num_clusters: int,
                    max_bytes: int = 256 * 2**20) -> int:
  """The fewest groups of positions (a divisor of n_pos) whose (positions, local_batch,
  num_clusters) float32 logits take at most `max_bytes` on a device (one position a group at
  most)."""
  for chunks in range(1, n_pos + 1):
    if n_pos % chunks == 0 and (n_pos // chunks) * local_batch * num_clusters * 4 <= max_bytes:
      return chunks
  return n_pos


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
