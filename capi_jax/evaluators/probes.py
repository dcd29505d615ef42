"""Classification protocols on frozen features: k-NN, linear probes and the attentive probe.

Everything here works on features already extracted (see `evaluate.py`), held in device memory:
- `knn_index` / `knn_classify`: cosine k-NN with temperature-weighted votes (DINO), several k in
  one pass, chunked over the keys so that memory is bounded by (query_chunk, key_chunk), with the
  queries sharded over all devices.
- `train_probe_grid`: trains one probe per (learning rate, weight decay) pair in ONE jitted pass,
  the grid being a `vmap` axis; AdamW with betas (0.9, 0.95) as in the reference, cosine schedule.
- `linear_probe` / `attentive_probe`: the grid trained on train minus a held-out fraction, the
  grid point chosen on the held-out part, its accuracy reported on test.
"""

from collections.abc import Callable, Sequence
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from capi_jax.core import sharding

PyTree = Any
ApplyFn = Callable[[PyTree, jax.Array], jax.Array]


# ----------------------------------------------------------------------------------------------
# k-NN.


def _pad_to(x: np.ndarray, n: int) -> np.ndarray:
  """Zero rows appended up to n rows."""
  return np.pad(x, [(0, n - x.shape[0])] + [(0, 0)] * (x.ndim - 1))


@functools.partial(jax.jit, static_argnames=('k_max', 'metric', 'key_chunk'))
def _knn_chunk(queries: jax.Array, keys: jax.Array, n_keys: jax.Array, *, k_max: int,
               metric: str, key_chunk: int) -> tuple[jax.Array, jax.Array]:
  """Top-k neighbours of a chunk of queries, scanning the keys chunk by chunk.

  Args:
    queries: (n_queries, dim), already L2-normalised for the cosine metric.
    keys: (n_chunks * key_chunk, dim), padded; rows at or after `n_keys` are padding.
    n_keys: () number of real keys.
    k_max: neighbours kept.
    metric: 'cosine' (similarity = dot product) or 'l2' (similarity = -squared distance).
    key_chunk: keys compared at once; bounds memory to (n_queries, key_chunk).

  Returns:
    (similarities (n_queries, k_max) descending, key indices (n_queries, k_max)).
  """
  n_q = queries.shape[0]
  key_chunks = keys.reshape(-1, key_chunk, keys.shape[-1])
  q_sq = jnp.sum(queries * queries, axis=-1, keepdims=True)

  def body(carry, inputs):
    best_sim, best_idx = carry
    chunk, start = inputs
    sim = queries @ chunk.T
    if metric == 'l2':
      sim = 2 * sim - q_sq - jnp.sum(chunk * chunk, axis=-1)[None]
    idx = start + jnp.arange(key_chunk)
    sim = jnp.where(idx[None] < n_keys, sim, -jnp.inf)
    # Merging the running top-k with this chunk's candidates keeps memory independent of n_keys.
    sim = jnp.concatenate([best_sim, sim], axis=1)
    idx = jnp.concatenate([best_idx, jnp.broadcast_to(idx, (n_q, key_chunk))], axis=1)
    best_sim, pos = jax.lax.top_k(sim, k_max)
    return (best_sim, jnp.take_along_axis(idx, pos, axis=1)), None

  init = (jnp.full((n_q, k_max), -jnp.inf, queries.dtype), jnp.zeros((n_q, k_max), jnp.int32))
  starts = jnp.arange(key_chunks.shape[0], dtype=jnp.int32) * key_chunk
  (best_sim, best_idx), _ = jax.lax.scan(body, init, (key_chunks, starts))
  return best_sim, best_idx


@functools.partial(jax.jit, static_argnames=('ks', 'metric'))
def _knn_votes(sim: jax.Array, neighbour_targets: jax.Array, *, ks: tuple[int, ...],
               temperature: float, metric: str) -> jax.Array:
  """(len(ks), n_queries, n_classes) votes from the (n_queries, k_max, n_classes) neighbours."""
  if metric == 'cosine':
    weights = jnp.exp(sim / temperature)
  else:  # Squared distances have no natural scale, so L2 neighbours vote equally.
    weights = jnp.ones_like(sim)
  weighted = neighbour_targets * weights[..., None]
  return jnp.stack([weighted[:, :k].sum(axis=1) for k in ks])


def _unit(x: np.ndarray) -> np.ndarray:
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def knn_index(keys: np.ndarray, key_targets: np.ndarray, *, ks: Sequence[int],
              num_classes: int, temperature: float = 0.07, metric: str = 'cosine',
              query_chunk: int = 1024, key_chunk: int = 8192
              ) -> Callable[[np.ndarray], np.ndarray]:
  """A k-NN voter over `keys`, placed on the devices once for any number of query batches.

  Cosine votes are weighted by exp(similarity / temperature) as in DINO; L2 votes are uniform.

  Args:
    keys: (n_keys, dim) features.
    key_targets: (n_keys,) int class labels, or (n_keys, num_classes) soft labels (e.g. the class
      fractions of a segmentation patch).
    ks: neighbour counts; each must be <= n_keys.
    num_classes: number of classes.
    temperature: softmax temperature of the cosine votes.
    metric: 'cosine' or 'l2'.
    query_chunk: queries per call, sharded over all devices (rounded up to a multiple of them).
    key_chunk: keys compared at once.

  Returns:
    queries (n_queries, dim) -> (len(ks), n_queries, num_classes) float32 votes.
  """
  if metric not in ('cosine', 'l2'):
    raise ValueError(f'Unknown k-NN metric {metric!r}: use "cosine" or "l2".')
  ks = tuple(int(k) for k in ks)
  n_keys = keys.shape[0]
  if max(ks) > n_keys:
    raise ValueError(f'k-NN with k={max(ks)} needs at least that many keys, got {n_keys}: '
                     'lower the ks or use more training images.')
  keys = np.asarray(keys, np.float32)
  if metric == 'cosine':
    keys = _unit(keys)
  key_targets = np.asarray(key_targets)
  if key_targets.ndim == 1:
    key_targets = np.eye(num_classes, dtype=np.float32)[key_targets]
  mesh = jax.make_mesh((jax.device_count(),), ('batch',),
                       axis_types=(jax.sharding.AxisType.Auto,))
  replicated = sharding.replicated(mesh)
  by_batch = sharding.batch_sharding(mesh)
  key_chunk = min(key_chunk, n_keys)
  keys = jax.device_put(_pad_to(keys, math.ceil(n_keys / key_chunk) * key_chunk), replicated)
  key_targets = jax.device_put(key_targets.astype(np.float32), replicated)
  n_dev = jax.device_count()

  def votes(queries: np.ndarray) -> np.ndarray:
    queries = np.asarray(queries, np.float32)
    if metric == 'cosine':
      queries = _unit(queries)
    chunk_size = math.ceil(min(query_chunk, len(queries)) / n_dev) * n_dev
    out = []
    for start in range(0, len(queries), chunk_size):
      chunk = queries[start:start + chunk_size]
      padded = jax.device_put(_pad_to(chunk, chunk_size), by_batch)
      sim, idx = _knn_chunk(padded, keys, jnp.int32(n_keys), k_max=max(ks), metric=metric,
                            key_chunk=key_chunk)
      v = _knn_votes(sim, key_targets[idx], ks=ks, temperature=temperature, metric=metric)
      out.append(np.asarray(v)[:, :len(chunk)])
    return np.concatenate(out, axis=1)

  return votes


def knn_classify(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray,
                 test_y: np.ndarray, *, ks: Sequence[int], num_classes: int,
                 temperature: float = 0.07) -> dict[str, float]:
  """Cosine k-NN top-1 accuracy on test for each k: {'k10': acc, ...} (accuracies in [0, 1])."""
  votes = knn_index(train_x, train_y, ks=ks, num_classes=num_classes,
                    temperature=temperature)(test_x)
  correct = votes.argmax(-1) == np.asarray(test_y)[None]
  return {f'k{k}': float(c.mean()) for k, c in zip(ks, correct)}


# ----------------------------------------------------------------------------------------------
# Trained probes, a grid of (lr, wd) at once.


def linear_apply(params: PyTree, x: jax.Array) -> jax.Array:
  """Linear classifier: x (batch, dim) -> logits (batch, n_classes)."""
  return x @ params['kernel'] + params['bias']


def linear_init(dim: int, num_classes: int) -> PyTree:
  # Zeros are a fine start for a convex problem, and make every grid point start alike.
  return {'kernel': jnp.zeros((dim, num_classes)), 'bias': jnp.zeros((num_classes,))}


class AttentiveProbe(nn.Module):
  """One learned query attending over the patch tokens, then a linear classifier.

  Heads are dim / 64 (at least 1), as in the reference's attentive probe.
  """
  num_classes: int

  @nn.compact
  def __call__(self, tokens: jax.Array) -> jax.Array:
    """tokens (batch, n_tokens, dim) -> logits (batch, num_classes)."""
    b, _, dim = tokens.shape
    heads = max(1, dim // 64)
    if dim % heads:
      raise ValueError(f'Attentive probe: dim {dim} is not divisible by its {heads} heads.')
    query = self.param('query', nn.initializers.normal(0.02), (dim,))
    kv = nn.Dense(2 * dim, name='kv', kernel_init=nn.initializers.normal(0.02))(tokens)
    k, v = jnp.split(kv.reshape(b, -1, 2, heads, dim // heads), 2, axis=2)
    q = query.reshape(heads, dim // heads)
    attn = jax.nn.softmax(jnp.einsum('hc,bthc->bht', q, k[:, :, 0]) / math.sqrt(dim // heads))
    pooled = jnp.einsum('bht,bthc->bhc', attn, v[:, :, 0]).reshape(b, dim)
    return nn.Dense(self.num_classes, name='head', kernel_init=nn.initializers.zeros)(pooled)


def _cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Mean cross-entropy; targets are int labels (batch,) or class distributions (batch, C)."""
  if targets.ndim == logits.ndim:
    return optax.softmax_cross_entropy(logits, targets).mean()
  return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


def _cosine_lr(lr: jax.Array, step: jax.Array, iters: int) -> jax.Array:
  # A 5% linear warmup keeps the larger grid learning rates stable under Adam's early steps.
  warmup = max(1, iters // 20)
  cosine = 0.5 * (1 + jnp.cos(jnp.pi * jnp.minimum(step - warmup, iters) / (iters - warmup)))
  return lr * jnp.where(step < warmup, (step + 1) / warmup, cosine)


def _adamw(lr: jax.Array, wd: jax.Array, iters: int) -> optax.GradientTransformation:
  # Decay only matrices (not biases, norm scales or the probe's query), as usual for probes.
  return optax.adamw(lambda step: _cosine_lr(lr, step, iters), b1=0.9, b2=0.95,
                     weight_decay=wd, mask=lambda p: jax.tree.map(lambda x: x.ndim > 1, p))


def hyper_grid(lrs: Sequence[float], wds: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
  """Flattened lr x wd grid: (lrs (G,), wds (G,)) with G = len(lrs) * len(wds)."""
  lr, wd = np.meshgrid(np.asarray(lrs, np.float32), np.asarray(wds, np.float32), indexing='ij')
  return lr.ravel(), wd.ravel()


@functools.partial(jax.jit, static_argnames=('apply_fn', 'iters', 'batch_size'))
def train_probe_grid(apply_fn: ApplyFn, init_params: PyTree, x: jax.Array, targets: jax.Array,
                     lrs: jax.Array, wds: jax.Array, rng: jax.Array, *, iters: int,
                     batch_size: int) -> PyTree:
  """Trains one probe per (lrs[g], wds[g]) pair, all in one pass over the same minibatches.

  Args:
    apply_fn: (params, x_batch) -> logits.
    init_params: the starting parameters, shared by every grid point.
    x: (n, ...) inputs.
    targets: (n,) int labels or (n, n_classes) class distributions.
    lrs: (G,) peak learning rates.
    wds: (G,) AdamW weight decays.
    rng: minibatch sampling key.
    iters: optimisation steps.
    batch_size: samples per step (drawn with replacement).

  Returns:
    The G trained parameter sets, stacked on a leading axis.
  """

  def train_one(lr, wd):
    tx = _adamw(lr, wd, iters)

    def step(carry, key):
      params, opt_state = carry
      idx = jax.random.randint(key, (batch_size,), 0, x.shape[0])
      grads = jax.grad(lambda p: _cross_entropy(apply_fn(p, x[idx]), targets[idx]))(params)
      updates, opt_state = tx.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), None

    (params, _), _ = jax.lax.scan(step, (init_params, tx.init(init_params)),
                                  jax.random.split(rng, iters))
    return params

  return jax.vmap(train_one)(lrs, wds)


@functools.partial(jax.jit, static_argnames=('apply_fn',))
def _grid_predict(apply_fn: ApplyFn, grid_params: PyTree, x: jax.Array) -> jax.Array:
  return jax.vmap(lambda p: apply_fn(p, x).argmax(-1))(grid_params)


def grid_accuracy(apply_fn: ApplyFn, grid_params: PyTree, x: np.ndarray, y: np.ndarray,
                  chunk: int = 2048) -> np.ndarray:
  """(G,) top-1 accuracy of each grid point on (x, y), evaluated `chunk` samples at a time."""
  correct = 0
  for start in range(0, len(x), chunk):
    pred = _grid_predict(apply_fn, grid_params, jnp.asarray(x[start:start + chunk]))
    correct = correct + (np.asarray(pred) == np.asarray(y[start:start + chunk])[None]).sum(1)
  return correct / len(x)


def held_out_split(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """(fit indices, held-out indices): a seeded random `fraction` of range(n) is held out."""
  if not 0 < fraction < 1:
    raise ValueError(f'held_out_fraction must be in (0, 1), got {fraction}.')
  perm = np.random.default_rng(seed).permutation(n)
  n_held = max(1, int(round(n * fraction)))
  return np.sort(perm[n_held:]), np.sort(perm[:n_held])


def standardizer(x: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
  """Per-channel standardisation with statistics from `x` (..., dim).

  Features of different models differ in scale by orders of magnitude; standardising them makes
  one learning-rate grid fit all (the affine-free BatchNorm of MAE's linear probe).
  """
  axes = tuple(range(x.ndim - 1))
  mean = x.mean(axes, dtype=np.float64).astype(np.float32)
  std = x.std(axes, dtype=np.float64).astype(np.float32) + 1e-6
  return lambda z: ((z - mean) / std).astype(np.float32)


def fit_grid(apply_fn: ApplyFn, init_params: PyTree, x: np.ndarray, targets: np.ndarray, *,
             lrs: Sequence[float], wds: Sequence[float], iters: int, batch_size: int, seed: int
             ) -> tuple[PyTree, Callable[[np.ndarray], np.ndarray], np.ndarray, np.ndarray]:
  """Standardises x and trains the lr x wd grid of probes on it.

  Returns:
    (G stacked parameter sets, the standardiser to apply to other inputs, lrs (G,), wds (G,)).
  """
  norm = standardizer(x)
  grid_lr, grid_wd = hyper_grid(lrs, wds)
  params = train_probe_grid(apply_fn, init_params, jnp.asarray(norm(x)), jnp.asarray(targets),
                            jnp.asarray(grid_lr), jnp.asarray(grid_wd), jax.random.key(seed),
                            iters=iters, batch_size=batch_size)
  return params, norm, grid_lr, grid_wd


def _select_and_report(apply_fn: ApplyFn, init_params: PyTree, train_x: np.ndarray,
                       train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray, *,
                       lrs: Sequence[float], wds: Sequence[float], iters: int, batch_size: int,
                       held_out_fraction: float, seed: int) -> dict[str, float]:
  fit, held = held_out_split(len(train_x), held_out_fraction, seed)
  params, norm, grid_lr, grid_wd = fit_grid(apply_fn, init_params, train_x[fit], train_y[fit],
                                            lrs=lrs, wds=wds, iters=iters,
                                            batch_size=batch_size, seed=seed)
  held_acc = grid_accuracy(apply_fn, params, norm(train_x[held]), train_y[held])
  best = int(np.argmax(held_acc))
  best_params = jax.tree.map(lambda p: p[best:best + 1], params)
  test_acc = grid_accuracy(apply_fn, best_params, norm(test_x), test_y)[0]
  return {'top1': float(test_acc), 'held_out_top1': float(held_acc[best]),
          'lr': float(grid_lr[best]), 'wd': float(grid_wd[best])}


def linear_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray,
                 test_y: np.ndarray, *, num_classes: int, lrs: Sequence[float],
                 wds: Sequence[float], iters: int, batch_size: int,
                 held_out_fraction: float = 0.1, seed: int = 0) -> dict[str, float]:
  """Linear probe over the lr x wd grid on (n, dim) features.

  Returns:
    {'top1': test accuracy of the grid point best on held-out train, 'held_out_top1', 'lr', 'wd'}.
  """
  return _select_and_report(linear_apply, linear_init(train_x.shape[-1], num_classes),
                            train_x, train_y, test_x, test_y, lrs=lrs, wds=wds, iters=iters,
                            batch_size=batch_size, held_out_fraction=held_out_fraction,
                            seed=seed)


def attentive_probe(train_tokens: np.ndarray, train_y: np.ndarray, test_tokens: np.ndarray,
                    test_y: np.ndarray, *, num_classes: int, lrs: Sequence[float],
                    wds: Sequence[float], iters: int, batch_size: int,
                    held_out_fraction: float = 0.1, seed: int = 0) -> dict[str, float]:
  """Attentive probe over the lr x wd grid on (n, n_tokens, dim) patch tokens.

  Returns:
    {'top1': test accuracy of the grid point best on held-out train, 'held_out_top1', 'lr', 'wd'}.
  """
  probe = AttentiveProbe(num_classes)
  init_params = probe.init(jax.random.key(seed), jnp.zeros((1,) + train_tokens.shape[1:]))
  return _select_and_report(probe.apply, init_params, train_tokens, train_y, test_tokens, test_y,
                            lrs=lrs, wds=wds, iters=iters, batch_size=batch_size,
                            held_out_fraction=held_out_fraction, seed=seed)
