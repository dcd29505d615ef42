r"""The official segmentation protocol ('seg'): CAPI's eval_segmentation.py, number for number.

Frozen patch features, two classifiers fitted on them (`docs/reference/capi_eval_protocols.md`):
- Images are squashed to (R, R) (bicubic), masks to (R, R) (NEAREST, as palette images); every
  metric is computed on these R x R masks. A patch carries the p * p labels of its pixels
  (`patch_label_rows`).
- Without a validation set, `held_out_split` keeps the first n // 10 of numpy's
  `permutation(n)` after `seed(0)` (the official global-RNG state) as validation.
- Features are standardised (`fit_scaler`, default 'StandardScaler') with statistics of the
  training split only.
- Training patches whose *mode* label (smallest on ties, as `torch.mode`) is an ignore label are
  dropped before fitting (`fit_mask`).
- k-NN (`knn_predict`): cosine (1 - cos) or L2 distance, the k nearest training patches, and for
  every pixel position of the query patch the most frequent label of the neighbours at that
  position (smallest on ties; ignore labels vote too). Run on all devices, the training patches
  split over them.
- Logistic regression (`fit_logreg`): mean cross-entropy + ||W||^2 / (2 C N), bias unpenalised,
  full softmax (sigmoid for two classes), minimised with L-BFGS (memory 5) from zeros: cuML's
  problem, whose minimiser sklearn's lbfgs also finds. Classes are the sorted labels present
  (label-encoded, as sklearn; cuML 24.06 would index its softmax by label value instead, so on
  labels that are not 0..n-1 it never predicts the largest). The patch's prediction is copied to
  its p * p pixels.
- Every grid point is fitted on the training split and scored (mIoU) on validation; the best is
  kept (the first in the official ranks' order on ties, `selection_order`), refitted on
  train + validation (the scaler stays the training split's) and scored on test.
- Metrics pool every test pixel whose ground truth is not an ignore label: accuracy, and mIoU as
  sklearn's macro `jaccard_score` over the labels present in ground truth or prediction (a
  predicted ignore label counts as a class with IoU 0).

Everything is numpy on the host except the distance and logistic-regression arithmetic, which
runs jitted on the devices of `mesh` (float32, 'highest' matmul precision).
"""

from collections.abc import Iterator, Sequence
import dataclasses
import functools
import itertools
import math
from typing import Any, ClassVar

import jax
from jax.sharding import NamedSharding, PartitionSpec as P
import jax.numpy as jnp
import numpy as np
import optax

from capi_jax.base import problems as problems_lib
from capi_jax.evaluators import protocol
from capi_jax.evaluators import seg_data

# Official defaults (eval_segmentation.py, KNNClassifier, LogregClassifier).
KNN_NEIGHBOURS = (1, 3, 10, 30)
KNN_DISTANCES = ('cosine', 'L2')
LOGREG_C = tuple(float(c) for c in 10 ** np.linspace(-6, 5, 8))
LOGREG_MAX_ITER = 1000
LOGREG_TOL = 1e-12
LOGREG_LINESEARCH_MAX_ITER = 50
LOGREG_MEMORY = 5
SCALERS = ('center', 'center_div', 'StandardScaler', 'RobustScaler', 'pca', 'pca_whiten')
# The official jobs run on one node of 8 GPUs; ranks share the grid (see `selection_order`).
OFFICIAL_WORLD_SIZE = 8
_ROWS_PER_CHUNK = 1 << 16  # Host chunks: bounds float64 temporaries to 512 KiB per feature.


def padded_size(n: int, block: int = _ROWS_PER_CHUNK) -> int:
  """n rounded up to a power of two below `block`, to a multiple of it above: fits of similar
  sizes (grid points, refits) then share one compilation."""
  return 1 << max(n - 1, 0).bit_length() if n <= block else -(-n // block) * block


# ----------------------------------------------------------------------------------------------
# Split, labels.


def held_out_split(n: int) -> tuple[np.ndarray, np.ndarray]:
  """(train indices, validation indices) of n training images, in the official order."""
  perm = np.random.RandomState(0).permutation(n)
  return perm[n // 10:], perm[:n // 10]


def patch_label_rows(labels: np.ndarray, patch: int) -> np.ndarray:
  """(n, H, W) pixel labels -> (n * h * w, patch * patch): image, patch row, patch column order.

  Each row holds one patch's pixel labels, row-major inside the patch.
  """
  n, height, width = labels.shape
  if height % patch or width % patch:
    raise ValueError(f'Label maps of {height}x{width} do not split into {patch}x{patch} patches.')
  h, w = height // patch, width // patch
  return labels.reshape(n, h, patch, w, patch).transpose(0, 1, 3, 2, 4).reshape(
      n * h * w, patch * patch)


def row_modes(rows: np.ndarray) -> np.ndarray:
  """(n, m) uint8 -> (n,) most frequent value of each row, the smallest on ties."""
  modes = np.empty(len(rows), rows.dtype)
  for start in range(0, len(rows), _ROWS_PER_CHUNK):
    chunk = rows[start:start + _ROWS_PER_CHUNK].astype(np.int64)
    offsets = np.arange(len(chunk))[:, None] * 256
    counts = np.bincount((chunk + offsets).ravel(), minlength=len(chunk) * 256)
    modes[start:start + len(chunk)] = counts.reshape(len(chunk), 256).argmax(1)
  return modes


def fit_mask(rows: np.ndarray, ignore_labels: Sequence[int]) -> np.ndarray:
  """(n,) bool: the patches a classifier is fitted on (mode label not ignored)."""
  return ~np.isin(row_modes(rows), np.asarray(ignore_labels))


# ----------------------------------------------------------------------------------------------
# Standardisation (utils.standardizations), fitted in float64 like scikit-learn.


@dataclasses.dataclass(frozen=True)
class Scaler:
  """x -> ((x - center) @ projection) / scale, as float32; `attributes` are sklearn's names."""
  center: np.ndarray
  scale: np.ndarray | float
  projection: np.ndarray | None
  attributes: dict[str, Any]

  def __call__(self, x: np.ndarray) -> np.ndarray:
    out = []
    for start in range(0, len(x), _ROWS_PER_CHUNK):
      chunk = x[start:start + _ROWS_PER_CHUNK].astype(np.float64) - self.center
      if self.projection is not None:
        chunk = chunk @ self.projection
      out.append((chunk / self.scale).astype(np.float32))
    return np.concatenate(out) if out else np.zeros((0, x.shape[1]), np.float32)


def _chunked_sum(x: np.ndarray, fn) -> np.ndarray:
  return sum(fn(x[s:s + _ROWS_PER_CHUNK].astype(np.float64)).sum(0)
             for s in range(0, len(x), _ROWS_PER_CHUNK))


def _nonzero_scale(scale: np.ndarray) -> np.ndarray:
  # sklearn's _handle_zeros_in_scale: constant features keep their values.
  return np.where(scale < 10 * np.finfo(scale.dtype).eps, 1.0, scale)


def _pca(x: np.ndarray, mean: np.ndarray, whiten: bool) -> Scaler:
  """PCA(svd_solver='covariance_eigh'): all components, signs by sklearn's svd_flip."""
  n = len(x)
  cov = 0.0
  for start in range(0, n, _ROWS_PER_CHUNK):
    centred = x[start:start + _ROWS_PER_CHUNK].astype(np.float64) - mean
    cov = cov + centred.T @ centred
  cov = cov / (n - 1)
  values, vectors = np.linalg.eigh(cov)
  values, vectors = np.maximum(values[::-1], 0.0), vectors[:, ::-1]
  k = min(n, x.shape[1])
  components = vectors[:, :k].T
  # svd_flip(u_based_decision=False): each component's largest-|.| entry is positive.
  components *= np.sign(components[np.arange(k), np.abs(components).argmax(1)])[:, None]
  variance = values[:k]
  scale = np.maximum(np.sqrt(variance), np.finfo(np.float64).eps) if whiten else 1.0
  return Scaler(mean, scale, components.T, {'mean_': mean, 'components_': components,
                                            'explained_variance_': variance})


def fit_scaler(name: str, x: np.ndarray) -> Scaler:
  """utils.standardizations[name] fitted on x (n, D)."""
  n = len(x)
  mean = _chunked_sum(x, lambda c: c) / n
  if name == 'center':
    return Scaler(mean, 1.0, None, {'mean_': mean})
  if name == 'StandardScaler':
    var = _chunked_sum(x, lambda c: (c - mean) ** 2) / n
    scale = _nonzero_scale(np.sqrt(var))
    return Scaler(mean, scale, None, {'mean_': mean, 'var_': var, 'scale_': scale})
  if name == 'center_div':  # One std over every entry (around the global mean), not per channel.
    grand_mean = mean.mean()
    std = float(np.sqrt(_chunked_sum(x, lambda c: (c - grand_mean) ** 2).sum() / x.size))
    return Scaler(mean, std + 1e-8, None, {'mean': mean[None], 'std': std})
  if name == 'RobustScaler':
    center = np.median(x, axis=0).astype(np.float64)
    q25, q75 = np.percentile(x, (25, 75), axis=0).astype(np.float64)
    scale = _nonzero_scale(q75 - q25)
    return Scaler(center, scale, None, {'center_': center, 'scale_': scale})
  if name in ('pca', 'pca_whiten'):
    return _pca(x, mean, whiten=name == 'pca_whiten')
  raise ValueError(f'Unknown standardization {name!r}; use one of {SCALERS}.')


# ----------------------------------------------------------------------------------------------
# k-NN.


def _distances(queries: jax.Array, keys: jax.Array, distance: str) -> jax.Array:
  """(q, m) distances in the official formulas, computed in the inputs' dtype."""
  precision = jax.lax.Precision.HIGHEST
  if distance == 'cosine':
    # Inputs are unit-normalised already; 1 - cos is rounded to the dtype, as torch does.
    sim = jnp.dot(queries, keys.T, precision=precision, preferred_element_type=jnp.float32)
    return 1 - sim.astype(queries.dtype)
  # torch.cdist's matmul form: |a|^2 + |b|^2 - 2 a.b, clamped at 0, square root.
  q32, k32 = queries.astype(jnp.float32), keys.astype(jnp.float32)
  sq = (jnp.sum(q32 * q32, -1)[:, None] + jnp.sum(k32 * k32, -1)[None]
        - 2 * jnp.dot(q32, k32.T, precision=precision))
  return jnp.sqrt(jnp.maximum(sq, 0))


def _local_top_k(queries: jax.Array, keys: jax.Array, n_keys: jax.Array, offset: jax.Array, *,
                 k: int, distance: str, key_chunk: int) -> tuple[jax.Array, jax.Array]:
  """The k smallest distances to `keys` (this device's share) and their global key indices.

  Keys are scanned `key_chunk` at a time, each chunk's candidates merged into the running top k
  (the official per-chunk top-k and merge), so memory is (queries, key_chunk).
  """
  n_q = queries.shape[0]
  chunks = keys.reshape(-1, key_chunk, keys.shape[-1])

  def body(carry, inputs):
    best_d, best_i = carry
    chunk, start = inputs
    d = _distances(queries, chunk, distance).astype(jnp.float32)
    d = jnp.where(offset + start + jnp.arange(key_chunk)[None] < n_keys, d, jnp.inf)
    neg, pos = jax.lax.top_k(-jnp.concatenate([best_d, d], 1), k)
    # Positions < k are the running best; the others are this chunk's keys.
    kept = jnp.take_along_axis(best_i, jnp.minimum(pos, k - 1), 1)
    return (-neg, jnp.where(pos < k, kept, offset + start + pos - k)), None

  init = (jnp.full((n_q, k), jnp.inf, jnp.float32), jnp.zeros((n_q, k), jnp.int32))
  starts = jnp.arange(chunks.shape[0], dtype=jnp.int32) * key_chunk
  (best_d, best_i), _ = jax.lax.scan(body, init, (chunks, starts))
  return best_d, best_i


@functools.partial(jax.jit, static_argnames=('mesh', 'k', 'distance', 'key_chunk'))
def _top_k(queries: jax.Array, keys: jax.Array, n_keys: jax.Array, *, mesh: jax.sharding.Mesh,
           k: int, distance: str, key_chunk: int) -> tuple[jax.Array, jax.Array]:
  """(distances, global indices) (q, k) of the k nearest keys, nearest first; the keys are
  split over every device of mesh."""
  axes = mesh.axis_names

  def per_device(queries, keys, n_keys):
    offset = jax.lax.axis_index(axes) * keys.shape[0]
    d, i = _local_top_k(queries, keys, n_keys, offset.astype(jnp.int32), k=k,
                        distance=distance, key_chunk=key_chunk)
    d = jax.lax.all_gather(d, axes, axis=1, tiled=True)
    i = jax.lax.all_gather(i, axes, axis=1, tiled=True)
    neg, pos = jax.lax.top_k(-d, k)
    return -neg, jnp.take_along_axis(i, pos, 1)

  return jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(axes), P()),
                       out_specs=(P(), P()), check_vma=False)(queries, keys, n_keys)


@functools.partial(jax.jit, static_argnames=('ks', 'n_values'))
def _vote(codes: jax.Array, *, ks: tuple[int, ...], n_values: int) -> jax.Array:
  """(q, k_max, m) neighbour label codes, nearest first -> (len(ks), q, m) per-pixel modes.

  Codes index the sorted label values, so the first maximum is the smallest label, as
  `torch.mode` picks.
  """
  counts = jnp.zeros((*codes.shape[::2], n_values), jnp.int16)
  modes = []
  for j in range(codes.shape[1]):
    counts += jax.nn.one_hot(codes[:, j], n_values, dtype=jnp.int16)
    if j + 1 in ks:
      modes.append(counts.argmax(-1))
  return jnp.stack([modes[sorted(ks).index(k)] for k in ks])


@dataclasses.dataclass
class KnnIndex:
  """Training vectors on the devices, split over `mesh`, ready for any number of queries."""
  keys: jax.Array
  n_keys: int
  distance: str
  dtype: Any
  mesh: jax.sharding.Mesh
  key_chunk: int


@functools.partial(jax.jit, static_argnames=('distance', 'dtype'))
def _prepare(x: jax.Array, *, distance: str, dtype: Any) -> jax.Array:
  """Cast to the compute dtype, then unit-normalise for cosine (the official order)."""
  x = x.astype(dtype)
  if distance == 'cosine':
    x = x / jnp.linalg.norm(x, axis=-1, keepdims=True)
  return x


def knn_fit(features: np.ndarray, *, distance: str, dtype: str, mesh: jax.sharding.Mesh,
            key_chunk: int = 65536) -> KnnIndex:
  """Puts the training vectors (n, D) on the devices."""
  if distance not in KNN_DISTANCES:
    raise ValueError(f'Unknown k-NN distance {distance!r}; use one of {KNN_DISTANCES}.')
  n, n_dev = len(features), mesh.devices.size
  per_device = padded_size(-(-n // n_dev), key_chunk)
  key_chunk = min(key_chunk, per_device)
  padded = np.zeros((per_device * n_dev, features.shape[1]), np.float32)
  padded[:n] = features
  sharding = NamedSharding(mesh, P(mesh.axis_names))
  keys = _prepare(jax.device_put(padded, sharding), distance=distance, dtype=jnp.dtype(dtype))
  return KnnIndex(keys, n, distance, jnp.dtype(dtype), mesh, key_chunk)


def knn_neighbours(index: KnnIndex, queries: np.ndarray, k: int, query_chunk: int = 1024
                   ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """(distances, indices) (chunk, k) of the k nearest training vectors, query chunk by chunk."""
  if k > index.n_keys:
    raise ValueError(f'k-NN with k={k} needs at least that many training vectors, got '
                     f'{index.n_keys}.')
  replicated = NamedSharding(index.mesh, P())
  for start in range(0, len(queries), query_chunk):
    chunk = queries[start:start + query_chunk]
    padded = np.zeros((query_chunk, chunk.shape[1]), np.float32)
    padded[:len(chunk)] = chunk
    q = _prepare(jax.device_put(padded, replicated), distance=index.distance, dtype=index.dtype)
    d, i = _top_k(q, index.keys, jnp.int32(index.n_keys), mesh=index.mesh, k=k,
                  distance=index.distance, key_chunk=index.key_chunk)
    yield np.asarray(d)[:len(chunk)], np.asarray(i)[:len(chunk)]


def knn_predict(index: KnnIndex, rows: np.ndarray, queries: np.ndarray, ks: Sequence[int]
                ) -> dict[int, np.ndarray]:
  """{k: (n_queries, m) uint8 per-pixel labels} for every k, from one neighbour search.

  Args:
    index: the training patches.
    rows: (n_keys, m) their patch-label rows.
    queries: (n_queries, D).
    ks: neighbour counts.
  """
  ks = tuple(int(k) for k in ks)
  values = np.unique(rows)
  codes = np.searchsorted(values, rows).astype(np.int32)
  out = {k: [] for k in ks}
  for _, nearest in knn_neighbours(index, queries, max(ks)):
    modes = np.asarray(_vote(jnp.asarray(codes[nearest]), ks=ks, n_values=len(values)))
    for k, m in zip(ks, modes):
      out[k].append(values[m])
  return {k: np.concatenate(v) if v else np.zeros((0, rows.shape[1]), rows.dtype)
          for k, v in out.items()}


# ----------------------------------------------------------------------------------------------
# Logistic regression.


@dataclasses.dataclass(frozen=True)
class Logreg:
  """A fitted logistic regression: classes (c,), coef (c or 1, D), intercept (c or 1,)."""
  classes: np.ndarray
  coef: np.ndarray
  intercept: np.ndarray
  n_iter: int

  def predict(self, x: np.ndarray) -> np.ndarray:
    """(n, D) -> (n,) labels."""
    out = []
    for start in range(0, len(x), _ROWS_PER_CHUNK):
      scores = x[start:start + _ROWS_PER_CHUNK].astype(np.float64) @ self.coef.T + self.intercept
      best = (scores[:, 0] > 0).astype(int) if len(self.classes) == 2 else scores.argmax(1)
      out.append(self.classes[best])
    return np.concatenate(out) if out else np.zeros((0,), self.classes.dtype)


def _logreg_objective(params: dict[str, jax.Array], x: jax.Array, y: jax.Array, n: jax.Array,
                      C: jax.Array, scale: jax.Array, binary: bool) -> jax.Array:
  """mean cross-entropy + ||W||^2 / (2 C n) over the n real rows (padding rows have y = -1),
  with W = scale * params['v']."""
  w = scale * params['v']
  logits = jnp.dot(x, w.T, precision=jax.lax.Precision.HIGHEST) + params['b']
  real = y >= 0
  if binary:
    z = logits[:, 0]
    loss = jax.nn.softplus(z) - jnp.where(y == 1, z, 0.0)
  else:
    loss = -jnp.take_along_axis(jax.nn.log_softmax(logits), jnp.maximum(y, 0)[:, None], 1)[:, 0]
  return jnp.sum(jnp.where(real, loss, 0.0)) / n + jnp.sum(w ** 2) / (2 * C * n)


@functools.partial(jax.jit, static_argnames=('binary', 'max_iter', 'linesearch_max_iter',
                                             'memory', 'patience'))
def _lbfgs_loop(x: jax.Array, y: jax.Array, n: jax.Array, C: jax.Array, scale: jax.Array,
                tol: jax.Array,
                params: dict[str, jax.Array], *, binary: bool, max_iter: int,
                linesearch_max_iter: int, memory: int, patience: int
                ) -> tuple[dict[str, jax.Array], jax.Array]:
  """L-BFGS from `params` until max_iter iterations, |grad|_inf <= tol, or no smaller gradient
  for `patience` iterations (float32's floor). Returns the iterate with the smallest gradient
  and the number of iterations."""
  fun = lambda p: _logreg_objective(p, x, y, n, C, scale, binary)
  opt = optax.lbfgs(memory_size=memory, linesearch=optax.scale_by_zoom_linesearch(
      max_linesearch_steps=linesearch_max_iter))
  value_and_grad = optax.value_and_grad_from_state(fun)

  def body(carry):
    params, state, best, best_norm, k, stall = carry
    value, grad = value_and_grad(params, state=state)
    norm = jnp.max(jnp.stack([jnp.max(jnp.abs(g)) for g in jax.tree.leaves(grad)]))
    better = norm < best_norm
    best = jax.tree.map(lambda p, b: jnp.where(better, p, b), params, best)
    updates, state = opt.update(grad, state, params, value=value, grad=grad, value_fn=fun)
    return (optax.apply_updates(params, updates), state, best, jnp.minimum(norm, best_norm),
            k + 1, jnp.where(better, 0, stall + 1))

  def cond(carry):
    *_, best_norm, k, stall = carry
    return (k < max_iter) & (best_norm > tol) & (stall < patience)

  init = (params, opt.init(params), params, jnp.float32(jnp.inf), jnp.int32(0), jnp.int32(0))
  _, _, best, _, k, _ = jax.lax.while_loop(cond, body, init)
  return best, k


def fit_logreg(features: np.ndarray, labels: np.ndarray, *, C: float,
               mesh: jax.sharding.Mesh, max_iter: int = LOGREG_MAX_ITER,
               tol: float = LOGREG_TOL, linesearch_max_iter: int = LOGREG_LINESEARCH_MAX_ITER,
               lbfgs_memory: int = LOGREG_MEMORY, patience: int = 20) -> Logreg:
  """L2-regularised logistic regression of labels (n,) on features (n, D); see the docstring.

  The rows are split over the devices of `mesh` (XLA sums the gradient over them).
  """
  classes, y = np.unique(labels, return_inverse=True)
  if len(classes) < 2:
    raise ValueError(f'Logistic regression needs patches of at least 2 classes, got only '
                     f'{classes.tolist()}: check the ignore labels and the masks.')
  binary = len(classes) == 2
  n, dim = features.shape
  n_dev = mesh.devices.size
  padded = padded_size(-(-n // n_dev)) * n_dev
  x = np.zeros((padded, dim), np.float32)
  x[:n] = features
  y = np.concatenate([y, -np.ones(padded - n, np.int64)]).astype(np.int32)
  rows = NamedSharding(mesh, P(mesh.axis_names))
  outputs = 1 if binary else len(classes)
  params = {'v': jnp.zeros((outputs, dim), jnp.float32), 'b': jnp.zeros((outputs,), jnp.float32)}
  # W = scale * v: with a strong penalty (small C n) the weights' curvature 1 / (C n) would dwarf
  # the bias's; in v both are ~1, which L-BFGS needs to converge in float32. Same minimiser.
  scale = min(1.0, math.sqrt(C * n))
  best, k = _lbfgs_loop(jax.device_put(x, rows), jax.device_put(y, rows), jnp.float32(n),
                        jnp.float32(C), jnp.float32(scale), jnp.float32(tol), params,
                        binary=binary,
                        max_iter=max_iter, linesearch_max_iter=linesearch_max_iter,
                        memory=lbfgs_memory, patience=patience)
  coef = scale * np.asarray(best['v'], np.float64)
  intercept = np.asarray(best['b'], np.float64)
  if not binary:  # The softmax's free shift of the unpenalised bias: sklearn's zero-sum one.
    intercept = intercept - intercept.mean()
  return Logreg(classes, coef, intercept, int(k))


# ----------------------------------------------------------------------------------------------
# Metrics (eval_segmentation.py mIoU / accuracy).


def _confusion(gt: np.ndarray, pred: np.ndarray, ignore_labels: Sequence[int]) -> np.ndarray:
  """(256, 256) counts [gt, pred] over the pixels whose ground truth is not ignored."""
  gt, pred = gt.reshape(-1), pred.reshape(-1)
  counts = np.zeros(256 * 256, np.int64)
  for start in range(0, len(gt), 1 << 24):
    g = gt[start:start + (1 << 24)].astype(np.int64)
    p = pred[start:start + (1 << 24)].astype(np.int64)
    keep = ~np.isin(g, np.asarray(ignore_labels))
    counts += np.bincount(g[keep] * 256 + p[keep], minlength=256 * 256)
  return counts.reshape(256, 256)


def metrics(gt: np.ndarray, pred: np.ndarray, ignore_labels: Sequence[int]) -> dict[str, float]:
  """{'mIoU', 'acc'} of uint8 predictions against uint8 ground truth (any equal shapes)."""
  conf = _confusion(gt, pred, ignore_labels)
  tp = np.diag(conf).astype(np.float64)
  gt_count, pred_count = conf.sum(1), conf.sum(0)
  present = (gt_count + pred_count) > 0
  iou = tp[present] / (gt_count + pred_count - tp)[present]
  total = conf.sum()
  return {'mIoU': float(np.mean(iou)) if present.any() else 0.0,
          'acc': float(tp.sum() / total) if total else 0.0}


# ----------------------------------------------------------------------------------------------
# The protocol.


@dataclasses.dataclass(frozen=True)
class Settings:
  """eval_model's arguments that change a number (official defaults; the ADE20K job's k-NN runs
  in bfloat16 and ignores (0, 255))."""
  ignore_labels: tuple[int, ...] = (0, 255)
  classifiers: tuple[str, ...] = ('knn', 'logreg')
  standardization: str | None = 'StandardScaler'
  knn_neighbours: tuple[int, ...] = KNN_NEIGHBOURS
  knn_distances: tuple[str, ...] = KNN_DISTANCES
  knn_dtype: str = 'float32'
  logreg_C: tuple[float, ...] = LOGREG_C
  logreg_max_iter: int = LOGREG_MAX_ITER
  logreg_tol: float = LOGREG_TOL
  logreg_linesearch_max_iter: int = LOGREG_LINESEARCH_MAX_ITER
  logreg_memory: int = LOGREG_MEMORY
  world_size: int = OFFICIAL_WORLD_SIZE

  def grid(self, classifier: str) -> list[dict[str, Any]]:
    """The hyper-parameter grid in official order (itertools.product of the official names)."""
    if classifier == 'knn':
      names, values = ('num_neighbors', 'distance'), (self.knn_neighbours, self.knn_distances)
    elif classifier == 'logreg':
      names = ('C', 'max_iter', 'tol', 'linesearch_max_iter', 'lbfgs_hessian_rank')
      values = (self.logreg_C, (self.logreg_max_iter,), (self.logreg_tol,),
                (self.logreg_linesearch_max_iter,), (self.logreg_memory,))
    else:
      raise ValueError(f"Unknown segmentation classifier {classifier!r}: use 'knn' or 'logreg'.")
    return [dict(zip(names, combo)) for combo in itertools.product(*values)]


def selection_order(n: int, world_size: int) -> list[int]:
  """Grid indices in the order the official code compares them: rank r fits r, r + W, ...; the
  ranks' results are merged rank by rank, and `max` keeps the first best."""
  return [i for rank in range(world_size) for i in range(rank, n, world_size)]


def _knn(x_fit: np.ndarray, rows_fit: np.ndarray, queries: np.ndarray,
         grid: list[dict[str, Any]], settings: Settings, mesh: jax.sharding.Mesh
         ) -> tuple[list[np.ndarray], list[Any]]:
  """Per grid point: (n_queries, m) predictions; one neighbour search per distance."""
  keep = fit_mask(rows_fit, settings.ignore_labels)
  by_point = {}
  for distance in dict.fromkeys(h['distance'] for h in grid):
    index = knn_fit(x_fit[keep], distance=distance, dtype=settings.knn_dtype, mesh=mesh)
    ks = [h['num_neighbors'] for h in grid if h['distance'] == distance]
    for k, pred in knn_predict(index, rows_fit[keep], queries, ks).items():
      by_point[(k, distance)] = pred
  return [by_point[(h['num_neighbors'], h['distance'])] for h in grid], [None] * len(grid)


def _logreg(x_fit: np.ndarray, rows_fit: np.ndarray, queries: np.ndarray,
            grid: list[dict[str, Any]], settings: Settings, mesh: jax.sharding.Mesh
            ) -> tuple[list[np.ndarray], list[Logreg]]:
  """Per grid point: (n_queries, m) predictions (the patch's label on all its pixels)."""
  keep = fit_mask(rows_fit, settings.ignore_labels)
  targets = row_modes(rows_fit[keep])
  preds, models = [], []
  for h in grid:
    model = fit_logreg(x_fit[keep], targets, C=h['C'], mesh=mesh, max_iter=h['max_iter'],
                       tol=h['tol'], linesearch_max_iter=h['linesearch_max_iter'],
                       lbfgs_memory=h['lbfgs_hessian_rank'])
    patch_pred = model.predict(queries)
    preds.append(np.repeat(patch_pred[:, None], rows_fit.shape[1], axis=1))
    models.append(model)
  return preds, models


_CLASSIFIERS = {'knn': _knn, 'logreg': _logreg}


@dataclasses.dataclass
class Outcome:
  """`results`: eval_model's dict (official key names, fractions in [0, 1]). The rest is for
  inspection: per classifier the selected hyper-parameters, the test predictions (n_test_patches,
  m) and the refitted model (a `Logreg`, or None for k-NN)."""
  results: dict[str, float]
  selected: dict[str, dict[str, Any]]
  test_predictions: dict[str, np.ndarray]
  models: dict[str, Any]


def evaluate(train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray],
             settings: Settings, mesh: jax.sharding.Mesh,
             val: tuple[np.ndarray, np.ndarray] | None = None) -> Outcome:
  """eval_model on extracted features.

  Args:
    train: (feature maps (n, h, w, D) float32, label maps (n, R, R) uint8), images in dataset
      order; R / h is the patch size.
    test: the same for the test images.
    settings: the protocol's settings.
    mesh: the devices to run k-NN and logistic regression on.
    val: a validation set; None holds out a tenth of train (`held_out_split`).

  Returns:
    The outcome; `results` has 'hparam_fitting.<classifier>.mIoU_<hparams>' (grids of more than
    one point) and 'labels_<classifier>_{mIoU,acc}'.
  """
  if val is None:
    train_idx, val_idx = held_out_split(len(train[0]))
    val = (train[0][val_idx], train[1][val_idx])
    train = (train[0][train_idx], train[1][train_idx])
  splits = {'train': train, 'val': val, 'test': test}
  feats = {k: f.reshape(-1, f.shape[-1]) for k, (f, _) in splits.items()}
  patch = train[1].shape[1] // train[0].shape[1]
  rows = {k: patch_label_rows(labels, patch) for k, (_, labels) in splits.items()}
  if settings.standardization is not None:
    scaler = fit_scaler(settings.standardization, feats['train'])
    feats = {k: scaler(f) for k, f in feats.items()}
  outcome = Outcome({}, {}, {}, {})
  for name in settings.classifiers:
    if name not in _CLASSIFIERS:
      raise ValueError(f"Unknown segmentation classifier {name!r}: use 'knn' or 'logreg'.")
    fit_predict = _CLASSIFIERS[name]
    grid = settings.grid(name)
    best = grid[0]
    if len(grid) > 1:
      preds, _ = fit_predict(feats['train'], rows['train'], feats['val'], grid, settings, mesh)
      val_miou = [metrics(rows['val'], p, settings.ignore_labels)['mIoU'] for p in preds]
      order = selection_order(len(grid), settings.world_size)
      best = grid[max(order, key=lambda i: val_miou[i])]  # max keeps the first best.
      for i in order:
        hparams = '_'.join(f'{k}={v}' for k, v in grid[i].items())
        outcome.results[f'hparam_fitting.{name}.mIoU_{hparams}'] = val_miou[i]
    (pred,), (model,) = fit_predict(np.concatenate([feats['train'], feats['val']]),
                                    np.concatenate([rows['train'], rows['val']]),
                                    feats['test'], [best], settings, mesh)
    for metric, value in metrics(rows['test'], pred, settings.ignore_labels).items():
      outcome.results[f'labels_{name}_{metric}'] = value
    outcome.selected[name] = best
    outcome.test_predictions[name] = pred
    outcome.models[name] = model
  return outcome


def run(backbone, train_set, test_set, settings: Settings, resolution: int, val_set=None, *,
        num_workers: int = 0) -> Outcome:
  """eval_model: features of `seg_data` sets through `backbone` at `resolution`, then `evaluate`.

  Every image is squashed to (resolution, resolution); feature maps and label maps are held in
  host memory (4 D bytes per patch, resolution^2 bytes per image), as the official code does.
  `num_workers` Grain processes read the images.
  """

  def extract(dataset) -> tuple[np.ndarray, np.ndarray]:
    out = backbone.extract(seg_data.batches(dataset, range(len(dataset)), resolution,
                                            backbone.batch_size, num_workers=num_workers),
                           outputs=('feature_map',))
    return out['feature_map'], out['labels']

  val = None if val_set is None else extract(val_set)
  return evaluate(extract(train_set), extract(test_set), settings, backbone.mesh, val)


SEG_READERS = tuple(seg_data.READERS)
_STANDARDIZATIONS = ('',) + SCALERS


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class Seg(protocol.Protocol):
  """'seg': `run` on `dataset`'s splits (configs/vitl.py documents the keys; the numeric ones
  are `Settings`'s, `standardization` '' for none)."""
  name: ClassVar[str] = 'seg'

  dataset: str  # '<reader>:<root>' (`seg_data.make_seg_set`).
  train_split: str
  val_split: str  # '': hold out a tenth of train, as the official code.
  test_split: str
  resolution: int
  ignore_labels: Sequence[int]
  classifiers: Sequence[str]
  standardization: str
  knn_neighbours: Sequence[int]
  knn_distances: Sequence[str]
  knn_dtype: str
  logreg_C: Sequence[float]  # pylint: disable=invalid-name  (the official name)
  logreg_max_iter: int
  logreg_tol: float
  logreg_linesearch_max_iter: int
  logreg_memory: int
  world_size: int

  @property
  def settings(self) -> Settings:
    return Settings(
        ignore_labels=tuple(self.ignore_labels), classifiers=tuple(self.classifiers),
        standardization=self.standardization or None,
        knn_neighbours=tuple(self.knn_neighbours), knn_distances=tuple(self.knn_distances),
        knn_dtype=self.knn_dtype, logreg_C=tuple(float(v) for v in self.logreg_C),
        logreg_max_iter=self.logreg_max_iter, logreg_tol=self.logreg_tol,
        logreg_linesearch_max_iter=self.logreg_linesearch_max_iter,
        logreg_memory=self.logreg_memory, world_size=self.world_size)

  def check(self, p: protocol.Problems, key: str, model: protocol.ModelShape | None) -> None:
    p.check(str(self.dataset).partition(':')[0] in SEG_READERS,
            f'{key}.dataset={self.dataset!r} must be ade20k:ROOT, voc2012:ROOT, '
            'cityscapes:ROOT, folder:ROOT or fashion_mnist_scenes[:DIR].')
    for split_key in ('train_split', 'test_split'):
      split = getattr(self, split_key)
      p.check(isinstance(split, str) and split, f'{key}.{split_key}={split!r} must name a split.')
    p.check(isinstance(self.val_split, str),
            f"{key}.val_split={self.val_split!r} must be a split name or '' (hold out a tenth "
            'of train, as the official code).')
    protocol.check_resolution(p, f'{key}.resolution', self.resolution, model)
    protocol.check_numbers(p, f'{key}.ignore_labels', self.ignore_labels,
                           lambda v: problems_lib.is_int(v) and 0 <= v <= 255,
                           'labels in [0, 255]')
    protocol.check_names(p, f'{key}.classifiers', self.classifiers, tuple(_CLASSIFIERS))
    p.check(self.standardization in _STANDARDIZATIONS,
            f'{key}.standardization={self.standardization!r} must be one of '
            f'{_STANDARDIZATIONS}.')
    protocol.check_numbers(p, f'{key}.knn_neighbours', self.knn_neighbours,
                           lambda v: problems_lib.is_int(v) and v > 0, 'positive integers')
    protocol.check_names(p, f'{key}.knn_distances', self.knn_distances, KNN_DISTANCES)
    p.check(self.knn_dtype in ('float32', 'bfloat16'),
            f"{key}.knn_dtype={self.knn_dtype!r} must be 'float32' or 'bfloat16'.")
    protocol.check_numbers(p, f'{key}.logreg_C', self.logreg_C, lambda v: v > 0,
                           'positive numbers')
    p.number(f'{key}.logreg_max_iter', self.logreg_max_iter, 1, integer=True)
    p.check(protocol.is_number(self.logreg_tol) and self.logreg_tol >= 0,
            f'{key}.logreg_tol={self.logreg_tol!r} must be >= 0.')
    p.number(f'{key}.logreg_linesearch_max_iter', self.logreg_linesearch_max_iter, 1,
             integer=True)
    p.number(f'{key}.logreg_memory', self.logreg_memory, 1, integer=True)
    p.number(f'{key}.world_size', self.world_size, 1, integer=True)

  def run(self, backbone, env, out_dir, log):
    sets = {k: seg_data.make_seg_set(self.dataset, getattr(self, f'{k}_split'))
            for k in ('train', 'test')}
    val = seg_data.make_seg_set(self.dataset, self.val_split) if self.val_split else None
    log(f'seg: {len(sets["train"])} train, {len(sets["test"])} test images of {self.dataset}')
    outcome = run(backbone, sets['train'], sets['test'], self.settings, self.resolution, val,
                  num_workers=env.num_workers)
    del out_dir  # Nothing but numbers.
    return outcome.results, {'selected': outcome.selected}
