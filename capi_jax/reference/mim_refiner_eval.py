r"""MIM-Refiner's evaluation protocols' parity suite (`python -m capi_jax.check_reference`).

The fixture format is `tests/fixtures/mim_refiner_eval/README.md` (the release's k-NN, feature
extractors, low-shot logistic regression settings and linear probe run on small structured
data; k-means references from scikit-learn, the release having no clustering code). Every size
(blocks, tokens, widths, k / tau grid, shots, splits, heads, steps) is read from the fixture.
Predictions and assignments must agree exactly; floats within the README's tolerances.
"""

from collections.abc import Mapping
import functools
import json
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from capi_jax.evaluators import block_features
from capi_jax.evaluators import mimref
from capi_jax.evaluators import mimref_probe
from capi_jax.reference import harness
from capi_jax.reference.harness import compare, Result

FEATURE_TOL = 1e-5  # Pooled features, standardised features, probe parameters and logits.
EXACT = 0.0
ACCURACY_TOL = 1e-6  # The release's accuracies are float32 ratios.
METRIC_TOL = 1e-12
CENTRE_TOL = 1e-10  # float64 Lloyd from the same init.
LOGREG_W_TOL = 1e-4  # Relative: our float64 optimum against scipy's.
LOGREG_X_TOL = 1e-6  # cyanure preprocesses in float32, we in float64.
LOGREG_OBJECTIVE_TOL = 1e-6  # Relative: both optima, of inputs preprocessed in float32 / 64.
CYANURE_DISAGREEMENT_TOL = 0.01  # cyanure stops at a 1e-3 duality gap: a few predictions differ.
SCHEDULE_TOL = 1e-12
LOSS_TOL = 1e-6
# The fixture's feature names -> block_features names.
FEATURES = {'cls_last': 'cls_last1', 'avg_last': 'avg_last1', 'cls_last4': 'cls_last4'}
_HEAD = re.compile(r'lr(\d+)_(cls|concat)_last(\d+)')
_NORMS = {'ClassToken': 'cls', 'ConcatClassAverage': 'concat'}
_METRICS = ('acc', 'nmi', 'ami', 'ari')


class Context:
  """The fixture's arrays and meta."""

  def __init__(self, arrays: Mapping[str, np.ndarray], scan_layers: bool = False):
    del scan_layers  # The protocols run on given features: no block stack.
    self.arrays = arrays
    self.meta = json.loads(str(arrays['meta_json']))
    self.mesh = harness.one_device_mesh()

  @property
  def feature_names(self) -> list[str]:
    return [n for n in self.meta['features']['names'] if n in FEATURES]

  def labels(self, split: str) -> np.ndarray:
    return self.arrays[f'labels/{split}']

  def features(self, name: str, split: str) -> np.ndarray:
    return self.arrays[f'features/{name}/{split}']

  @functools.cached_property
  def standardized(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return {n: mimref.standardize(self.features(n, 'train'), self.features(n, 'test'))
            for n in self.feature_names}


def _matches(arrays: Mapping[str, np.ndarray]) -> bool:
  return any(k.startswith('knn/') for k in arrays) and 'probe/blocks' in arrays


SUITE = harness.Suite('mim_refiner_eval', _matches, Context)


def _same(quantity: str, ours: Any, ref: Any) -> Result:
  return compare(quantity, ours, ref, EXACT, absolute=True)


# ------------------------------------------------------------------------------ features, k-NN


@SUITE.register('features', requires=('tokens/train', 'tokens/test'))
def _features(ctx: Context) -> list[Result]:
  out = []
  prefix = ctx.meta['features'].get('num_aux_tokens', 1)
  for split in ('train', 'test'):
    tokens = jnp.asarray(ctx.arrays[f'tokens/{split}'])  # (N, depth, T, D)
    for name in ctx.feature_names:
      feature = block_features.parse(FEATURES[name])
      pooled = block_features.pool(block_features.concat_blocks(tokens[:, -feature.last:]),
                                   feature.pooling, prefix)
      out.append(compare(f'features/{name}/{split}', pooled, ctx.features(name, split),
                         FEATURE_TOL))
  return out


@SUITE.register('k-NN', requires=('labels/train', 'labels/test'))
def _knn(ctx: Context) -> list[Result]:
  out = []
  knn = ctx.meta['knn']
  y_train, y_test = ctx.labels('train'), ctx.labels('test')
  num_classes = int(max(y_train.max(), y_test.max())) + 1
  for name in ctx.feature_names:
    if f'knn/{name}/pred' not in ctx.arrays:
      continue
    train_x, test_x = ctx.standardized[name]
    out.append(compare(f'knn/{name}/normed_train', train_x, ctx.arrays[f'knn/{name}/normed_train'],
                       FEATURE_TOL))
    out.append(compare(f'knn/{name}/normed_test', test_x, ctx.arrays[f'knn/{name}/normed_test'],
                       FEATURE_TOL))
    pred = mimref.knn_predict(train_x, y_train, test_x, knn['ks'], knn['taus'], num_classes,
                              ctx.mesh)
    grid = mimref.knn_grid(knn['ks'], knn['taus'], len(y_train))
    official = knn['results'][name]
    if [list(g) for g in grid] != [list(g) for g in official['grid']]:
      raise ValueError(f'k-NN grid {grid} differs from the fixture\'s {official["grid"]}.')
    out.append(_same(f'knn/{name}/pred', pred, ctx.arrays[f'knn/{name}/pred']))
    out.append(compare(f'knn/{name}/accuracy', np.mean(pred == y_test[None], 1),
                       official['accuracy'], ACCURACY_TOL, absolute=True))
  return out


# ---------------------------------------------------------------------------------- low-shot


@SUITE.register('low-shot logistic regression', requires=('labels/train', 'labels/test'))
def _lowshot(ctx: Context) -> list[Result]:
  lowshot = ctx.meta.get('lowshot', {})
  if 'fits' not in lowshot:
    raise harness.Skipped(lowshot.get('skipped', 'the fixture has no low-shot fits'))
  y_train, y_test = ctx.labels('train'), ctx.labels('test')
  out = []
  disagree, n_pred = 0, 0
  for fit_meta in lowshot['fits']:
    subset, name = fit_meta['subset'], fit_meta['feature']
    pre = f'lowshot/{subset}/{name}'
    idx = ctx.arrays[f'lowshot/{subset}/indices']
    x = mimref.lowshot_preprocess(ctx.features(name, 'train')[idx])
    fit = mimref.fit_logreg(x, y_train[idx], mimref.LOGREG_LAMBDA / len(idx))
    test_x = ctx.features(name, 'test')
    pred = fit.predict(test_x)
    out.append(compare(f'{pre}/train_x_preprocessed', x,
                       ctx.arrays[f'{pre}/train_x_preprocessed'], LOGREG_X_TOL, absolute=True))
    w_exact = ctx.arrays[f'{pre}/w_exact']
    out.append(compare(f'{pre}/w (vs w_exact, relative)', fit.w / np.abs(w_exact).max(),
                       w_exact / np.abs(w_exact).max(), LOGREG_W_TOL, absolute=True))
    out.append(compare(f'{pre}/objective (relative)', fit.objective / fit_meta['objective_exact'],
                       1.0, LOGREG_OBJECTIVE_TOL, absolute=True))
    out.append(_same(f'{pre}/pred_exact', pred, ctx.arrays[f'{pre}/pred_exact']))
    out.append(compare(f'{pre}/accuracy', np.mean(pred == y_test), fit_meta['accuracy_exact'],
                       ACCURACY_TOL, absolute=True))
    disagree += int(np.sum(pred != ctx.arrays[f'{pre}/pred']))
    n_pred += len(pred)
  # cyanure's own fits stop at a relative duality gap of 1e-3: not the optimum, reported only
  # as the share of test predictions that differ from the optimum's.
  out.append(compare('lowshot/pred vs cyanure (share differing)', disagree / max(n_pred, 1), 0.0,
                     CYANURE_DISAGREEMENT_TOL, absolute=True))
  return out


# -------------------------------------------------------------------------------- clustering


@SUITE.register('k-means and clustering metrics', requires=('labels/test',))
def _clustering(ctx: Context) -> list[Result]:
  clustering = ctx.meta.get('clustering', {})
  if not clustering.get('runs') and not clustering.get('metric_cases'):
    raise harness.Skipped('the fixture has no clustering references')
  out = []
  y = ctx.labels('test')
  for run in clustering.get('runs', []):
    pre = f"kmeans/{run['feature']}/k{run['k']}"
    x = ctx.features(run['feature'], 'test').astype(np.float64)
    centres, assign, _ = mimref.lloyd(x, ctx.arrays[f'{pre}/init'])
    out.append(compare(f'{pre}/centers', centres, ctx.arrays[f'{pre}/centers'], CENTRE_TOL))
    out.append(_same(f'{pre}/assign', assign, ctx.arrays[f'{pre}/assign']))
    metrics = mimref.cluster_metrics(y, assign)
    out.append(compare(f'{pre}/acc,nmi,ami,ari', [metrics[m] for m in _METRICS],
                       [run[m] for m in _METRICS], METRIC_TOL))
  for i, case in enumerate(clustering.get('metric_cases', [])):
    metrics = mimref.cluster_metrics(ctx.arrays[f'kmeans/metric_cases/{i}/y'],
                                     ctx.arrays[f'kmeans/metric_cases/{i}/c'])
    out.append(compare(f'kmeans/metric_cases/{i}', [metrics[m] for m in _METRICS],
                       [case[m] for m in _METRICS], METRIC_TOL))
  return out


# ---------------------------------------------------------------------------------- probe


def _schedule_keys(arrays: Mapping[str, np.ndarray]) -> list[tuple[str, float, int]]:
  found = []
  for key in arrays:
    match = re.fullmatch(r'probe/schedule/peak([^/]+)/total(\d+)', key)
    if match:
      found.append((key, float(match.group(1)), int(match.group(2))))
  return sorted(found)


@SUITE.register('probe schedule', requires=())
def _probe_schedule(ctx: Context) -> list[Result]:
  keys = _schedule_keys(ctx.arrays)
  if not keys:
    raise harness.Skipped('the fixture has no probe/schedule/ arrays')
  return [compare(key, mimref_probe.schedule(total, peak) / peak, ctx.arrays[key] / peak,
                  SCHEDULE_TOL) for key, peak, total in keys]


def _head_spec(name: str) -> tuple[float, str, int]:
  """'lr0005_concat_last4' -> (0.005, 'concat', 4)."""
  match = _HEAD.fullmatch(name)
  if match is None:
    raise ValueError(f'Unknown head name {name!r}.')
  digits = match.group(1)
  return float(f'{digits[0]}.{digits[1:]}'), match.group(2), int(match.group(3))


def _norm_feature(name: str) -> str:
  """An official norm name -> the feature it normalises ('cls_main', 'concat_last4', ...)."""
  pooling = _NORMS[re.findall(r'(ClassToken|ConcatClassAverage)', name)[-1]]
  blocks = re.search(r'num_last_blocks=(\d+)', name)
  return mimref_probe.feature_of(pooling, int(blocks.group(1)) if blocks else 1)


def _probe_grid(ctx: Context) -> tuple[mimref_probe.Grid, list[str]]:
  heads = ctx.meta['probe']['heads']
  specs = [_head_spec(h) for h in heads]
  grid = mimref_probe.Grid(tuple(dict.fromkeys(s[0] for s in specs)),
                           tuple(dict.fromkeys(s[1] for s in specs)),
                           tuple(dict.fromkeys(s[2] for s in specs)),
                           ctx.arrays['probe/f32/final/' + heads[0] + '/probe.bias'].shape[0],
                           ctx.meta['probe']['lr_scale_factor'])
  ours = [h[0] for h in grid.heads]
  if ours != heads:
    raise ValueError(f'The grid orders the heads {ours[:4]}..., the fixture {heads[:4]}...')
  return grid, heads


def _probe_features(ctx: Context, grid: mimref_probe.Grid, main: np.ndarray,
                    blocks: np.ndarray) -> dict[str, jax.Array]:
  out = {}
  for feature in grid.features:
    f = block_features.parse(feature)
    tokens = jnp.asarray(main) if f.last == 0 else block_features.concat_blocks(
        jnp.asarray(blocks[:, -f.last:]))
    out[feature] = block_features.pool(tokens, f.pooling, 1)
  return out


def _stack_heads(ctx: Context, grid: mimref_probe.Grid, heads: list[str], prefix: str
                 ) -> dict[str, dict[str, np.ndarray]]:
  """Per feature, the heads' torch Linear parameters stacked over the lrs (kernel (L, D', C))."""
  out = {f: {'kernel': [], 'bias': []} for f in grid.features}
  for (_, feature, _), name in zip(grid.heads, heads):
    out[feature]['kernel'].append(ctx.arrays[f'{prefix}/{name}/probe.weight'].T)
    out[feature]['bias'].append(ctx.arrays[f'{prefix}/{name}/probe.bias'])
  return {f: {k: np.stack(v).astype(np.float32) for k, v in p.items()} for f, p in out.items()}


def _probe_run(ctx: Context) -> dict[str, Any]:
  """Our float32 run of the heads from the fixture's initial parameters and block outputs.

  Both official runs start from the f32 run's initial parameters (the f64 model is the f32 one
  cast); fixtures made before the generator's fix hold the f64 run's final parameters under
  probe/f64/init, so only probe/f32/init is read.
  """
  grid, heads = _probe_grid(ctx)
  params = jax.tree.map(jnp.asarray, _stack_heads(ctx, grid, heads, 'probe/f32/init'))
  momentum = jax.tree.map(jnp.zeros_like, params)
  dims = {f: p['kernel'].shape[1] for f, p in params.items()}
  stats = grid.init_stats(dims)
  steps = ctx.arrays['probe/targets'].shape[0]
  lrs = np.stack([mimref_probe.schedule(steps, peak) for peak in grid.peak_lrs()], 1)
  step = jax.jit(functools.partial(mimref_probe.train_step, grid))
  losses = []
  for u in range(steps):
    features = _probe_features(ctx, grid, ctx.arrays['probe/main'][u],
                               ctx.arrays['probe/blocks'][u])
    params, momentum, stats, loss = step(params, momentum, stats, features,
                                         jnp.asarray(ctx.arrays['probe/targets'][u]),
                                         jnp.asarray(lrs[u], jnp.float32))
    losses.append(np.asarray(loss))
  test = _probe_features(ctx, grid, ctx.arrays['probe/test_main'], ctx.arrays['probe/test_blocks'])
  logits = mimref_probe.eval_logits(grid, params, stats, test)
  by_head = lambda a: np.asarray([a[i, grid.features.index(f)] for _, f, i in grid.heads])
  return {'grid': grid, 'heads': heads, 'params': params, 'stats': stats,
          'lrs': np.stack([lrs[:, i] for _, _, i in grid.heads], 1),
          'loss': np.stack([by_head(l) for l in losses]),
          'test_logits': np.stack([np.asarray(logits[f][i]) for _, f, i in grid.heads])}


@SUITE.register('probe training (52 heads, SGD, BatchNorm)', requires=(
    'probe/blocks', 'probe/main', 'probe/targets', 'probe/test_blocks', 'probe/test_main'))
def _probe(ctx: Context) -> list[Result]:
  out = []
  ours = _probe_run(ctx)
  for run in ('f32', 'f64'):
    if f'probe/{run}/lr' not in ctx.arrays:
      continue
    grid, heads = ours['grid'], ours['heads']
    out.append(compare(f'probe/{run}/lr (relative)', ours['lrs'] / ctx.arrays[f'probe/{run}/lr'],
                       np.ones_like(ours['lrs']), SCHEDULE_TOL, absolute=True))
    out.append(compare(f'probe/{run}/loss', ours['loss'], ctx.arrays[f'probe/{run}/loss'],
                       LOSS_TOL))
    final = _stack_heads(ctx, grid, heads, f'probe/{run}/final')
    for f in grid.features:
      out.append(compare(f'probe/{run}/final[{f}].weight', ours['params'][f]['kernel'],
                         final[f]['kernel'], FEATURE_TOL))
      out.append(compare(f'probe/{run}/final[{f}].bias', ours['params'][f]['bias'],
                         final[f]['bias'], FEATURE_TOL))
    for norm in ctx.meta['probe']['norms']:
      f = _norm_feature(norm)
      for stat, key in (('mean', 'running_mean'), ('var', 'running_var')):
        out.append(compare(f'probe/{run}/{key}[{f}]', ours['stats'][f][stat],
                           ctx.arrays[f'probe/{run}/{key}/{norm}'], FEATURE_TOL))
    out.append(compare(f'probe/{run}/test_logits', ours['test_logits'],
                       ctx.arrays[f'probe/{run}/test_logits'], FEATURE_TOL))
  return out
