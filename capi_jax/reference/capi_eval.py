r"""The evaluation protocols' parity suite: `python -m capi_jax.check_reference` on an eval fixture.

The fixture format is `tests/fixtures/capi_eval_reference/README.md` (the official
eval_segmentation.py, eval_classification.py and eval_visualizations.py run on small structured
data). Every size (patch, resolution, labels, ignore labels, k grid, C grid, widths, grids, test
sets, iterations) is read from the fixture's arrays and `meta_json`. Predictions, votes, splits,
batches and the metrics derived from them must agree exactly; floats within the tolerances the
README gives. Everything runs on one device (`seg`'s sharded k-NN and logistic regression are
checked against it in tests/test_seg.py).
"""

from collections.abc import Mapping
import functools
import json
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from capi_jax.evaluators import classif
from capi_jax.evaluators import seg
from capi_jax.evaluators import transforms
from capi_jax.evaluators import viz
from capi_jax.reference import harness
from capi_jax.reference.harness import compare, Result

FORWARD_TOL = 1e-5  # Forwards, standardisation, probe parameters after the run.
EXACT = 0.0  # Labels, indices, votes: compared with absolute tolerance 0.
METRIC_TOL = 1e-12  # Metrics of identical predictions (float64 rounding only).
ACCURACY_TOL = 1e-6  # The official accuracies are float32 ratios of the same counts.
LOGREG_TOL = 1e-4  # Relative: float32 L-BFGS against scikit-learn's float64 solution.
PCA_TOL = 1e-3  # scikit-learn's PCA runs in float32; ours in float64.
BF16_PIXELS_TOL = 0.05  # bf16 distances tie often (README): fraction of pixels that differ.
SPLITS = ('train', 'val', 'test')


class Context:
  """The fixture's arrays, meta and what several comparisons share (computed once)."""

  def __init__(self, arrays: Mapping[str, np.ndarray], scan_layers: bool = False):
    del scan_layers  # The evaluation protocols run on given features: no block stack.
    self.arrays = arrays
    self.meta = json.loads(str(arrays['meta_json']))
    self.mesh = harness.one_device_mesh()

  def has(self, *keys: str) -> bool:
    return all(k in self.arrays for k in keys)

  # -------------------------------------------------------------------------------- seg
  @property
  def seg_config(self) -> dict[str, Any]:
    return self.meta['seg']['config']

  @property
  def ignore_labels(self) -> tuple[int, ...]:
    return tuple(self.seg_config['ignore_labels'])

  @functools.cached_property
  def seg_split(self) -> tuple[np.ndarray, np.ndarray]:
    return seg.held_out_split(len(self.arrays['seg/features/train']))

  @functools.cached_property
  def seg_rows(self) -> dict[str, np.ndarray]:
    """Patch-label rows of the train split, the held-out split and test."""
    labels, features = self.arrays['seg/labels/train'], self.arrays['seg/features/train']
    patch = labels.shape[1] // features.shape[1]
    train, val = self.seg_split
    return {'train': seg.patch_label_rows(labels[train], patch),
            'val': seg.patch_label_rows(labels[val], patch),
            'test': seg.patch_label_rows(self.arrays['seg/labels/test'], patch)}

  @functools.cached_property
  def seg_raw(self) -> dict[str, np.ndarray]:
    """Raw features per split, flattened to patches."""
    train, val = self.seg_split
    flat = lambda f: f.reshape(-1, f.shape[-1])
    features = self.arrays['seg/features/train']
    return {'train': flat(features[train]), 'val': flat(features[val]),
            'test': flat(self.arrays['seg/features/test'])}

  def seg_std(self, split: str) -> np.ndarray:
    """The official standardised features (inputs of the classifier comparisons)."""
    return self.arrays[f'seg/std_features/{split}']

  @property
  def world_size(self) -> int:
    """The ranks the fixture ran on (lr scaling, grid sharing): base_lr = lr * batch * W / 256."""
    run = self.meta.get('cls', {}).get('run')
    if not run:
      return 1
    group = run['param_groups'][0]
    lr = self.probe_lr_of(group['params'][0])
    return round(group['base_lr'] * 256 / (lr * run['config']['batch']))

  def probe_lr_of(self, param_name: str) -> float:
    """The grid lr of an official `AllClassifiers` parameter name ('<i>.<param>')."""
    return self.meta['cls']['run']['keys'][int(param_name.split('.')[0])][1]

  # -------------------------------------------------------------------------------- cls
  def cls_features(self, split: str, index: np.ndarray | None = None) -> tuple[np.ndarray, ...]:
    parts = tuple(self.arrays[f'cls/features/{split}/{k}']
                  for k in ('global', 'registers', 'featmap'))
    return parts if index is None else tuple(p[index] for p in parts)

  @functools.cached_property
  def probe_grid(self) -> classif.ProbeGrid:
    run = self.meta['cls']['run']
    names = run['config']['representations']
    reps = classif.representations(*self.cls_features('train', np.arange(1)), names)
    keys = run['keys']
    lrs = tuple(dict.fromkeys(k[1] for k in keys))
    wds = tuple(dict.fromkeys(k[2] for k in keys))
    batch = self.arrays['cls/run/batches'].shape[1]
    num_classes = self.arrays['cls/run/init/0.linear.weight'].shape[0] if self.has(
        'cls/run/init/0.linear.weight') else run['config']['n_classes']
    return classif.ProbeGrid(tuple((k, v.ndim) for k, v in reps.items()), lrs, wds,
                             batch * self.world_size / 256, num_classes)

  def probe_params(self, prefix: str) -> dict[str, Any]:
    """`AllClassifiers` state dict under prefix -> {source: params stacked over the grid}."""
    grid = self.probe_grid
    params = {}
    for s, (source, ndim) in enumerate(grid.sources):
      per_probe = [official_probe(self.arrays, f'{prefix}/{s * grid.size + g}.', ndim)
                   for g in range(grid.size)]
      params[source] = jax.tree.map(lambda *x: jnp.stack(x), *per_probe)
    return params


def official_probe(arrays: Mapping[str, np.ndarray], prefix: str, ndim: int) -> dict[str, Any]:
  """One official LinearClassifier (ndim 2) / AttnPoolClassifier (3) state dict -> params."""
  linear = lambda name: {'kernel': arrays[f'{prefix}{name}.weight'].T,
                         'bias': arrays[f'{prefix}{name}.bias']}
  if ndim == 2:
    return {'linear': linear('linear')}
  return {'query_token': arrays[f'{prefix}query_token'], 'kv': linear('kv'),
          'linear': linear('linear')}


def _matches(arrays: Mapping[str, np.ndarray]) -> bool:
  return any(k.startswith(('seg/', 'cls/', 'viz/')) for k in arrays)


SUITE = harness.Suite('capi_eval', _matches, Context)


def _same(quantity: str, ours: Any, ref: Any) -> Result:
  return compare(quantity, ours, ref, EXACT, absolute=True)


# ---------------------------------------------------------------------------------------- seg


@SUITE.register('seg held-out split', requires=('seg/split/perm', 'seg/features/train'))
def _seg_split(ctx: Context) -> list[Result]:
  train, val = ctx.seg_split
  return [_same('seg/split/perm', np.concatenate([val, train]), ctx.arrays['seg/split/perm'])]


@SUITE.register('seg transforms', requires=('seg/transform_example/input',
                                            'seg/transform_example/output',
                                            'seg/orig_labels/train', 'seg/labels/train'))
def _seg_transforms(ctx: Context) -> list[Result]:
  ref = ctx.arrays['seg/transform_example/output']
  image = transforms.seg_image(Image.fromarray(ctx.arrays['seg/transform_example/input']),
                               ref.shape[-1])
  results = [compare('seg/transform_example/output', image.transpose(2, 0, 1), ref, FORWARD_TOL)]
  for split in ('train', 'test'):
    if ctx.has(f'seg/orig_labels/{split}', f'seg/labels/{split}'):
      ref = ctx.arrays[f'seg/labels/{split}']
      ours = [transforms.seg_target(Image.fromarray(m), ref.shape[-1])
              for m in ctx.arrays[f'seg/orig_labels/{split}']]
      results.append(_same(f'seg/labels/{split}', np.stack(ours), ref))
  return results


@SUITE.register('seg patch-label rows', requires=(
    'seg/labels/train', 'seg/labels/test', 'seg/features/train', 'seg/patch_labels/train',
    'seg/patch_labels/val', 'seg/patch_labels/test'))
def _seg_rows(ctx: Context) -> list[Result]:
  return [_same(f'seg/patch_labels/{s}', ctx.seg_rows[s], ctx.arrays[f'seg/patch_labels/{s}'])
          for s in SPLITS]


@SUITE.register('seg standardisation', requires=('seg/features/train', 'seg/features/test',
                                                 'seg/std_features/train'))
def _seg_standardisation(ctx: Context) -> list[Result]:
  results = []
  for name in seg.SCALERS:
    if name != 'StandardScaler' and not any(k.startswith(f'seg/standardize/{name}/')
                                            for k in ctx.arrays):
      continue
    scaler = seg.fit_scaler(name, ctx.seg_raw['train'])
    tol = PCA_TOL if name.startswith('pca') else FORWARD_TOL
    for attribute, value in scaler.attributes.items():
      key = f'seg/standardize/{name}/{attribute}'
      if key in ctx.arrays:
        results.append(compare(key, value, ctx.arrays[key], tol))
    if name == 'StandardScaler':
      results += [compare(f'seg/std_features/{s}', scaler(ctx.seg_raw[s]), ctx.seg_std(s),
                          FORWARD_TOL) for s in SPLITS if ctx.has(f'seg/std_features/{s}')]
    elif ctx.has(f'seg/standardize/{name}/test'):
      results.append(compare(f'seg/standardize/{name}/test', scaler(ctx.seg_raw['test']),
                             ctx.arrays[f'seg/standardize/{name}/test'], tol))
  return results


def _knn_keys(arrays: Mapping[str, np.ndarray], dtype: str) -> dict[str, list[int]]:
  """{distance: sorted ks} of the fixture's k-NN predictions in `dtype`."""
  found: dict[str, list[int]] = {}
  for key in arrays:
    if m := re.fullmatch(rf'seg/knn/{dtype}/k(\d+)_(\w+)/pred_test', key):
      found.setdefault(m.group(2), []).append(int(m.group(1)))
  return {d: sorted(ks) for d, ks in found.items()}


def _knn(ctx: Context, splits: tuple[str, ...], distance: str, dtype: str, query: str,
         ks: list[int]) -> dict[int, np.ndarray]:
  """k-NN fitted on the official standardised `splits`, predicting `query`."""
  features = np.concatenate([ctx.seg_std(s) for s in splits])
  rows = np.concatenate([ctx.seg_rows[s] for s in splits])
  keep = seg.fit_mask(rows, ctx.ignore_labels)
  index = seg.knn_fit(features[keep], distance=distance, dtype=dtype, mesh=ctx.mesh)
  return seg.knn_predict(index, rows[keep], ctx.seg_std(query), ks)


@SUITE.register('seg k-NN', requires=('seg/std_features/train', 'seg/std_features/val',
                                      'seg/std_features/test', 'seg/labels/train'))
def _seg_knn(ctx: Context) -> list[Result]:
  results = []
  for distance, ks in _knn_keys(ctx.arrays, 'f32').items():
    for fit_splits, query, tag in ((('train',), 'val', 'pred_val'),
                                   (('train', 'val'), 'test', 'pred_test')):
      preds = _knn(ctx, fit_splits, distance, 'float32', query, ks)
      for k in ks:
        name = f'k{k}_{distance}'
        key = f'seg/knn/f32/{name}/{tag}'
        if key in ctx.arrays:
          results.append(_same(key, preds[k], ctx.arrays[key]))
        scores = seg.metrics(ctx.seg_rows[query], preds[k], ctx.ignore_labels)
        official = ctx.meta['seg'].get('knn', {}).get(name, {})
        for metric, value in scores.items():
          ref_key = f'{metric.lower()}_{query}'
          if ref_key in official:
            results.append(compare(f'seg/knn/{name}/{ref_key}', value, official[ref_key],
                                   METRIC_TOL, absolute=True))
  return results


@SUITE.register('seg k-NN bfloat16', requires=('seg/std_features/train', 'seg/std_features/val',
                                               'seg/std_features/test', 'seg/labels/train'))
def _seg_knn_bf16(ctx: Context) -> list[Result]:
  results = []
  for distance, ks in _knn_keys(ctx.arrays, 'bf16').items():
    preds = _knn(ctx, ('train', 'val'), distance, 'bfloat16', 'test', ks)
    for k in ks:
      key = f'seg/knn/bf16/k{k}_{distance}/pred_test'
      differing = float(np.mean(preds[k] != ctx.arrays[key]))
      results.append(compare(f'{key} (fraction of pixels, ties)', differing, 0.0,
                             BF16_PIXELS_TOL, absolute=True))
  return results


def _logreg_settings(ctx: Context) -> dict[str, Any]:
  defaults = ctx.meta['seg'].get('logreg', {}).get('grid_defaults', {})
  pick = lambda name, default: defaults.get(name, [default])[0]
  return dict(max_iter=pick('max_iter', seg.LOGREG_MAX_ITER), tol=pick('tol', seg.LOGREG_TOL),
              linesearch_max_iter=pick('linesearch_max_iter', seg.LOGREG_LINESEARCH_MAX_ITER),
              lbfgs_memory=pick('lbfgs_hessian_rank', seg.LOGREG_MEMORY))


@SUITE.register('seg logistic regression', requires=(
    'seg/logreg/C', 'seg/logreg/coef', 'seg/logreg/intercept', 'seg/std_features/train',
    'seg/std_features/val', 'seg/std_features/test', 'seg/labels/train'))
def _seg_logreg(ctx: Context) -> list[Result]:
  rows = ctx.seg_rows['train']
  keep = seg.fit_mask(rows, ctx.ignore_labels)
  targets = seg.row_modes(rows[keep])
  results = []
  if ctx.has('seg/logreg/train_keep'):
    results.append(_same('seg/logreg/train_keep', keep, ctx.arrays['seg/logreg/train_keep']))
  if ctx.has('seg/logreg/train_y'):
    results.append(_same('seg/logreg/train_y', targets, ctx.arrays['seg/logreg/train_y']))
  model = seg.fit_logreg(ctx.seg_std('train')[keep], targets,
                         C=float(ctx.arrays['seg/logreg/C']), mesh=ctx.mesh,
                         **_logreg_settings(ctx))
  results += [compare('seg/logreg/coef', model.coef, ctx.arrays['seg/logreg/coef'], LOGREG_TOL),
              compare('seg/logreg/intercept', model.intercept, ctx.arrays['seg/logreg/intercept'],
                      LOGREG_TOL)]
  for split in ('val', 'test'):
    if ctx.has(f'seg/logreg/pred_{split}'):
      results.append(_same(f'seg/logreg/pred_{split}', model.predict(ctx.seg_std(split)),
                           ctx.arrays[f'seg/logreg/pred_{split}']))
  return results


@SUITE.register('seg metrics', requires=('seg/metric_cases/0/gt',))
def _seg_metrics(ctx: Context) -> list[Result]:
  results = []
  for i, official in enumerate(ctx.meta['seg']['metric_cases']):
    ours = seg.metrics(ctx.arrays[f'seg/metric_cases/{i}/gt'],
                       ctx.arrays[f'seg/metric_cases/{i}/pred'], ctx.ignore_labels)
    results += [compare(f'seg/metric_cases/{i}/{m}', ours[m], official[m], METRIC_TOL,
                        absolute=True) for m in ('mIoU', 'acc')]
  return results


def _seg_settings(ctx: Context) -> seg.Settings:
  pipeline = ctx.meta['seg']['pipeline']
  knn_fits = [f for f in pipeline['fits'] if f['classifier'] == 'KNNClassifier']
  logreg = ctx.meta['seg'].get('logreg', {})
  logreg_settings = _logreg_settings(ctx)
  return seg.Settings(
      ignore_labels=ctx.ignore_labels,
      knn_neighbours=tuple(dict.fromkeys(f['num_neighbors'] for f in knn_fits)),
      knn_distances=tuple(dict.fromkeys(f['distance'] for f in knn_fits)),
      logreg_C=tuple(logreg.get('C_grid', seg.LOGREG_C)),
      logreg_max_iter=logreg_settings['max_iter'], logreg_tol=logreg_settings['tol'],
      logreg_linesearch_max_iter=logreg_settings['linesearch_max_iter'],
      logreg_memory=logreg_settings['lbfgs_memory'], world_size=ctx.world_size)


@SUITE.register('seg pipeline', requires=('seg/features/train', 'seg/labels/train',
                                          'seg/features/test', 'seg/labels/test'))
def _seg_pipeline(ctx: Context) -> list[Result]:
  a = ctx.arrays
  outcome = seg.evaluate((a['seg/features/train'], a['seg/labels/train']),
                         (a['seg/features/test'], a['seg/labels/test']), _seg_settings(ctx),
                         ctx.mesh)
  official = ctx.meta['seg']['pipeline']['results']
  results = [_same('seg/pipeline/result names', sorted(outcome.results) == sorted(official), 1)]
  results += [compare(f'seg/pipeline/{k}', outcome.results.get(k, np.nan), v, METRIC_TOL,
                      absolute=True) for k, v in official.items()]
  for name in ('knn', 'logreg'):
    if ctx.has(f'seg/pipeline/pred_test_{name}'):
      results.append(_same(f'seg/pipeline/pred_test_{name}', outcome.test_predictions[name],
                           a[f'seg/pipeline/pred_test_{name}']))
  # The refit is the last fit of each classifier: the selected hyper-parameters.
  fits = ctx.meta['seg']['pipeline']['fits']
  refit = {f['classifier']: f for f in fits}
  if 'KNNClassifier' in refit:
    chosen = outcome.selected['knn']
    results.append(_same('seg/pipeline/knn selected (k, distance)',
                         [chosen['num_neighbors'], chosen['distance'] == 'cosine'],
                         [refit['KNNClassifier']['num_neighbors'],
                          refit['KNNClassifier']['distance'] == 'cosine']))
  if 'LogregClassifier' in refit:
    results.append(compare('seg/pipeline/logreg selected C', outcome.selected['logreg']['C'],
                           refit['LogregClassifier']['C'], METRIC_TOL))
    if ctx.has('seg/pipeline/logreg_coef'):
      model = outcome.models['logreg']
      results += [compare('seg/pipeline/logreg_coef', model.coef, a['seg/pipeline/logreg_coef'],
                          LOGREG_TOL),
                  compare('seg/pipeline/logreg_intercept', model.intercept,
                          a['seg/pipeline/logreg_intercept'], LOGREG_TOL)]
  return results


# ---------------------------------------------------------------------------------------- cls


@SUITE.register('cls held-out split', requires=('cls/split/perm',))
def _cls_split(ctx: Context) -> list[Result]:
  run = ctx.meta['cls']['run']
  perm = ctx.arrays['cls/split/perm']
  train, val = classif.held_out_split(len(perm), run['config']['val_proportion'])
  return [_same('cls/split/perm', np.concatenate([train, val]), perm),
          _same('cls/split/train_num', len(train), run['train_num'])]


@SUITE.register('cls representations', requires=('cls/repr/image_index',
                                                  'cls/features/test/global'))
def _cls_representations(ctx: Context) -> list[Result]:
  index = ctx.arrays['cls/repr/image_index']
  reps = classif.representations(*ctx.cls_features('test', index),
                                 classif.KNOWN_REPRESENTATIONS)
  results = [compare(f'cls/repr/{k}', v, ctx.arrays[f'cls/repr/{k}'], FORWARD_TOL)
             for k, v in reps.items() if ctx.has(f'cls/repr/{k}')]
  for which in ('default', 'all'):
    spec = ctx.meta['cls']['repr_keys'][which]
    produced = list(classif.representations(*ctx.cls_features('test', index),
                                            spec['representations']))
    results.append(_same(f'cls/repr_keys/{which}', produced == spec['outputs'], True))
  return results


@SUITE.register('cls probe forwards', requires=('cls/attnpool/tokens', 'cls/attnpool/logits',
                                                'cls/linear/input', 'cls/linear/logits'))
def _cls_forwards(ctx: Context) -> list[Result]:
  a = ctx.arrays
  attn = official_probe(a, 'cls/attnpool/params/', 3)
  linear = official_probe(a, 'cls/linear/params/', 2)
  attnpool_apply = jax.jit(classif.attnpool_apply)
  results = [compare('cls/attnpool/logits', attnpool_apply(attn, a['cls/attnpool/tokens']),
                     a['cls/attnpool/logits'], FORWARD_TOL),
             compare('cls/linear/logits', classif.linear_apply(linear, a['cls/linear/input']),
                     a['cls/linear/logits'], FORWARD_TOL)]
  if ctx.has('cls/attnpool/featmap_logits'):
    ref = a['cls/attnpool/featmap_logits']
    fmap = a['cls/features/test/featmap'][:len(ref)]
    tokens = fmap.reshape(len(ref), -1, fmap.shape[-1])
    results.append(compare('cls/attnpool/featmap_logits', attnpool_apply(attn, tokens),
                           ref, FORWARD_TOL))
  return results


@SUITE.register('cls schedule and param groups', requires=('cls/run/lr_factor', 'cls/run/lr',
                                                           'cls/run/batches'))
def _cls_schedule(ctx: Context) -> list[Result]:
  run = ctx.meta['cls']['run']
  factor = classif.lr_schedule(len(ctx.arrays['cls/run/lr_factor']), run['config']['warmup'])
  grid = ctx.probe_grid
  base_lr, wd = grid.grid_lr(), grid.grid_wd()
  ours_lr, ours_wd, ref_wd = [], [], []
  for group in run['param_groups']:
    name = group['params'][0]
    g = int(name.split('.')[0]) % grid.size
    ours_lr.append(factor * base_lr[g])
    ours_wd.append([0.0 if 'bias' in p else wd[int(p.split('.')[0]) % grid.size]
                    for p in group['params']])
    ref_wd.append([group['weight_decay']] * len(group['params']))
  return [compare('cls/run/lr_factor', factor, ctx.arrays['cls/run/lr_factor'], METRIC_TOL),
          compare('cls/run/lr', np.stack(ours_lr, 1), ctx.arrays['cls/run/lr'], METRIC_TOL),
          compare('cls/run weight decay per parameter', np.concatenate(ours_wd),
                  np.concatenate(ref_wd), METRIC_TOL, absolute=True)]


@SUITE.register('cls sampler', requires=('cls/run/batches', 'cls/split/perm'))
def _cls_sampler(ctx: Context) -> list[Result]:
  ref = ctx.arrays['cls/run/batches']
  n_iters, batch = ref.shape
  world = ctx.world_size
  train, _ = classif.held_out_split(len(ctx.arrays['cls/split/perm']),
                                    ctx.meta['cls']['run']['config']['val_proportion'])
  stream = classif.official_batches(len(train), batch // world, world)
  return [_same('cls/run/batches', np.stack([train[next(stream)] for _ in range(n_iters)]), ref)]


@SUITE.register('cls probe run', requires=('cls/run/batches', 'cls/run/init/0.linear.weight',
                                           'cls/run/final/0.linear.weight', 'cls/run/loss',
                                           'cls/features/train/global'))
def _cls_run(ctx: Context) -> list[Result]:
  """The official run replayed from its initial probes on its batches."""
  run = ctx.meta['cls']['run']
  names = run['config']['representations']
  grid = ctx.probe_grid
  batches = ctx.arrays['cls/run/batches']
  factor = classif.lr_schedule(len(batches), run['config']['warmup'])
  labels = ctx.arrays['cls/labels/train']
  step = jax.jit(functools.partial(classif.train_step, grid))
  params = ctx.probe_params('cls/run/init')
  opt_state = classif.adam_init(params)
  losses = []
  for it, batch in enumerate(batches):
    features = classif.representations(*ctx.cls_features('train', batch), names)
    params, opt_state, loss = step(params, opt_state, features, jnp.asarray(labels[batch]),
                                   jnp.float32(factor[it]))
    losses.append(loss)
  final = ctx.probe_params('cls/run/final')
  results = [compare('cls/run/loss', np.stack(losses), ctx.arrays['cls/run/loss'], FORWARD_TOL)]
  results += [compare(f'cls/run/final[{source}]{jax.tree_util.keystr(path)}', ours, ref,
                      FORWARD_TOL)
              for source in params
              for (path, ours), ref in zip(jax.tree_util.tree_leaves_with_path(params[source]),
                                           jax.tree.leaves(final[source]))]

  @jax.jit
  def counts(params, features, targets):
    return classif.any_match_correct(grid.logits(params, features), targets, None)

  def accuracy(split: str, index: np.ndarray | None = None) -> np.ndarray:
    split_labels = ctx.arrays[f'cls/labels/{split}']
    features = classif.representations(*ctx.cls_features(split, index), names)
    targets = jnp.asarray(split_labels if index is None else split_labels[index])[:, None]
    correct, counted = counts(params, features, targets)
    return np.asarray(correct) / float(counted)

  _, val = classif.held_out_split(len(labels), run['config']['val_proportion'])
  val_acc = accuracy('train', val)
  official_val = run['evals'][0]['rows']
  best = classif.select(grid.keys, val_acc)
  results += [compare('cls/run/val accuracy', val_acc, [r['acc'] for r in official_val],
                      ACCURACY_TOL, absolute=True),
              _same('cls/run/selected', best, [i for i, r in enumerate(official_val) if r['best']])]
  test_splits = list(run['config']['n_test'])
  for split, official in zip(test_splits, run['evals'][1:]):
    results.append(compare(f'cls/run/{split} accuracy of the selected probes',
                           accuracy(split)[best], [r['acc'] for r in official['rows']],
                           ACCURACY_TOL, absolute=True))
  return results


@SUITE.register('cls eval transform', requires=('cls/transform_example/input',
                                                'cls/transform_example/output_uint8'))
def _cls_transform(ctx: Context) -> list[Result]:
  ref = ctx.arrays['cls/transform_example/output_uint8']
  image = transforms.classif_eval(Image.fromarray(ctx.arrays['cls/transform_example/input']),
                                  ref.shape[0])
  return [_same('cls/transform_example/output_uint8', transforms.denormalize_uint8(image), ref)]


# ---------------------------------------------------------------------------------------- viz


@SUITE.register('viz PCA', requires=('viz/features',))
def _viz(ctx: Context) -> list[Result]:
  features = ctx.arrays['viz/features']
  _, h, w, _ = features.shape
  results = []
  for kind, fn in (('sep', viz.separate_pca), ('joint', viz.joint_pca)):
    if not ctx.has(f'viz/{kind}/projed'):
      continue
    projected = fn(features)
    results.append(compare(f'viz/{kind}/projed', projected, ctx.arrays[f'viz/{kind}/projed'],
                           PCA_TOL))
    if ctx.has(f'viz/{kind}/rgb'):
      rgb = np.stack([viz.build_rgb(h, w, p) for p in projected])
      results.append(compare(f'viz/{kind}/rgb (uint8, quantisation edges)', rgb,
                             ctx.arrays[f'viz/{kind}/rgb'], 1, absolute=True))
  if ctx.has('viz/flip_directions'):
    results.append(_same('viz/flip_directions', viz.FLIP_DIRECTIONS,
                         ctx.arrays['viz/flip_directions']))
  return results
