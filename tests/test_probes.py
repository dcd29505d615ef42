"""Probes on features where the right answer is known: separable -> ~100%, shuffled -> chance."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from capi_jax.evaluators import probes

NUM_CLASSES = 10
DIM = 16


def _clusters(n: int, seed: int, spread: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
  """(features (n, DIM), labels (n,)): one Gaussian blob per class, fixed class centres."""
  centres = np.random.default_rng(123).normal(size=(NUM_CLASSES, DIM)) * 3
  rng = np.random.default_rng(seed)
  y = rng.integers(0, NUM_CLASSES, n)
  return (centres[y] + spread * rng.normal(size=(n, DIM))).astype(np.float32), y


def _shuffled(y: np.ndarray, yt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Train and test labels permuted together: independent of the features in both splits."""
  y_all = np.random.default_rng(7).permutation(np.concatenate([y, yt]))
  return y_all[:len(y)], y_all[len(y):]


def _brute_force_votes(q, k_, targets, ks, temperature, metric):
  if metric == 'cosine':
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    k_ = k_ / np.linalg.norm(k_, axis=1, keepdims=True)
    sim = q @ k_.T
  else:
    sim = -((q[:, None] - k_[None]) ** 2).sum(-1)
  order = np.argsort(-sim, axis=1)
  out = []
  for k in ks:
    idx = order[:, :k]
    w = np.exp(np.take_along_axis(sim, idx, 1) / temperature) if metric == 'cosine' else 1.0
    out.append((targets[idx] * np.broadcast_to(w, idx.shape)[..., None]).sum(1))
  return np.stack(out)


@pytest.mark.parametrize('metric', ['cosine', 'l2'])
def test_knn_matches_brute_force_across_chunks(metric):
  rng = np.random.default_rng(0)
  queries = rng.normal(size=(37, 8)).astype(np.float32)
  keys = rng.normal(size=(150, 8)).astype(np.float32)
  soft = rng.dirichlet(np.ones(4), size=150).astype(np.float32)
  # Chunks smaller than both sets exercise the running top-k merge and the padding of both.
  got = probes.knn_index(keys, soft, ks=(1, 5, 20), num_classes=4, temperature=0.5,
                         metric=metric, query_chunk=16, key_chunk=64)(queries)
  want = _brute_force_votes(queries, keys, soft, (1, 5, 20), 0.5, metric)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)  # float32 matmul vs float64.


def test_knn_separable_and_shuffled():
  x, y = _clusters(500, seed=0)
  xt, yt = _clusters(300, seed=1)
  acc = probes.knn_classify(x, y, xt, yt, ks=(1, 10, 20), num_classes=NUM_CLASSES)
  assert set(acc) == {'k1', 'k10', 'k20'}
  assert min(acc.values()) > 0.99
  y, yt = _shuffled(y, yt)
  acc = probes.knn_classify(x, y, xt, yt, ks=(10, 20), num_classes=NUM_CLASSES)
  assert max(acc.values()) < 0.25  # Chance is 0.1.


def test_knn_rejects_k_above_key_count():
  x, y = _clusters(20, seed=0)
  with pytest.raises(ValueError, match='at least'):
    probes.knn_classify(x, y, x, y, ks=(50,), num_classes=NUM_CLASSES)


def test_grid_point_equals_training_it_alone():
  x, y = _clusters(200, seed=0)
  init = probes.linear_init(DIM, NUM_CLASSES)
  kw = dict(rng=jax.random.key(0), iters=20, batch_size=32)
  grid = probes.train_probe_grid(probes.linear_apply, init, jnp.asarray(x), jnp.asarray(y),
                                 jnp.array([1e-3, 1e-2]), jnp.array([0.0, 0.1]), **kw)
  alone = probes.train_probe_grid(probes.linear_apply, init, jnp.asarray(x), jnp.asarray(y),
                                  jnp.array([1e-2]), jnp.array([0.1]), **kw)
  np.testing.assert_allclose(grid['kernel'][1], alone['kernel'][0], rtol=1e-5, atol=1e-6)
  assert not np.allclose(grid['kernel'][0], grid['kernel'][1])


def test_linear_probe_separable_and_shuffled():
  x, y = _clusters(600, seed=0)
  xt, yt = _clusters(300, seed=1)
  kw = dict(num_classes=NUM_CLASSES, lrs=(1e-3, 1e-2), wds=(0.0, 1e-4), iters=200,
            batch_size=64)
  res = probes.linear_probe(x, y, xt, yt, **kw)
  assert res['top1'] > 0.99 and res['held_out_top1'] > 0.99
  assert res['lr'] in (pytest.approx(1e-3), pytest.approx(1e-2))
  y, yt = _shuffled(y, yt)
  res = probes.linear_probe(x, y, xt, yt, **kw)
  assert res['top1'] < 0.25  # Chance is 0.1.


def test_attentive_probe_finds_the_informative_token():
  def tokens(n, seed):
    x, y = _clusters(n, seed)
    rng = np.random.default_rng(seed + 10)
    t = rng.normal(size=(n, 6, DIM)).astype(np.float32)
    # The class signal sits in one token at a random position: the query has to find it.
    t[np.arange(n), rng.integers(0, 6, n)] += x
    return t, y
  t, y = tokens(600, 0)
  tt, yt = tokens(300, 1)
  kw = dict(num_classes=NUM_CLASSES, lrs=(3e-3, 1e-2), wds=(0.0,), iters=300, batch_size=64)
  assert probes.attentive_probe(t, y, tt, yt, **kw)['top1'] > 0.95
  y, yt = _shuffled(y, yt)
  assert probes.attentive_probe(t, y, tt, yt, **kw)['top1'] < 0.25


def test_held_out_split_is_a_seeded_partition():
  fit, held = probes.held_out_split(100, 0.1, seed=3)
  assert len(held) == 10 and len(fit) == 90
  assert sorted(np.concatenate([fit, held]).tolist()) == list(range(100))
  np.testing.assert_array_equal(held, probes.held_out_split(100, 0.1, seed=3)[1])
  with pytest.raises(ValueError, match='held_out_fraction'):
    probes.held_out_split(100, 0.0, seed=3)
