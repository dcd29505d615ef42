r"""The official classification protocol ('classif'): CAPI's eval_classification.py, exactly.

Linear and attentive probes trained *online* on a frozen backbone (`docs/reference/
capi_eval_protocols.md`), here as JAX functions the driver (`classif_run.py`) jits:
- `representations`: the official feature sources from (global_repr, registers, feature_map):
  'cls', 'avg_patch', 'cls_avg_patch' (always, as the official `if "cls_avg_patch":` does),
  'avg_objects', 'concat_objects', 'reg' (asked for as 'objects'), 'patch'. 2-D sources get a
  linear probe, 3-D ones an attentive probe.
- `ProbeGrid`: every source x (lr, wd) of the grid, in the official classifier order (source,
  then lr, then wd), each grid of one source stacked on a leading axis and trained in one
  vmapped pass.
- Probes: `LinearClassifier` (trunc-normal 0.02 weights, zero bias) and `AttnPoolClassifier`
  (one learned query, keys and values from one Linear(D, 2D), D / 64 heads of 64, scaled
  dot-product attention, then a Linear). The attention is computed in an exactly equivalent
  order: q.k = tokens . (W_k q) + b_k . q, and the values' projection applied after the
  attention-weighted sum of tokens, so no (batch, tokens, 2D) key/value tensor is ever formed
  (the b_k . q term is constant over tokens and cancels in the softmax).
- Loss: cross-entropy averaged over batch x all probes (each probe's gradient is 1/K of its own
  loss's; only Adam's eps sees the difference).
- `adamw_step`: torch.optim.AdamW (betas (0.9, 0.95), eps 1e-8, decoupled decay), one group
  per (lr * batch / 256, wd), no decay on parameters named 'bias' (the query token decays).
- `lr_schedule`: linspace(0, 1, warmup) then (cos(linspace(0, pi, n - warmup)) + 1) / 2.
- `infinite_sampler`: data.py's InfiniteSampler (torch.randperm, reproduced bit for bit from
  its Mersenne Twister), per rank, for the official 8 ranks.
- `held_out_split`: default_rng(42).permutation(N), the last round(0.1 N) held out.
- `any_match_correct`: AnyMatchAccuracy's top-1 (lists of valid labels, padded with -1; samples
  without any label skipped), after an optional class map (ImageNet-A / -R style subsets).
- `select`: per source, the grid point with the best held-out accuracy (the first on ties).
"""

import array
from collections.abc import Callable, Iterator, Mapping, Sequence
import dataclasses
import functools
import math
import time
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from capi_jax.base import problems as problems_lib
from capi_jax.evaluators import datasets
from capi_jax.evaluators import protocol

PyTree = Any

# eval_model's defaults.
LEARNING_RATES = (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2)
WEIGHT_DECAYS = (5e-4, 1e-3, 5e-2)
REPRESENTATIONS = ('cls', 'avg_patch', 'patch')
KNOWN_REPRESENTATIONS = ('cls', 'avg_patch', 'cls_avg_patch', 'avg_objects', 'concat_objects',
                         'objects', 'patch')
# The feature sources `representations` returns, in its (the classifiers') order.
SOURCES = ('cls', 'avg_patch', 'cls_avg_patch', 'avg_objects', 'concat_objects', 'reg', 'patch')
N_ITERS, WARMUP_ITERS = 12_500, 1250
BATCH_PER_RANK, OFFICIAL_RANKS = 128, 8
VAL_PROPORTION = 0.1
SAMPLER_SEED = 42
SPLIT_SEED = 42
BETAS, EPS = (0.9, 0.95), 1e-8
INIT_STD = 0.02
HEAD_DIM = 64


# ----------------------------------------------------------------------------------------------
# Representations.


def representations(global_repr: jax.Array, registers: jax.Array, feature_map: jax.Array,
                    names: Sequence[str]) -> dict[str, jax.Array]:
  """BackboneWrapper.forward: {source: (B, D') or (B, N, D)} in the official order, float32.

  Args:
    global_repr: (B, D).
    registers: (B, R, D).
    feature_map: (B, h, w, D).
    names: the requested representations (see KNOWN_REPRESENTATIONS).
  """
  b, h, w, d = feature_map.shape
  patches = feature_map.reshape(b, h * w, d).astype(jnp.float32)
  cls = global_repr.astype(jnp.float32)
  regs = registers.astype(jnp.float32)
  out = {}
  if 'cls' in names:
    out['cls'] = cls
  if 'avg_patch' in names:
    out['avg_patch'] = patches.mean(1)
  out['cls_avg_patch'] = jnp.concatenate([cls, patches.mean(1)], -1)
  if 'avg_objects' in names:
    out['avg_objects'] = regs.mean(1)
  if 'concat_objects' in names:
    out['concat_objects'] = regs.reshape(b, -1)
  if 'objects' in names:
    out['reg'] = regs
  if 'patch' in names:
    out['patch'] = patches
  return out


# ----------------------------------------------------------------------------------------------
# Probes. Parameters use the official names; Linear weights are (in, out) kernels.


def _trunc_normal(rng: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  # nn.init.trunc_normal_(std=0.02) cuts at +-2 in absolute value: +-100 standard deviations.
  return INIT_STD * jax.random.truncated_normal(rng, -2 / INIT_STD, 2 / INIT_STD, shape)


def linear_init(rng: jax.Array, dim: int, num_classes: int) -> PyTree:
  return {'linear': {'kernel': _trunc_normal(rng, (dim, num_classes)),
                     'bias': jnp.zeros((num_classes,))}}


def linear_apply(params: PyTree, x: jax.Array) -> jax.Array:
  """LinearClassifier: (B, D) -> (B, C) logits."""
  return jnp.dot(x, params['linear']['kernel']) + params['linear']['bias']


def attnpool_init(rng: jax.Array, dim: int, num_classes: int) -> PyTree:
  if dim % HEAD_DIM:
    raise ValueError(f'The attentive probe needs a feature dim divisible by {HEAD_DIM} (heads of '
                     f'{HEAD_DIM}), got {dim}.')
  k_query, k_kv, k_linear = jax.random.split(rng, 3)
  return {'query_token': _trunc_normal(k_query, (dim,)),
          'kv': {'kernel': _trunc_normal(k_kv, (dim, 2 * dim)), 'bias': jnp.zeros((2 * dim,))},
          'linear': {'kernel': _trunc_normal(k_linear, (dim, num_classes)),
                     'bias': jnp.zeros((num_classes,))}}


def attnpool_apply(params: PyTree, tokens: jax.Array) -> jax.Array:
  """AttnPoolClassifier: (B, N, D) -> (B, C) logits (see the module docstring)."""
  b, _, dim = tokens.shape
  heads = dim // HEAD_DIM
  w_k, w_v = params['kv']['kernel'][:, :dim], params['kv']['kernel'][:, dim:]
  b_v = params['kv']['bias'][dim:]
  query = params['query_token'].reshape(heads, HEAD_DIM)
  key_query = jnp.einsum('dhc,hc->dh', w_k.reshape(dim, heads, HEAD_DIM), query)  # (D, heads)
  logits = jnp.einsum('bnd,dh->bhn', tokens, key_query) / math.sqrt(HEAD_DIM)
  attention = jax.nn.softmax(logits, axis=-1)
  pooled_tokens = jnp.einsum('bhn,bnd->bhd', attention, tokens)
  pooled = jnp.einsum('bhd,dhc->bhc', pooled_tokens, w_v.reshape(dim, heads, HEAD_DIM))
  pooled = pooled.reshape(b, dim) + b_v
  return jnp.dot(pooled, params['linear']['kernel']) + params['linear']['bias']


PROBES = {2: (linear_init, linear_apply), 3: (attnpool_init, attnpool_apply)}


@dataclasses.dataclass(frozen=True)
class ProbeGrid:
  """The official classifiers: every representation x (lr, wd).

  Attributes:
    sources: representation names in the official order, with their feature ndim (2 or 3).
    lrs, wds: the grid; grid point g = (lrs[g // len(wds)], wds[g % len(wds)]).
    base_lr_scale: global batch / 256 (the official batch_size * world_size / 256).
    num_classes: probe outputs.
  """
  sources: tuple[tuple[str, int], ...]
  lrs: tuple[float, ...]
  wds: tuple[float, ...]
  base_lr_scale: float
  num_classes: int

  @property
  def size(self) -> int:
    return len(self.lrs) * len(self.wds)

  @property
  def keys(self) -> list[tuple[str, float, float]]:
    """(source, lr, wd) of every probe, in the official order."""
    return [(s, lr, wd) for s, _ in self.sources for lr in self.lrs for wd in self.wds]

  def grid_lr(self) -> np.ndarray:
    """(G,) base learning rates (lr * batch / 256)."""
    return np.repeat(np.asarray(self.lrs, np.float64), len(self.wds)) * self.base_lr_scale

  def grid_wd(self) -> np.ndarray:
    return np.tile(np.asarray(self.wds, np.float64), len(self.lrs))

  def init(self, rng: jax.Array, dims: Mapping[str, int]) -> PyTree:
    """{source: params stacked over the G grid points}, each probe its own random draw."""
    params = {}
    for (source, ndim), key in zip(self.sources, jax.random.split(rng, len(self.sources))):
      init_fn, _ = PROBES[ndim]
      params[source] = jax.vmap(lambda k: init_fn(k, dims[source], self.num_classes))(
          jax.random.split(key, self.size))
    return params

  def logits(self, params: PyTree, features: Mapping[str, jax.Array]) -> jax.Array:
    """(K, B, C) logits of every probe, K = len(self.keys), from `representations`."""
    out = []
    for source, ndim in self.sources:
      _, apply_fn = PROBES[ndim]
      out.append(jax.vmap(apply_fn, in_axes=(0, None))(params[source], features[source]))
    return jnp.concatenate(out)

  def loss(self, params: PyTree, features: Mapping[str, jax.Array], labels: jax.Array
           ) -> jax.Array:
    """Cross-entropy averaged over the batch and all K probes (F.cross_entropy on [B, C, K])."""
    logits = self.logits(params, features)
    log_p = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.mean(jnp.take_along_axis(log_p, labels[None, :, None], axis=-1))

  def weight_decay(self, params: PyTree) -> PyTree:
    """Per leaf: (G,) decay, or zeros for parameters named 'bias' (official rule)."""
    wd = jnp.asarray(self.grid_wd(), jnp.float32)
    return jax.tree_util.tree_map_with_path(
        lambda path, _: wd * (0.0 if 'bias' in jax.tree_util.keystr(path) else 1.0), params)


# ----------------------------------------------------------------------------------------------
# Optimiser and schedule.


@dataclasses.dataclass(frozen=True)
class AdamState:
  step: jax.Array
  mu: PyTree
  nu: PyTree


jax.tree_util.register_dataclass(AdamState, data_fields=['step', 'mu', 'nu'], meta_fields=[])


def adam_init(params: PyTree) -> AdamState:
  return AdamState(jnp.zeros((), jnp.int32), jax.tree.map(jnp.zeros_like, params),
                   jax.tree.map(jnp.zeros_like, params))


def adamw_step(params: PyTree, grads: PyTree, state: AdamState, lr: PyTree, wd: PyTree
               ) -> tuple[PyTree, AdamState]:
  """torch.optim.AdamW's step, leaf by leaf, with per-probe lr and wd.

  Args:
    params, grads: leaves with the grid on their leading axis (G, ...).
    state: the moments.
    lr, wd: per leaf, (G,) learning rate and weight decay of this step.
  """
  step = state.step + 1
  b1, b2 = BETAS
  bias1 = 1 - b1 ** step.astype(jnp.float32)
  bias2_sqrt = jnp.sqrt(1 - b2 ** step.astype(jnp.float32))
  mu = jax.tree.map(lambda m, g: m + (1 - b1) * (g - m), state.mu, grads)  # torch's lerp_.
  nu = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * g * g, state.nu, grads)

  def update(p, m, v, lr_leaf, wd_leaf):
    per_probe = lambda x: x.reshape(x.shape + (1,) * (p.ndim - 1))
    p = p * (1 - per_probe(lr_leaf * wd_leaf))  # Decoupled decay first, as torch does.
    return p - per_probe(lr_leaf / bias1) * m / (jnp.sqrt(v) / bias2_sqrt + EPS)

  return jax.tree.map(update, params, mu, nu, lr, wd), AdamState(step, mu, nu)


def lr_schedule(n_iters: int, warmup_iters: int) -> np.ndarray:
  """(n_iters,) float64 factors of the base lr: linear warmup from 0, then cosine to 0."""
  warmup = np.linspace(0.0, 1.0, warmup_iters)
  decay = (np.cos(np.linspace(0, np.pi, n_iters - warmup_iters)) + 1) / 2
  return np.concatenate([warmup, decay])


def train_step(grid: ProbeGrid, params: PyTree, opt_state: AdamState,
               features: Mapping[str, jax.Array], labels: jax.Array, lr_factor: jax.Array
               ) -> tuple[PyTree, AdamState, jax.Array]:
  """One official iteration on a batch's representations: (params, opt_state, loss)."""
  loss, grads = jax.value_and_grad(grid.loss)(params, features, labels)
  lr = jnp.asarray(grid.grid_lr(), jnp.float32) * lr_factor
  lrs = jax.tree.map(lambda _: lr, params)
  params, opt_state = adamw_step(params, grads, opt_state, lrs, grid.weight_decay(params))
  return params, opt_state, loss


# ----------------------------------------------------------------------------------------------
# Sampling and the held-out split.


def torch_randperm(n: int, seed: int) -> np.ndarray:
  """torch.randperm(n, generator=torch.Generator().manual_seed(seed)) on CPU, bit for bit.

  torch draws one 32-bit Mersenne Twister output per position (`random() % (n - i)`, swap i with
  i + that); its generator is seeded like numpy's legacy RandomState (the seed's low 32 bits).
  """
  if n >= 2 ** 32 // 20:
    raise ValueError(f'torch uses another algorithm for randperm({n}); not reproduced.')
  draws = np.random.RandomState(seed & 0xFFFFFFFF).randint(0, 2 ** 32, size=max(n - 1, 0),
                                                            dtype=np.uint32)
  offsets = draws.astype(np.int64) % np.arange(n, 1, -1, dtype=np.int64)
  # Sequential swaps have no vectorised form; int64 arrays keep them 8 bytes an element.
  perm = array.array('q', np.arange(n, dtype=np.int64).tobytes())
  for i, z in enumerate(array.array('q', offsets.tobytes())):
    perm[i], perm[i + z] = perm[i + z], perm[i]
  return np.frombuffer(perm, np.int64).copy()


def infinite_sampler(n: int, seed: int, rank: int, world_size: int,
                     first: np.ndarray | None = None) -> Iterator[np.ndarray]:
  """data.py InfiniteSampler on one rank: its epochs of sample positions, one array each.

  `first` is torch_randperm(n, seed) when the caller has it already.
  """
  here = (torch_randperm(n, seed) if first is None else first)[rank::world_size]
  epoch = 0
  while True:
    yield here[torch_randperm(len(here), seed + rank + (epoch << 24))]
    epoch += 1


def official_batches(n: int, batch_per_rank: int, world_size: int, seed: int = SAMPLER_SEED
                     ) -> Iterator[np.ndarray]:
  """Global batches (world_size * batch_per_rank,) of positions in [0, n): rank r's batch i of
  the official run, concatenated over ranks (drop_last; epochs are drawn as needed)."""
  first = torch_randperm(n, seed)  # Every rank draws the same first permutation.
  streams = [infinite_sampler(n, seed, r, world_size, first) for r in range(world_size)]
  buffers = [np.zeros(0, np.int64)] * world_size
  while True:
    batch = []
    for r in range(world_size):
      while len(buffers[r]) < batch_per_rank:
        buffers[r] = np.concatenate([buffers[r], next(streams[r])])
      batch.append(buffers[r][:batch_per_rank])
      buffers[r] = buffers[r][batch_per_rank:]
    yield np.concatenate(batch)


def held_out_split(n: int, val_proportion: float = VAL_PROPORTION
                   ) -> tuple[np.ndarray, np.ndarray]:
  """(train indices, held-out indices) of the n training images, in the official order."""
  idx = np.random.default_rng(SPLIT_SEED).permutation(n)
  train_num = round((1.0 - val_proportion) * n)
  return idx[:train_num], idx[train_num:]


# ----------------------------------------------------------------------------------------------
# Accuracy and selection.


def any_match_correct(logits: jax.Array, targets: jax.Array, class_map: jax.Array | None
                      ) -> tuple[jax.Array, jax.Array]:
  """AnyMatchAccuracy's top-1 counts.

  Args:
    logits: (K, B, C) of K probes.
    targets: (B, A) valid labels per sample, padded with -1 (a sample with none is skipped;
      padding samples of a batch are all -1).
    class_map: (C',) logit columns to keep (labels index them), or None.

  Returns:
    ((K,) correct counts, () number of samples counted).
  """
  if class_map is not None:
    logits = logits[..., class_map]
  pred = jnp.argmax(logits, axis=-1)  # (K, B)
  hit = (pred[:, :, None] == targets[None]) & (targets[None] >= 0)
  counted = (targets >= 0).any(-1)
  return jnp.sum(hit.any(-1) & counted[None], axis=1), jnp.sum(counted)


def select(keys: Sequence[tuple[str, float, float]], accuracy: Sequence[float]) -> list[int]:
  """Per source (in order), the index of its best probe; the first on ties (pandas idxmax)."""
  best: dict[str, int] = {}
  for i, (source, _, _) in enumerate(keys):
    if source not in best or accuracy[i] > accuracy[best[source]]:
      best[source] = i
  return list(best.values())


# ----------------------------------------------------------------------------------------------
# The run: probes trained online through the frozen backbone.


@dataclasses.dataclass(frozen=True)
class Settings:
  """eval_model's arguments that change a number (official defaults).

  `batch_size` is the global batch (the official 128 per GPU x 8 GPUs); `ranks` is the number
  of official ranks whose samplers make it up; `resolution` the crop side (224).
  """
  representations: tuple[str, ...] = REPRESENTATIONS
  learning_rates: tuple[float, ...] = LEARNING_RATES
  weight_decays: tuple[float, ...] = WEIGHT_DECAYS
  n_iters: int = N_ITERS
  warmup_iters: int = WARMUP_ITERS
  batch_size: int = BATCH_PER_RANK * OFFICIAL_RANKS
  ranks: int = OFFICIAL_RANKS
  val_proportion: float = VAL_PROPORTION
  resolution: int = 224
  num_classes: int = 0  # 0: the training set's.
  log_every: int = 100


def _features(forward, names, backbone_params, images):
  return representations(*forward(backbone_params, images), names)


@functools.partial(jax.jit, static_argnames=('grid', 'forward', 'names'),
                   donate_argnames=('params', 'opt_state'))
def _online_step(params, opt_state, backbone_params, images, labels, lr_factor, *,
                 grid: ProbeGrid, forward, names):
  """One iteration: backbone forward on the augmented batch, then the probes' update."""
  return train_step(grid, params, opt_state, _features(forward, names, backbone_params, images),
                    labels, lr_factor)


@functools.partial(jax.jit, static_argnames=('grid', 'forward', 'names'))
def _eval_counts(params, backbone_params, images, targets, class_map, *, grid: ProbeGrid,
                 forward, names):
  logits = grid.logits(params, _features(forward, names, backbone_params, images))
  return any_match_correct(logits, targets, class_map)


def train_order(n_train: int, settings: Settings, n_batches: int) -> np.ndarray:
  """(n_batches * batch_size,) positions in [0, n_train): the official sampler's batches."""
  batches = official_batches(n_train, settings.batch_size // settings.ranks, settings.ranks)
  return np.concatenate([next(batches) for _ in range(n_batches)]).astype(np.int32)


def run(backbone, train_set, test_sets, settings: Settings, *, num_workers: int = 0,
        seed: int = 0, log: Callable[[str], None] = print
        ) -> tuple[dict[str, float], dict[str, Any]]:
  """eval_model: trains every probe on `train_set`, selects on its held-out part, tests.

  Args:
    backbone: an `evaluators.backbone.Backbone`.
    train_set: a `datasets.ClassifSet` (its labels are the training targets).
    test_sets: `datasets.ClassifSet`s scored with the selected probes.
    settings: the protocol's settings.
    num_workers: Grain reader processes.
    seed: probe initialisation and augmentation.
    log: progress lines.

  Returns:
    (results {'<source>_<test name>_acc': accuracy in [0, 1]}, details: the held-out accuracy
    of every probe, the selected (lr, wd) per source, the training losses, seconds).
  """
  mesh = backbone.mesh
  if settings.batch_size % settings.ranks or settings.batch_size % mesh.devices.size:
    raise ValueError(f'The probe batch {settings.batch_size} must be divisible by the '
                     f'{settings.ranks} sampler ranks and the {mesh.devices.size} devices.')
  num_classes = settings.num_classes or getattr(train_set.source, 'num_classes', 0)
  if not num_classes:
    raise ValueError(f'{train_set.name}: the number of classes is unknown; set '
                     'config.evals.classif.num_classes.')
  names = settings.representations
  res = settings.resolution
  dummy = jax.ShapeDtypeStruct((1, res, res, 3), jnp.float32)
  shapes = jax.eval_shape(functools.partial(_features, backbone.forward, names), backbone.params,
                          dummy)
  # eval_shape returns the dict with sorted keys: put the sources back in the official order.
  grid = ProbeGrid(tuple((k, len(shapes[k].shape)) for k in SOURCES if k in shapes),
                   tuple(settings.learning_rates), tuple(settings.weight_decays),
                   settings.batch_size / 256, num_classes)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  params = jax.device_put(grid.init(jax.random.key(seed),
                                    {k: v.shape[-1] for k, v in shapes.items()}), replicated)
  opt_state = jax.device_put(adam_init(params), replicated)
  train_idx, val_idx = held_out_split(len(train_set), settings.val_proportion)
  # One spare global batch: an undecodable image is dropped, the next fills its place. Whole
  # rounds of reader processes: none reads a blank batch.
  n_batches = -(-(settings.n_iters + 1) // max(num_workers, 1)) * max(num_workers, 1)
  order = train_idx[train_order(len(train_idx), settings, n_batches)]
  batches = datasets.stream(train_set, order, settings.batch_size,
                            datasets.ClassifTransform(res, train=True), res,
                            seed=seed, num_workers=num_workers, training=True)
  statics = dict(grid=grid, forward=backbone.forward, names=names)
  schedule = lr_schedule(settings.n_iters, settings.warmup_iters)
  losses = []
  start = time.perf_counter()
  for it in range(settings.n_iters):
    batch = next(batches)
    params, opt_state, loss = _online_step(params, opt_state, backbone.params,
                                           backbone.global_array(batch['images']),
                                           backbone.global_array(batch['labels']),
                                           jnp.float32(schedule[it]), **statics)
    if (it + 1) % settings.log_every == 0 or it + 1 == settings.n_iters:
      losses.append((it + 1, float(loss)))
      rate = (it + 1) * settings.batch_size / (time.perf_counter() - start)
      log(f'classif: iteration {it + 1}/{settings.n_iters}, loss {losses[-1][1]:.4f}, '
          f'{rate:.0f} images/s')
  train_seconds = time.perf_counter() - start
  batches.close()

  def accuracy(dataset, positions: np.ndarray) -> np.ndarray:
    """(K,) top-1 of every probe on `positions` of `dataset` (eval transform)."""
    class_map = None if dataset.class_map is None else jnp.asarray(dataset.class_map)
    correct, counted = 0, 0
    for batch in datasets.stream(dataset, positions, settings.batch_size,
                                 datasets.ClassifTransform(res), res, seed=seed,
                                 num_workers=num_workers):
      targets = np.where(batch['valid'][:, None], batch['targets'], -1)  # Only images count.
      c, n = _eval_counts(params, backbone.params, backbone.global_array(batch['images']),
                          backbone.global_array(targets), class_map, **statics)
      correct, counted = correct + np.asarray(c), counted + int(n)
    if not counted:
      raise ValueError(f'{dataset.name}: no image has a label to score.')
    return correct / counted

  val_acc = accuracy(train_set, val_idx)
  best = select(grid.keys, val_acc)
  results = {}
  for test in test_sets:
    acc = accuracy(test, np.arange(len(test)))
    results.update({f'{grid.keys[i][0]}_{test.name}_acc': float(acc[i]) for i in best})
  details = {
      'held_out_acc': {f'{s}_lr={lr}_wd={wd}': float(a) for (s, lr, wd), a in
                       zip(grid.keys, val_acc)},
      'selected': {grid.keys[i][0]: {'lr': grid.keys[i][1], 'wd': grid.keys[i][2],
                                     'held_out_acc': float(val_acc[i])} for i in best},
      'loss': losses, 'train_seconds': train_seconds,
      'images_per_s': settings.n_iters * settings.batch_size / train_seconds}
  return results, details


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class Classif(protocol.Protocol):
  """'classif': `run` on `train`, scored on every set of `tests` (configs/vitl.py documents the
  keys; the numeric ones are `Settings`'s)."""
  name: ClassVar[str] = 'classif'

  train: Any  # Image set {dataset, split[, labels, class_map]} the probes are trained on.
  tests: Any  # {test name: image set} scored with the selected probes.
  num_classes: int
  representations: Sequence[str]
  learning_rates: Sequence[float]
  weight_decays: Sequence[float]
  n_iters: int
  warmup_iters: int
  batch_size: int
  ranks: int
  val_proportion: float
  resolution: int
  log_every: int

  @property
  def settings(self) -> Settings:
    return Settings(
        representations=tuple(self.representations),
        learning_rates=tuple(self.learning_rates), weight_decays=tuple(self.weight_decays),
        n_iters=self.n_iters, warmup_iters=self.warmup_iters, batch_size=self.batch_size,
        ranks=self.ranks, val_proportion=self.val_proportion, resolution=self.resolution,
        num_classes=self.num_classes, log_every=self.log_every)

  def check(self, p: protocol.Problems, key: str, model: protocol.ModelShape | None) -> None:
    datasets.check_set(p, f'{key}.train', self.train)
    if isinstance(self.tests, ml_collections.ConfigDict) and len(self.tests):
      for test_name, spec in self.tests.items():
        datasets.check_set(p, f'{key}.tests.{test_name}', spec)
    else:
      p.found.append(f'{key}.tests must hold at least one named test set, e.g. '
                     '{"imagenet_val": {dataset, split}}.')
    reps = self.representations
    p.check(isinstance(reps, Sequence) and not isinstance(reps, str) and len(reps) > 0
            and all(r in KNOWN_REPRESENTATIONS for r in reps),
            f'{key}.representations={reps!r} must be a non-empty tuple from '
            f'{KNOWN_REPRESENTATIONS}.')
    if model is not None and isinstance(reps, Sequence) and {'patch', 'objects'} & set(reps):
      p.check(model.embed_dim % HEAD_DIM == 0,
              f"{key}.representations asks for an attentive probe ('patch' or 'objects'), "
              f'which needs model.embed_dim divisible by {HEAD_DIM} (heads of {HEAD_DIM}), got '
              f'{model.embed_dim}; drop them.')
    protocol.check_numbers(p, f'{key}.learning_rates', self.learning_rates, lambda v: v > 0,
                           'positive numbers')
    protocol.check_numbers(p, f'{key}.weight_decays', self.weight_decays, lambda v: v >= 0,
                           'non-negative numbers')
    p.number(f'{key}.n_iters', self.n_iters, 1, integer=True)
    p.check(problems_lib.is_int(self.warmup_iters) and 0 <= self.warmup_iters <= self.n_iters,
            f'{key}.warmup_iters={self.warmup_iters!r} must be in [0, n_iters].')
    ranks_ok = p.number(f'{key}.ranks', self.ranks, 1, integer=True)
    p.check(ranks_ok and problems_lib.is_int(self.batch_size) and self.batch_size > 0
            and self.batch_size % self.ranks == 0,
            f'{key}.batch_size={self.batch_size!r} must be a positive multiple of '
            f'{key}.ranks={self.ranks!r} (the official 128 per rank x 8 ranks).')
    p.check(protocol.is_number(self.val_proportion) and 0 < self.val_proportion < 1,
            f'{key}.val_proportion={self.val_proportion!r} must be in (0, 1).')
    protocol.check_resolution(p, f'{key}.resolution', self.resolution, model)
    p.number(f'{key}.num_classes', self.num_classes, 0, integer=True)
    p.number(f'{key}.log_every', self.log_every, 1, integer=True)

  def run(self, backbone, env, out_dir, log):
    train = datasets.classif_set('train', self.train, env.data_dir)
    tests = [datasets.classif_set(name, spec, env.data_dir) for name, spec in self.tests.items()]
    del out_dir  # Nothing but numbers.
    return run(backbone, train, tests, self.settings, num_workers=env.num_workers,
               seed=env.seed, log=log)
