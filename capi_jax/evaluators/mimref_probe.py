r"""MIM-Refiner's linear probe ('mimref_probe'): the release's dinov2 grid, trained online.

As ml-jku/MIM-Refiner @cc57423 runs it (`utils/processors/probe_processor.py`,
`models/composite/probe_model.py`, `yamls/eval/probe/template_tracked_dinov2grid.yaml`; see
`docs/reference/mim_refiner_eval_protocols.md`):
- Heads: every lr of the grid x pooling ('cls', 'concat' = [cls, mean patch]) x number of last
  blocks (1: the encoder's final output, after its last norm; 4: the raw outputs of the last 4
  blocks side by side on channels, pooled after concatenation): 13 x 2 x 2 = 52 heads, named
  'lr<lr>_<pooling>_last<n>' in the release's order, all trained on the same batches.
- Before the heads, one BatchNorm1d(affine=False) per distinct pooled feature (eps 1e-5,
  momentum 0.1): batch statistics while training (the running ones updated with the unbiased
  variance), running statistics when scoring.
- Head: Linear(D', classes), weights truncated normal std 0.01 (cut at +-2), bias 0.
- Each head its own SGD (momentum 0.9, no weight decay), lr = grid lr x batch / 256 on the
  'wupcos_percent' schedule (`wupcos`): linear warm-up over the first int(0.1 (T - 1)) updates
  (values peak (s + 1) / (W + 1)), then a cosine from the peak towards the absolute value 1e-6
  (never reached), T = epochs x updates per epoch (floor(N / batch): the last partial batch of
  each epoch is dropped). The loss is the sum over heads of each head's mean cross-entropy.
- Train images: RandomResizedCrop(scale (0.08, 1), bicubic) + flip ('train_minaug'); every
  head is scored on the test set after every epoch (shorter side to resolution x 256 / 224,
  central crop); the reported number is the best test accuracy over heads and epochs (the
  release selects on ImageNet val itself: it has no held-out split).
"""

from collections.abc import Callable, Sequence
import dataclasses
import functools
import math
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from capi_jax.base import problems as problems_lib
from capi_jax.evaluators import block_features
from capi_jax.evaluators import datasets
from capi_jax.evaluators import online
from capi_jax.evaluators import protocol

PyTree = Any

LEARNING_RATES = (1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5)
POOLINGS = ('cls', 'concat')
LAST_BLOCKS = (1, 4)
MOMENTUM = 0.9
BN_EPS, BN_MOMENTUM = 1e-5, 0.1
INIT_STD = 0.01
WARMUP_PERCENT, END_VALUE = 0.1, 1e-6


# ----------------------------------------------------------------------------------------------
# Schedule.


def wupcos(step: int, total: int, peak: float, warmup_percent: float = WARMUP_PERCENT,
           end_value: float = END_VALUE) -> float:
  """kappaschedules' wupcos_percent at update `step` of `total` (float64).

  Warm-up over W = int(warmup_percent (total - 1)) updates: peak (step + 1) / (W + 1); then
  peak + (end_value - peak) (1 - cos(pi s / (total - W))) / 2, s = step - W.
  """
  if not 0 <= step < total:
    raise ValueError(f'step {step} outside [0, {total}).')
  warmup = int(warmup_percent * (total - 1))
  if step < warmup:
    return peak * (step + 1) / (warmup + 1)
  progress = (step - warmup) / max(1, total - warmup)
  return peak + (end_value - peak) * (1 - (1 + math.cos(math.pi * progress)) / 2)


def schedule(total: int, peak: float) -> np.ndarray:
  """(total,) float64 lrs of `wupcos`."""
  return np.asarray([wupcos(s, total, peak) for s in range(total)])


# ----------------------------------------------------------------------------------------------
# The heads.


def lr_name(lr: float) -> str:
  """The release's head-name spelling of a grid lr: 0.0001 -> '00001', 0.5 -> '05'."""
  return f'{lr:f}'.rstrip('0').replace('.', '')


def feature_of(pooling: str, n_blocks: int) -> str:
  """The `block_features` name a head pools: the final output for 1 block, else raw blocks."""
  return f'{pooling}_main' if n_blocks == 1 else f'{pooling}_last{n_blocks}'


@dataclasses.dataclass(frozen=True)
class Grid:
  """The heads: lrs x poolings x numbers of last blocks (the release's order).

  Attributes:
    lrs: grid learning rates (before the x batch / 256 scaling).
    poolings: 'cls' and/or 'concat'.
    last_blocks: numbers of last blocks (1: the final output).
    num_classes: head outputs.
    lr_scale: batch / 256.
  """
  lrs: tuple[float, ...]
  poolings: tuple[str, ...]
  last_blocks: tuple[int, ...]
  num_classes: int
  lr_scale: float

  @property
  def features(self) -> tuple[str, ...]:
    """Distinct pooled features (one BatchNorm each), in the heads' order."""
    return tuple(feature_of(p, n) for p in self.poolings for n in self.last_blocks)

  @property
  def heads(self) -> list[tuple[str, str, int]]:
    """(name, feature, lr index) of every head, in the release's order (lr, pooling, blocks)."""
    return [(f'lr{lr_name(lr)}_{p}_last{n}', feature_of(p, n), i)
            for i, lr in enumerate(self.lrs) for p in self.poolings for n in self.last_blocks]

  def peak_lrs(self) -> np.ndarray:
    return np.asarray(self.lrs, np.float64) * self.lr_scale

  def init(self, rng: jax.Array, dims: dict[str, int]) -> PyTree:
    """{feature: {'kernel': (L, D', C), 'bias': (L, C)}}, L = len(lrs), each head its draw."""
    params = {}
    for feature, key in zip(self.features, jax.random.split(rng, len(self.features))):
      shape = (len(self.lrs), dims[feature], self.num_classes)
      params[feature] = {
          'kernel': INIT_STD * jax.random.truncated_normal(key, -2 / INIT_STD, 2 / INIT_STD,
                                                           shape),
          'bias': jnp.zeros((len(self.lrs), self.num_classes))}
    return params

  def init_stats(self, dims: dict[str, int]) -> PyTree:
    """BatchNorm running statistics (torch's initial zeros and ones)."""
    return {f: {'mean': jnp.zeros((dims[f],)), 'var': jnp.ones((dims[f],))}
            for f in self.features}


def batch_norm_train(x: jax.Array, stats: PyTree) -> tuple[jax.Array, PyTree]:
  """BatchNorm1d(affine=False) in train mode: (normalised x with the batch statistics (biased
  variance), running statistics updated with the unbiased variance)."""
  mean = x.mean(0)
  var = jnp.mean(jnp.square(x - mean), 0)
  n = x.shape[0]
  unbiased = var * n / max(n - 1, 1)
  new = {'mean': (1 - BN_MOMENTUM) * stats['mean'] + BN_MOMENTUM * mean,
         'var': (1 - BN_MOMENTUM) * stats['var'] + BN_MOMENTUM * unbiased}
  return (x - mean) * jax.lax.rsqrt(var + BN_EPS), new


def batch_norm_eval(x: jax.Array, stats: PyTree) -> jax.Array:
  return (x - stats['mean']) * jax.lax.rsqrt(stats['var'] + BN_EPS)


def _head_logits(params: PyTree, x: jax.Array) -> jax.Array:
  """(L, B, C) logits of a feature's L heads on normalised features x (B, D')."""
  return jnp.einsum('bd,ldc->lbc', x, params['kernel']) + params['bias'][:, None]


def train_step(grid: Grid, params: PyTree, momentum: PyTree, stats: PyTree,
               features: dict[str, jax.Array], labels: jax.Array, lrs: jax.Array
               ) -> tuple[PyTree, PyTree, PyTree, jax.Array]:
  """One update of every head: (params, momentum buffers, running statistics, losses (L, F)).

  Args:
    lrs: (L,) this update's lr per grid lr (the schedule's value at the scaled peak).
  """
  normed, new_stats = {}, {}
  for f in grid.features:
    normed[f], new_stats[f] = batch_norm_train(features[f].astype(jnp.float32), stats[f])

  def losses(p):
    out = []
    for f in grid.features:
      log_p = jax.nn.log_softmax(_head_logits(p[f], normed[f]), -1)
      out.append(-jnp.mean(jnp.take_along_axis(log_p, labels[None, :, None], -1)[..., 0], -1))
    return jnp.stack(out, 1)  # (L, F)

  def total(p):  # Each head's gradient is its own loss's.
    per_head = losses(p)
    return jnp.sum(per_head), per_head

  (_, per_head), grads = jax.value_and_grad(total, has_aux=True)(params)
  momentum = jax.tree.map(lambda m, g: MOMENTUM * m + g, momentum, grads)
  scale = lambda p: lrs.reshape((-1,) + (1,) * (p.ndim - 1))
  params = jax.tree.map(lambda p, m: p - scale(p) * m, params, momentum)
  return params, momentum, new_stats, per_head


def eval_logits(grid: Grid, params: PyTree, stats: PyTree, features: dict[str, jax.Array]
                ) -> dict[str, jax.Array]:
  """{feature: (L, B, C)} eval-mode logits (running statistics)."""
  return {f: _head_logits(params[f], batch_norm_eval(features[f].astype(jnp.float32), stats[f]))
          for f in grid.features}


# ----------------------------------------------------------------------------------------------
# The online run.


@functools.partial(jax.jit, static_argnames=('grid', 'forward'),
                   donate_argnames=('params', 'momentum', 'stats'))
def _online_step(params, momentum, stats, backbone_params, images, labels, lrs, *, grid: Grid,
                 forward):
  return train_step(grid, params, momentum, stats, forward(backbone_params, images), labels,
                    lrs)


@functools.partial(jax.jit, static_argnames=('grid', 'forward'))
def _eval_correct(params, stats, backbone_params, images, labels, valid, *, grid: Grid, forward):
  """(heads,) correct counts over the valid rows, in `grid.heads` order."""
  logits = eval_logits(grid, params, stats, forward(backbone_params, images))
  hits = {f: jnp.sum((jnp.argmax(v, -1) == labels[None]) & valid[None], 1)
          for f, v in logits.items()}
  return jnp.stack([hits[f][i] for _, f, i in grid.heads])


@dataclasses.dataclass(frozen=True)
class Settings:
  """The run's numbers (the release's: 50 epochs, batch 1024, the 13-lr grid, 224)."""
  learning_rates: tuple[float, ...] = LEARNING_RATES
  poolings: tuple[str, ...] = POOLINGS
  last_blocks: tuple[int, ...] = LAST_BLOCKS
  epochs: int = 50
  batch_size: int = 1024
  resolution: int = 224
  num_classes: int = 0
  log_every: int = 100


def run(backbone, train_set: datasets.ClassifSet, test_set: datasets.ClassifSet,
        settings: Settings, *, num_workers: int = 0, seed: int = 0,
        log: Callable[[str], None] = print) -> tuple[dict[str, float], dict[str, Any]]:
  """Trains every head online and scores them after every epoch (module docstring).

  Returns:
    ({'max': best accuracy over heads and epochs, 'max/<pooling>', 'max/last<n>'}, details:
    every head's accuracy per epoch, the best head and epoch, losses, seconds).
  """
  num_classes = online.num_classes('mimref_probe', train_set, settings.num_classes)
  grid = Grid(tuple(settings.learning_rates), tuple(settings.poolings),
              tuple(settings.last_blocks), num_classes, settings.batch_size / 256)
  forward = block_features.pooled_forward(backbone.require_tokens('mimref_probe'), grid.features)
  res = settings.resolution
  shapes = jax.eval_shape(forward, backbone.params,
                          jax.ShapeDtypeStruct((1, res, res, 3), jnp.float32))
  dims = {f: shapes[f].shape[-1] for f in grid.features}
  replicated = jax.sharding.NamedSharding(backbone.mesh, jax.sharding.PartitionSpec())
  state = {'params': grid.init(jax.random.key(seed), dims), 'stats': grid.init_stats(dims)}
  state['momentum'] = jax.tree.map(jnp.zeros_like, state['params'])
  state = jax.device_put(state, replicated)
  per_epoch = len(train_set) // settings.batch_size
  total = per_epoch * settings.epochs
  lrs = np.stack([schedule(total, peak) for peak in grid.peak_lrs()], 1)  # (T, L)
  statics = dict(grid=grid, forward=forward)

  def update(it, images, labels):
    state['params'], state['momentum'], state['stats'], loss = _online_step(
        state['params'], state['momentum'], state['stats'], backbone.params, images, labels,
        jnp.asarray(lrs[it], jnp.float32), **statics)
    return loss

  def correct(images, labels, valid):
    return _eval_correct(state['params'], state['stats'], backbone.params, images, labels, valid,
                         **statics)

  heads = [h[0] for h in grid.heads]
  outcome = online.run('mimref_probe', backbone, train_set, test_set,
                       online.Heads(update, correct, heads), epochs=settings.epochs,
                       batch_size=settings.batch_size, resolution=res,
                       train_transform=datasets.ClassifTransform(res, train=True),
                       num_workers=num_workers, seed=seed, log_every=settings.log_every, log=log)
  accuracy = outcome.accuracy
  best_epoch, best_head = np.unravel_index(int(np.argmax(accuracy)), accuracy.shape)
  results = {'max': float(accuracy.max())}
  for p in grid.poolings:
    results[f'max/{p}'] = float(accuracy[:, [i for i, h in enumerate(grid.heads)
                                            if h[1].startswith(p + '_')]].max())
  for n in grid.last_blocks:
    feats = {feature_of(p, n) for p in grid.poolings}
    results[f'max/last{n}'] = float(accuracy[:, [i for i, h in enumerate(grid.heads)
                                                if h[1] in feats]].max())
  details = {'accuracy': {h: accuracy[:, i].tolist() for i, h in enumerate(heads)},
             'best': {'head': heads[best_head], 'epoch': int(best_epoch) + 1},
             'updates': total, 'updates_per_epoch': per_epoch, 'loss': outcome.losses,
             'train_seconds': outcome.train_seconds, 'eval_seconds': outcome.eval_seconds}
  return results, details


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class Probe(protocol.Protocol):
  """'mimref_probe': the release's 52-head linear probe (module docstring). Results 'max' (the
  release's accuracy1/test*/max), 'max/<pooling>', 'max/last<n>'."""
  name: ClassVar[str] = 'mimref_probe'

  train: Any  # Image set the heads train on (ImageNet train).
  test: Any  # Image set scored after every epoch (ImageNet val).
  num_classes: int  # 0: the training set's.
  learning_rates: Sequence[float]  # The dinov2 grid (13 lrs), x batch / 256.
  poolings: Sequence[str]  # ('cls', 'concat')
  last_blocks: Sequence[int]  # (1, 4): the final output, the raw last 4 blocks.
  epochs: int  # 50
  batch_size: int  # 1024 (global)
  resolution: int  # 224
  log_every: int

  @property
  def settings(self) -> Settings:
    return Settings(tuple(self.learning_rates), tuple(self.poolings), tuple(self.last_blocks),
                    self.epochs, self.batch_size, self.resolution, self.num_classes,
                    self.log_every)

  def check(self, p, key, model):
    datasets.check_set(p, f'{key}.train', self.train)
    datasets.check_set(p, f'{key}.test', self.test)
    p.number(f'{key}.num_classes', self.num_classes, 0, integer=True)
    protocol.check_numbers(p, f'{key}.learning_rates', self.learning_rates, lambda v: v > 0,
                           'positive numbers')
    protocol.check_names(p, f'{key}.poolings', self.poolings, POOLINGS)
    protocol.check_numbers(p, f'{key}.last_blocks', self.last_blocks,
                           lambda v: problems_lib.is_int(v) and v > 0, 'positive integers')
    p.number(f'{key}.epochs', self.epochs, 1, integer=True)
    p.number(f'{key}.batch_size', self.batch_size, 2, integer=True)
    protocol.check_resolution(p, f'{key}.resolution', self.resolution, model)
    p.number(f'{key}.log_every', self.log_every, 1, integer=True)

  def run(self, backbone, env, out_dir, log):
    del out_dir
    train = datasets.classif_set('train', self.train, env.data_dir)
    test = datasets.classif_set('test', self.test, env.data_dir)
    return run(backbone, train, test, self.settings, num_workers=env.num_workers,
               seed=env.seed, log=log)
