r"""MIM-Refiner's own evaluation protocols: k-NN, low-shot logistic regression, clustering.

As ml-jku/MIM-Refiner @cc57423 runs them (`docs/reference/mim_refiner_eval_protocols.md`), on
the pooled features of chosen blocks (`block_features`: 'cls_last1' = the class token of the
last block's raw output, before the encoder's last norm; 'cls_last4' = those of the last 4
blocks side by side; 'avg_last1' = the mean patch token):
- 'mimref_knn' (`metrics/knn.py` multiclass_knn): features standardised with the training
  set's mean and unbiased std (+ 1e-6), rows L2-normalised (clamped at 1e-12), cosine
  similarity, the k nearest training images vote with weights exp(sim / tau), the first
  maximum wins. Defaults k = 10, tau = 0.07. Ks above the training set's size are dropped.
- 'mimref_lowshot' (`offline_logreg_callback.py`, after MSN's logistic_eval.py): per subset
  of the training set (1, 2, 5 images per class, 3 splits: MSN's file lists, from a copy of its
  folder the user gives; or drawn here per class from a seed where no list exists), each feature
  row of the subset is centred (minus its own mean: cyanure's preprocess with columns=False acts
  on rows) and L2-normalised; a multinomial logistic regression without bias minimises
  mean CE(x W) + lambda / 2 ||W||^2 with lambda = 0.00025 / n; the test features are scored
  **raw** (the release does not preprocess them). The release fits with cyanure (stopping at a
  relative duality gap of 1e-3); here a float64 L-BFGS stops at the relative duality gap `tol`
  (default far tighter: the same optimum to ~1e-6). The numbers per shot count are the means
  over the splits (the release's parse_logreg.py).
- 'mimref_cluster' (capi_jax's extra: the release has no clustering code, only a feature dump):
  k-means (k-means++ from a seed, then Lloyd until no assignment changes, float64) on the test
  features; accuracy under the best one-to-one cluster-class matching (Hungarian), NMI
  (arithmetic normalisation), AMI and ARI, as scikit-learn defines them.
"""

from collections.abc import Iterable, Sequence
import dataclasses
import functools
import pathlib
import re
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import scipy.optimize
import scipy.special

from capi_jax.base import problems as problems_lib
from capi_jax.evaluators import block_features
from capi_jax.evaluators import datasets
from capi_jax.evaluators import protocol
from capi_jax.evaluators import seg

KNN_EPS = 1e-6
LOGREG_LAMBDA = 0.00025  # Divided by the subset's size.
_CHUNK = 4096  # Rows per host-side chunk (statistics, distances).


# ----------------------------------------------------------------------------------------------
# k-NN.


def standardize(train_x: np.ndarray, test_x: np.ndarray, eps: float = KNN_EPS
                ) -> tuple[np.ndarray, np.ndarray]:
  """multiclass_knn's preprocessing: (x - mean) / (unbiased std + eps) with the training set's
  statistics, then rows L2-normalised (clamped at 1e-12); float32 (n, D) each."""
  n = len(train_x)
  total = sum(c.astype(np.float64).sum(0) for c in _chunks(train_x))
  mean = total / n
  sq = sum(((c.astype(np.float64) - mean) ** 2).sum(0) for c in _chunks(train_x))
  std = np.sqrt(sq / max(n - 1, 1))
  mean32, scale32 = mean.astype(np.float32), (std + eps).astype(np.float32)

  def apply(x: np.ndarray) -> np.ndarray:
    out = np.empty(x.shape, np.float32)
    for start in range(0, len(x), _CHUNK):
      y = (x[start:start + _CHUNK].astype(np.float32) - mean32) / scale32
      norm = np.sqrt(np.sum(y.astype(np.float64) ** 2, 1, keepdims=True)).astype(np.float32)
      out[start:start + _CHUNK] = y / np.maximum(norm, np.float32(1e-12))
    return out

  return apply(train_x), apply(test_x)


def _chunks(x: np.ndarray) -> Iterable[np.ndarray]:
  return (x[s:s + _CHUNK] for s in range(0, len(x), _CHUNK))


@functools.partial(jax.jit, static_argnames=('ks', 'num_classes'))
def _weighted_votes(sims: jax.Array, labels: jax.Array, taus: jax.Array, *,
                    ks: tuple[int, ...], num_classes: int) -> jax.Array:
  """(q, k_max) similarities (nearest first) and neighbour labels -> (len(ks) * len(taus), q)
  predictions, grid order (k, tau) as itertools.product(ks, taus)."""
  rows = jnp.arange(labels.shape[0])[:, None]
  preds = []
  for k in ks:
    for tau in taus:
      weights = jnp.exp(sims[:, :k] / tau)
      votes = jnp.zeros((labels.shape[0], num_classes)).at[rows, labels[:, :k]].add(weights)
      preds.append(votes.argmax(-1))
  return jnp.stack(preds)


def knn_grid(ks: Sequence[int], taus: Sequence[float], n_train: int
             ) -> list[tuple[int, float]]:
  """The (k, tau) pairs evaluated: ks above n_train dropped, as the release does."""
  return [(int(k), float(t)) for k in ks if k <= n_train for t in taus]


def knn_predict(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray,
                ks: Sequence[int], taus: Sequence[float], num_classes: int,
                mesh: jax.sharding.Mesh) -> np.ndarray:
  """(len(knn_grid), n_test) predicted classes of already standardised features."""
  kept = tuple(int(k) for k in ks if k <= len(train_x))
  if not kept:
    raise ValueError(f'Every k of {tuple(ks)} exceeds the {len(train_x)} training images.')
  index = seg.knn_fit(train_x, distance='cosine', dtype='float32', mesh=mesh)
  preds = []
  for distances, nearest in seg.knn_neighbours(index, test_x, max(kept)):
    # 1 - (1 - s) gives s back exactly for s >= 0.5 (the neighbours that weigh).
    sims = 1 - jnp.asarray(distances)
    preds.append(np.asarray(_weighted_votes(sims, jnp.asarray(train_y[nearest]),
                                            jnp.asarray(taus, jnp.float32), ks=kept,
                                            num_classes=num_classes)))
  return np.concatenate(preds, axis=1)


# ----------------------------------------------------------------------------------------------
# Low-shot logistic regression.


def lowshot_preprocess(x: np.ndarray) -> np.ndarray:
  """cyanure's preprocess(x, centering=True, normalize=True, columns=False), which acts on rows:
  each row minus its own mean, then divided by its L2 norm; float64 (n, D)."""
  x = np.asarray(x, np.float64)
  x = x - x.mean(1, keepdims=True)
  norms = np.sqrt(np.sum(x * x, 1, keepdims=True))
  return x / np.where(norms > 0, norms, 1.0)


@dataclasses.dataclass(frozen=True)
class LogregFit:
  """A multinomial logistic regression without bias: classes (C,), W (D, C) float64."""
  classes: np.ndarray
  w: np.ndarray
  objective: float
  gap: float  # Relative duality gap reached.
  n_iter: int

  def predict(self, x: np.ndarray) -> np.ndarray:
    return self.classes[np.argmax(np.asarray(x, np.float64) @ self.w, 1)]


def _logreg_terms(x: np.ndarray, onehot: np.ndarray, w: np.ndarray, lambd: float
                  ) -> tuple[float, np.ndarray, np.ndarray]:
  """(primal objective, gradient (D, C), softmax (n, C)) of mean CE(x W) + lambd/2 ||W||^2."""
  z = x @ w
  z -= z.max(1, keepdims=True)
  lse = np.log(np.exp(z).sum(1))
  p = np.exp(z - lse[:, None])
  loss = float(np.mean(lse - np.sum(z * onehot, 1)) + 0.5 * lambd * np.sum(w * w))
  return loss, x.T @ (p - onehot) / len(x) + lambd * w, p


def duality_gap(x: np.ndarray, onehot: np.ndarray, w: np.ndarray, lambd: float) -> float:
  """Relative duality gap (P(W) - D(kappa)) / |P(W)| at the dual point kappa_i = softmax(x_i W)
  - y_i: D = mean entropy(softmax) - lambd / 2 ||W(kappa)||^2, W(kappa) = -x^T kappa / (n
  lambd). Zero exactly at the optimum; cyanure stops at 1e-3."""
  primal, _, p = _logreg_terms(x, onehot, w, lambd)
  w_dual = -x.T @ (p - onehot) / (len(x) * lambd)
  entropy = -np.sum(p * np.log(np.maximum(p, 1e-300)), 1)
  dual = float(np.mean(entropy) - 0.5 * lambd * np.sum(w_dual * w_dual))
  return (primal - dual) / max(abs(primal), 1e-300)


def fit_logreg(x: np.ndarray, y: np.ndarray, lambd: float, *, tol: float = 1e-10,
               max_iter: int = 20_000) -> LogregFit:
  """argmin_W mean_i CE(x_i W, y_i) + lambd / 2 ||W||^2 (no bias), float64 L-BFGS from W = 0.

  Columns are the classes present in y (sorted). Stops when the relative duality gap is at most
  `tol` (checked when L-BFGS stops; it is restarted with a tighter gradient tolerance until then,
  at most `max_iter` iterations in all).
  """
  x = np.asarray(x, np.float64)
  classes, codes = np.unique(np.asarray(y), return_inverse=True)
  onehot = np.eye(len(classes))[codes]
  shape = (x.shape[1], len(classes))
  w = np.zeros(shape)
  fun = lambda v: (lambda f, g, _: (f, g.ravel()))(*_logreg_terms(x, onehot, v.reshape(shape),
                                                                  lambd))
  used, gtol = 0, 1e-6
  gap = duality_gap(x, onehot, w, lambd)
  while gap > tol and used < max_iter:
    res = scipy.optimize.minimize(fun, w.ravel(), jac=True, method='L-BFGS-B', options=dict(
        maxiter=max_iter - used, gtol=gtol, ftol=0.0, maxcor=50))
    w, used = res.x.reshape(shape), used + max(int(res.nit), 1)
    new_gap = duality_gap(x, onehot, w, lambd)
    if new_gap >= gap and gtol < 1e-14:  # No progress left in float64.
      gap = new_gap
      break
    gap, gtol = new_gap, gtol * 1e-2
  objective, _, _ = _logreg_terms(x, onehot, w, lambd)
  return LogregFit(classes, w, objective, gap, used)


_SPLIT = re.compile(r'(.*)_s\d+')


def split_means(accuracies: dict[str, float]) -> dict[str, float]:
  """{'<shots>_s<k>/<feature>': acc} -> {'<shots>/<feature>': mean over the splits} (the
  release's parse_logreg.py averages the three splits of each shot count)."""
  groups: dict[str, list[float]] = {}
  for key, acc in accuracies.items():
    subset, feature = key.split('/', 1)
    match = _SPLIT.fullmatch(subset)
    if match:
      groups.setdefault(f'{match.group(1)}/{feature}', []).append(acc)
  return {k: float(np.mean(v)) for k, v in groups.items() if len(v) > 1}


def draw_subsets(labels: np.ndarray, shots: Sequence[int], splits: int, seed: int
                 ) -> dict[str, np.ndarray]:
  """{'<s>pc_s<k>': sorted positions}: s images of every class drawn without replacement, split
  k = 1..splits, from `seed` (for sets without MSN's lists; not the release's subsets)."""
  rng = np.random.default_rng(seed)
  out = {}
  for s in shots:
    for k in range(1, splits + 1):
      picks = [rng.choice(np.flatnonzero(labels == c), s, replace=False)
               for c in np.unique(labels)]
      out[f'{s}pc_s{k}'] = np.sort(np.concatenate(picks))
  return out


def msn_subset_file(folder: str, shots: int, split: int) -> pathlib.Path:
  """MSN's list of `shots` images per class, split 1..3, in a copy of facebookresearch/msn's
  folder: imagenet_subsets<split>/<shots>imgs_class.txt, except 5 per class of split 3, which
  the release reads from imagenet_subsets3/3imgs_class.txt (its 5000 names; the name says 3)."""
  name = '3imgs_class.txt' if (shots, split) == (5, 3) else f'{shots}imgs_class.txt'
  return pathlib.Path(folder) / f'imagenet_subsets{split}' / name


def read_subset(path: pathlib.Path, source: Any) -> np.ndarray:
  """Positions listed by a subset file: one entry per line, an image file name (MSN's lists:
  'n01440764_10026.JPEG', matched against the folder source's file names) or a position."""
  entries = [line.strip() for line in path.read_text().splitlines() if line.strip()]
  if all(e.isdigit() for e in entries):
    positions = np.asarray([int(e) for e in entries], np.int64)
    if positions.size and positions.max() >= len(source):
      raise ValueError(f'{path}: position {positions.max()} is outside the {len(source)} images.')
    return np.sort(positions)
  paths = getattr(source, 'paths', None)
  if paths is None:
    raise ValueError(f'{path} lists file names, which only a folder:PATH training set has; '
                     'list positions (one integer per line) for other sources.')
  by_name = {pathlib.PurePath(p).name: i for i, p in enumerate(paths)}
  missing = [e for e in entries if e not in by_name]
  if missing:
    raise ValueError(f'{path}: {len(missing)} listed images are not in the training folder, '
                     f'e.g. {missing[:3]}.')
  return np.sort(np.asarray([by_name[e] for e in entries], np.int64))


# ----------------------------------------------------------------------------------------------
# Clustering.


def kmeans_plusplus(x: np.ndarray, k: int, seed: int) -> np.ndarray:
  """k-means++ seeding (scikit-learn's greedy variant: 2 + log k candidates per centre) from
  `seed`: (k, D) float64 initial centres taken from x's rows."""
  rng = np.random.default_rng(seed)
  x = np.asarray(x, np.float64)
  n = len(x)
  trials = 2 + int(np.log(k))
  sq_norms = np.sum(x * x, 1)
  centres = [int(rng.integers(n))]
  closest = _sq_dist(x, sq_norms, x[centres[0]][None])[:, 0]
  for _ in range(1, k):
    probs = np.cumsum(closest)
    candidates = np.searchsorted(probs, rng.random(trials) * probs[-1])
    candidates = np.minimum(candidates, n - 1)
    dist = np.minimum(closest[:, None], _sq_dist(x, sq_norms, x[candidates]))
    best = int(np.argmin(dist.sum(0)))
    centres.append(int(candidates[best]))
    closest = dist[:, best]
  return x[centres].copy()


def _sq_dist(x: np.ndarray, sq_norms: np.ndarray, c: np.ndarray) -> np.ndarray:
  """(n, k) squared distances, clamped at 0."""
  d = sq_norms[:, None] - 2 * x @ c.T + np.sum(c * c, 1)[None]
  return np.maximum(d, 0)


def _assign(x: np.ndarray, centres: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(labels (n,), squared distance to the assigned centre (n,)): scikit-learn's E-step
  (||c||^2 - 2 x.c, first minimum on ties)."""
  c_sq = np.sum(centres * centres, 1)
  labels = np.empty(len(x), np.int64)
  best = np.empty(len(x))
  for start in range(0, len(x), _CHUNK):
    part = x[start:start + _CHUNK]
    d = c_sq[None] - 2 * part @ centres.T
    labels[start:start + _CHUNK] = np.argmin(d, 1)
    best[start:start + _CHUNK] = np.take_along_axis(d, labels[start:start + _CHUNK, None], 1)[:, 0]
  return labels, best + np.sum(x * x, 1)


def lloyd(x: np.ndarray, init: np.ndarray, max_iter: int = 300
          ) -> tuple[np.ndarray, np.ndarray, int]:
  """Lloyd's iterations from `init` until no assignment changes (scikit-learn's KMeans with
  algorithm='lloyd', tol=0): (centres (k, D), labels (n,), iterations), float64.

  As scikit-learn, the data are centred first (and the centres shifted back), an empty cluster
  takes the point farthest from its centre, and the labels returned belong to the centres
  returned.
  """
  x = np.asarray(x, np.float64)
  shift = x.mean(0)
  x = x - shift
  centres = np.asarray(init, np.float64) - shift
  k = len(centres)
  labels_old = None
  n_iter = 0
  for n_iter in range(1, max_iter + 1):
    labels, dist = _assign(x, centres)
    counts = np.bincount(labels, minlength=k)
    sums = np.zeros_like(centres)
    np.add.at(sums, labels, x)
    empty = np.flatnonzero(counts == 0)
    if empty.size:
      far = np.argsort(-dist, kind='stable')[:empty.size]
      for cluster, point in zip(empty, far):
        sums[labels[point]] -= x[point]
        counts[labels[point]] -= 1
        sums[cluster], counts[cluster] = x[point], 1
    new = sums / np.maximum(counts, 1)[:, None]
    converged = labels_old is not None and np.array_equal(labels, labels_old)
    if converged:
      break
    shifted = not np.array_equal(new, centres)
    centres, labels_old = new, labels
    if not shifted:
      break
  labels, _ = _assign(x, centres)
  return centres + shift, labels, n_iter


def contingency(y: np.ndarray, c: np.ndarray) -> np.ndarray:
  """(classes, clusters) counts of the values present."""
  _, yi = np.unique(y, return_inverse=True)
  _, ci = np.unique(c, return_inverse=True)
  table = np.zeros((yi.max() + 1, ci.max() + 1), np.int64)
  np.add.at(table, (yi, ci), 1)
  return table


def hungarian_accuracy(y: np.ndarray, c: np.ndarray) -> float:
  """Accuracy under the best one-to-one matching of clusters to classes."""
  table = contingency(y, c)
  rows, cols = scipy.optimize.linear_sum_assignment(-table)
  return float(table[rows, cols].sum() / len(y))


def _entropy(counts: np.ndarray) -> float:
  p = counts[counts > 0] / counts.sum()
  return float(-np.sum(p * np.log(p)))


def _mutual_info(table: np.ndarray) -> float:
  n = table.sum()
  a, b = table.sum(1), table.sum(0)
  i, j = np.nonzero(table)
  nij = table[i, j].astype(np.float64)
  return float(max(np.sum(nij / n * (np.log(nij) + np.log(n) - np.log(a[i] * 1.0)
                                     - np.log(b[j] * 1.0))), 0.0))


def _expected_mutual_info(table: np.ndarray) -> float:
  """E[MI] under the hypergeometric model with the table's margins (Vinh et al. 2010, as
  scikit-learn's expected_mutual_information)."""
  n = int(table.sum())
  a, b = table.sum(1).astype(np.int64), table.sum(0).astype(np.int64)
  gln = lambda v: scipy.special.gammaln(np.asarray(v, np.float64) + 1)
  total = 0.0
  for ai in a:
    lo = np.maximum(1, ai + b - n)  # (C,) the smallest n_ij per column.
    hi = np.minimum(ai, b)
    width = int(max((hi - lo + 1).max(), 0))
    if width == 0:
      continue
    nij = lo[:, None] + np.arange(width)[None]  # (C, width)
    valid = nij <= hi[:, None]
    nij = np.where(valid, nij, 1)
    bj = b[:, None]
    term1 = nij / n * (np.log(n) + np.log(nij) - np.log(ai) - np.log(bj))
    log_p = (gln(ai) + gln(bj) + gln(n - ai) + gln(n - bj) - gln(n) - gln(nij) - gln(ai - nij)
             - gln(bj - nij) - gln(n - ai - bj + nij))
    total += float(np.sum(np.where(valid, term1 * np.exp(log_p), 0.0)))
  return total


def cluster_metrics(y: np.ndarray, c: np.ndarray) -> dict[str, float]:
  """{'acc', 'nmi', 'ami', 'ari'} of cluster assignments c against labels y (scikit-learn's
  definitions: arithmetic normalisation for NMI and AMI)."""
  y, c = np.asarray(y), np.asarray(c)
  table = contingency(y, c)
  h_y, h_c = _entropy(table.sum(1)), _entropy(table.sum(0))
  mi = _mutual_info(table)
  one_each = table.shape[0] == table.shape[1] == 1
  mean_h = (h_y + h_c) / 2
  nmi = 1.0 if one_each or (h_y == 0 and h_c == 0) else mi / max(mean_h, np.finfo(float).eps)
  if one_each or (h_y == 0 and h_c == 0):
    ami = 1.0
  else:
    emi = _expected_mutual_info(table)
    denominator = mean_h - emi
    eps = np.finfo(np.float64).eps
    denominator = min(denominator, -eps) if denominator < 0 else max(denominator, eps)
    ami = (mi - emi) / denominator
  pairs = lambda v: float(np.sum(v.astype(np.float64) * (v - 1) / 2))
  n = len(y)
  sum_ij, sum_a, sum_b = pairs(table), pairs(table.sum(1)), pairs(table.sum(0))
  expected = sum_a * sum_b / (n * (n - 1) / 2)
  max_index = (sum_a + sum_b) / 2
  ari = 1.0 if max_index == expected else (sum_ij - expected) / (max_index - expected)
  return {'acc': hungarian_accuracy(y, c), 'nmi': float(nmi), 'ami': float(ami),
          'ari': float(ari)}


# ----------------------------------------------------------------------------------------------
# The protocols.


def _check_features(p: protocol.Problems, key: str, names: Any) -> None:
  p.check(isinstance(names, Sequence) and not isinstance(names, str) and len(names) > 0
          and all(block_features.is_name(n) for n in names),
          f'{key}={names!r} must be a non-empty tuple of feature names <pooling>_<source> '
          "(pooling cls, avg or concat; source main or last<n>), e.g. ('cls_last1', "
          "'cls_last4').")


def _extract(backbone, env, protocol_name: str, dataset: datasets.ClassifSet, features,
             resolution: int, positions: np.ndarray | None = None) -> dict[str, np.ndarray]:
  return block_features.extract(backbone, protocol_name, dataset, features, resolution,
                                num_workers=env.num_workers, positions=positions)


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class Knn(protocol.Protocol):
  """'mimref_knn': MIM-Refiner's k-NN (module docstring). Results 'k<k>_tau<tau>/<feature>'."""
  name: ClassVar[str] = 'mimref_knn'

  train: Any  # Image set {dataset, split} of the neighbours (the release: ImageNet train).
  test: Any  # Image set classified (ImageNet val).
  features: Sequence[str]  # The release: ('cls_last1', 'avg_last1') and ('cls_last4',).
  ks: Sequence[int]  # (10,)
  taus: Sequence[float]  # (0.07,)
  resolution: int  # Shorter side to resolution x 256 / 224, central crop (224).

  def check(self, p, key, model):
    datasets.check_set(p, f'{key}.train', self.train)
    datasets.check_set(p, f'{key}.test', self.test)
    _check_features(p, f'{key}.features', self.features)
    protocol.check_numbers(p, f'{key}.ks', self.ks, lambda v: problems_lib.is_int(v) and v > 0,
                           'positive integers')
    protocol.check_numbers(p, f'{key}.taus', self.taus, lambda v: v > 0, 'positive numbers')
    protocol.check_resolution(p, f'{key}.resolution', self.resolution, model)

  def run(self, backbone, env, out_dir, log):
    del out_dir
    train, test = (_extract(backbone, env, self.name,
                            datasets.classif_set(split, spec, env.data_dir), self.features,
                            self.resolution)
                   for split, spec in (('train', self.train), ('test', self.test)))
    num_classes = int(max(train['labels'].max(), test['labels'].max())) + 1
    grid = knn_grid(self.ks, self.taus, len(train['labels']))
    results = {}
    for feature in self.features:
      train_x, test_x = standardize(train[feature], test[feature])
      preds = knn_predict(train_x, train['labels'], test_x, self.ks, self.taus, num_classes,
                          backbone.mesh)
      for (k, tau), pred in zip(grid, preds):
        results[f'k{k}_tau{tau:g}/{feature}'] = float(np.mean(pred == test['labels']))
    log(f'mimref_knn: {len(train["labels"])} train, {len(test["labels"])} test images')
    return results, {'n_train': len(train['labels']), 'n_test': len(test['labels'])}


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class Lowshot(protocol.Protocol):
  """'mimref_lowshot': the release's logistic regression on few images per class (module
  docstring). Results '<subset>/<feature>' and '<shots>pc/<feature>' (mean over splits)."""
  name: ClassVar[str] = 'mimref_lowshot'

  train: Any  # Image set the subsets index (ImageNet train as a folder:PATH for MSN's lists).
  test: Any  # Image set scored (ImageNet val).
  # A copy of facebookresearch/msn's folder (imagenet_subsets{1,2,3}/): the release's lists
  # (`msn_subset_file`); '': the subsets are drawn per class from the run's seed instead.
  subsets_dir: str
  shots: Sequence[int]  # Images per class: (1, 2, 5).
  splits: int  # Subsets per shot count: 3.
  features: Sequence[str]  # The release: ('cls_last1',).
  resolution: int
  tol: float  # Relative duality gap at which the solver stops (the release's cyanure: 1e-3).
  max_iter: int  # L-BFGS iterations at most per fit.

  def check(self, p, key, model):
    datasets.check_set(p, f'{key}.train', self.train)
    datasets.check_set(p, f'{key}.test', self.test)
    shots_ok = protocol.check_numbers(p, f'{key}.shots', self.shots,
                                      lambda v: problems_lib.is_int(v) and v > 0,
                                      'positive integers')
    splits_ok = p.number(f'{key}.splits', self.splits, 1, integer=True)
    if p.check(isinstance(self.subsets_dir, str), f'{key}.subsets_dir={self.subsets_dir!r} must '
               "be a folder name ('' to draw the subsets).") and self.subsets_dir and shots_ok \
        and splits_ok:
      missing = [str(f) for f in self.subset_files().values() if not f.is_file()]
      p.check(not missing, f'{key}.subsets_dir={self.subsets_dir!r} lacks {missing[:3]} (MSN\'s '
              "imagenet_subsets{1,2,3}/<n>imgs_class.txt; '' to draw the subsets).")
    _check_features(p, f'{key}.features', self.features)
    protocol.check_resolution(p, f'{key}.resolution', self.resolution, model)
    p.check(protocol.is_number(self.tol) and self.tol > 0, f'{key}.tol={self.tol!r} must be > 0.')
    p.number(f'{key}.max_iter', self.max_iter, 1, integer=True)

  def subset_files(self) -> dict[str, pathlib.Path]:
    """{'<shots>pc_s<split>': MSN's list} in `subsets_dir`."""
    return {f'{s}pc_s{k}': msn_subset_file(self.subsets_dir, s, k)
            for s in self.shots for k in range(1, self.splits + 1)}

  def subset_positions(self, train: datasets.ClassifSet, seed: int
                       ) -> tuple[dict[str, np.ndarray], bool]:
    """({subset: positions}, whether they are MSN's lists (else drawn))."""
    if self.subsets_dir:
      return {n: read_subset(f, train.source) for n, f in self.subset_files().items()}, True
    labels = getattr(train.source, 'labels', None)
    if labels is None:  # Sources without a label table: read every record once.
      labels = [train.source[i]['label'] for i in range(len(train))]
    return draw_subsets(np.asarray(labels), self.shots, self.splits, seed), False

  def run(self, backbone, env, out_dir, log):
    del out_dir
    train_set = datasets.classif_set('train', self.train, env.data_dir)
    subsets, given = self.subset_positions(train_set, env.seed)
    union = np.unique(np.concatenate(list(subsets.values())))
    train = _extract(backbone, env, self.name, train_set, self.features, self.resolution, union)
    test = _extract(backbone, env, self.name, datasets.classif_set('test', self.test,
                                                                   env.data_dir),
                    self.features, self.resolution)
    row_of = {int(p): i for i, p in enumerate(union)}
    results, details = {}, {'subsets_given': given, 'fits': {}}
    for subset, positions in subsets.items():
      rows = np.asarray([row_of[int(p)] for p in positions])
      y = train['labels'][rows]
      for feature in self.features:
        x = lowshot_preprocess(train[feature][rows])
        fit = fit_logreg(x, y, LOGREG_LAMBDA / len(rows), tol=self.tol, max_iter=self.max_iter)
        results[f'{subset}/{feature}'] = float(np.mean(fit.predict(test[feature])
                                                       == test['labels']))
        details['fits'][f'{subset}/{feature}'] = {'n': len(rows), 'gap': fit.gap,
                                                  'iterations': fit.n_iter}
      log(f'mimref_lowshot: {subset} ({len(rows)} images) fitted')
    results.update(split_means(results))
    return results, details


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class Cluster(protocol.Protocol):
  """'mimref_cluster' (capi_jax's extra): k-means on the test features (module docstring).
  Results '<feature>/{acc,nmi,ami,ari}'."""
  name: ClassVar[str] = 'mimref_cluster'
  official: ClassVar[bool] = False

  test: Any  # Image set clustered (the paper: ImageNet val).
  features: Sequence[str]
  k: int  # Clusters; 0: the number of classes present.
  resolution: int
  max_iter: int  # Lloyd iterations at most.

  def check(self, p, key, model):
    datasets.check_set(p, f'{key}.test', self.test)
    _check_features(p, f'{key}.features', self.features)
    p.number(f'{key}.k', self.k, 0, integer=True)
    protocol.check_resolution(p, f'{key}.resolution', self.resolution, model)
    p.number(f'{key}.max_iter', self.max_iter, 1, integer=True)

  def run(self, backbone, env, out_dir, log):
    del out_dir
    test = _extract(backbone, env, self.name,
                    datasets.classif_set('test', self.test, env.data_dir), self.features,
                    self.resolution)
    y = test['labels']
    k = self.k or len(np.unique(y))
    results, details = {}, {}
    for feature in self.features:
      x = test[feature].astype(np.float64)
      _, assign, n_iter = lloyd(x, kmeans_plusplus(x, k, env.seed), self.max_iter)
      results.update({f'{feature}/{m}': v for m, v in cluster_metrics(y, assign).items()})
      details[feature] = {'k': k, 'iterations': n_iter}
      log(f'mimref_cluster: {feature}: k-means with k={k} converged after {n_iter} iterations')
    return results, details
