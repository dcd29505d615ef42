"""Evaluation protocols, selected per run by `config.evals` (driven by `capi_jax.evaluate`).

Official protocols, as facebookresearch/capi runs them (`docs/reference/capi_eval_protocols.md`):
  'classif'  linear and attentive probes trained online (classif.py)
  'seg'      k-NN and logistic-regression segmentation of patch features (seg.py)
  'viz'      PCA pictures (viz.py)
capi_jax's extra, named as such wherever its numbers appear:
  'knn'      weighted k-NN classification (and on raw pixels) (extras.py)

`config.evals.protocols` lists the protocols of a run; each has a section `config.evals.<name>`
with a `period`: during training the student is evaluated every `period` steps (0: never),
and every protocol runs on the EMA at the end (`evals.final`). The official schedule is seg +
viz every 10k steps, classif every 20k (configs/vitl.py).
"""

from collections.abc import Callable, Sequence
import importlib
import pathlib
from typing import Any

import ml_collections

OFFICIAL = ('classif', 'seg', 'viz')
EXTRAS = ('knn',)
# Protocol -> 'module:function' of its `(config, backbone, out_dir, log) -> (results, details)`.
PROTOCOLS = {'classif': 'classif:run_from_config', 'seg': 'seg:run_from_config',
             'viz': 'viz:run_from_config', 'knn': 'extras:knn_from_config'}
_DATASET_KINDS = ('fashion_mnist', 'tfds', 'folder', 'synthetic')
_SEG_READERS = ('ade20k', 'voc2012', 'cityscapes', 'folder', 'fashion_mnist_scenes')
_REPRESENTATIONS = ('cls', 'avg_patch', 'cls_avg_patch', 'avg_objects', 'concat_objects',
                    'objects', 'patch')
# Every key of each section, so that a misspelt key is an error rather than a silent default.
KEYS = {
    'evals': {'model', 'final', 'batch_size', 'compute_dtype', 'random_init_baseline',
              'protocols', *PROTOCOLS},
    'classif': {'period', 'train', 'tests', 'num_classes', 'representations', 'learning_rates',
                'weight_decays', 'n_iters', 'warmup_iters', 'batch_size', 'ranks',
                'val_proportion', 'resolution', 'log_every'},
    'seg': {'period', 'dataset', 'train_split', 'val_split', 'test_split', 'resolution',
            'ignore_labels', 'classifiers', 'standardization', 'knn_neighbours', 'knn_distances',
            'knn_dtype', 'logreg_C', 'logreg_max_iter', 'logreg_tol',
            'logreg_linesearch_max_iter', 'logreg_memory', 'world_size'},
    'viz': {'period', 'dataset', 'split', 'resolutions', 'num_images'},
    'knn': {'period', 'train', 'test', 'max_train_images', 'max_test_images', 'ks', 'temperature', 'pixels',
            'resolution'},
    'set': {'dataset', 'split', 'labels', 'class_map'},
}


def runner(name: str) -> Callable[..., tuple[dict[str, float], dict[str, Any]]]:
  """The function that runs protocol `name` from a config (imported on first use)."""
  module, function = PROTOCOLS[name].split(':')
  return getattr(importlib.import_module(f'capi_jax.evaluators.{module}'), function)


def due(config: ml_collections.ConfigDict, step: int) -> tuple[str, ...]:
  """The protocols to run on the student at training step `step` (their period divides it)."""
  ev = config.evals
  return tuple(name for name in ev.protocols
               if ev[name].period and step % ev[name].period == 0)


def config_problems(config: ml_collections.ConfigDict) -> list[str]:
  """Every invalid evals.* value, one sentence each (key, value, what is valid); [] if usable.

  Never raises, whatever the values.
  """
  found: list[str] = []
  try:
    _check(config, found)
  except Exception as e:  # pylint: disable=broad-except
    found.append(f'config.evals could not be checked ({type(e).__name__}: {e}); compare it with '
                 'the evals section of configs/vitl.py.')
  return found


def _is_int(x: Any) -> bool:
  return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check(config: ml_collections.ConfigDict, found: list[str]) -> None:
  def check(ok: bool, message: str) -> None:
    if not ok:
      found.append(message)

  def keys(section: Any, name: str, kind: str) -> bool:
    if not isinstance(section, ml_collections.ConfigDict):
      found.append(f'{name} must be a ConfigDict section, got {section!r}.')
      return False
    unknown = sorted(set(section.keys()) - KEYS[kind])
    missing = sorted(KEYS[kind] - set(section.keys()) - {'labels', 'class_map'})
    check(not unknown, f'{name} has unknown keys {unknown}; known: {sorted(KEYS[kind])}.')
    check(not missing, f'{name} lacks {missing} (see configs/vitl.py).')
    return not missing

  def positive_int(value: Any, name: str, minimum: int = 1) -> None:
    check(_is_int(value) and value >= minimum, f'{name}={value!r} must be an integer >= {minimum}.')

  def divides(value: Any, name: str) -> None:
    patch = config.model.patch_size
    check(_is_int(value) and value > 0 and value % patch == 0,
          f'{name}={value!r} must be a positive multiple of model.patch_size={patch}.')

  def image_set(spec: Any, name: str) -> None:
    if not keys(spec, name, 'set'):
      return
    kind = str(spec.dataset).partition(':')[0]
    check(kind in _DATASET_KINDS and (kind in ('fashion_mnist', 'synthetic')
                                      or str(spec.dataset).partition(':')[2]),
          f'{name}.dataset={spec.dataset!r} must be fashion_mnist[:DIR], tfds:NAME, folder:PATH '
          'or synthetic.')
    check(isinstance(spec.split, str) and spec.split, f'{name}.split={spec.split!r} must name a '
          'split.')
    for file_key in ('labels', 'class_map'):
      path = spec.get(file_key, '')
      check(not path or pathlib.Path(path).is_file(),
            f'{name}.{file_key}={path!r} is not a file (a JSON list, or "" for none).')

  def numbers(values: Any, name: str, ok, what: str) -> None:
    check(isinstance(values, Sequence) and not isinstance(values, str) and len(values) > 0
          and all(_is_number(v) and ok(v) for v in values),
          f'{name}={values!r} must be a non-empty sequence of {what}.')

  ev = config.evals
  if not keys(ev, 'evals', 'evals'):
    return
  check(ev.model in ('student', 'ema'), f"evals.model={ev.model!r} must be 'student' or 'ema'.")
  check(isinstance(ev.final, bool), f'evals.final={ev.final!r} must be True or False.')
  check(isinstance(ev.random_init_baseline, bool),
        f'evals.random_init_baseline={ev.random_init_baseline!r} must be True or False.')
  positive_int(ev.batch_size, 'evals.batch_size')
  check(ev.compute_dtype in ('float32', 'bfloat16'),
        f"evals.compute_dtype={ev.compute_dtype!r} must be 'float32' (official) or 'bfloat16'.")
  protocols = ev.protocols
  if isinstance(protocols, str) or not isinstance(protocols, Sequence):
    found.append(f'evals.protocols={protocols!r} must be a tuple of names from '
                 f'{tuple(PROTOCOLS)}.')
    return
  unknown = [p for p in protocols if p not in PROTOCOLS]
  check(not unknown,
        f'evals.protocols has unknown names {unknown}; use some of {tuple(PROTOCOLS)}.')
  for name in (p for p in protocols if p in PROTOCOLS):
    section = ev[name]
    if not keys(section, f'evals.{name}', name):
      continue
    positive_int(section.period, f'evals.{name}.period', minimum=0)
    prefix = f'evals.{name}'
    if name == 'classif':
      image_set(section.train, f'{prefix}.train')
      if isinstance(section.tests, ml_collections.ConfigDict) and len(section.tests):
        for test_name, spec in section.tests.items():
          image_set(spec, f'{prefix}.tests.{test_name}')
      else:
        found.append(f'{prefix}.tests must hold at least one named test set, e.g. '
                     '{"imagenet_val": {dataset, split}}.')
      reps = section.representations
      check(isinstance(reps, Sequence) and not isinstance(reps, str) and len(reps) > 0
            and all(r in _REPRESENTATIONS for r in reps),
            f'{prefix}.representations={reps!r} must be a non-empty tuple from {_REPRESENTATIONS}.')
      if isinstance(reps, Sequence) and {'patch', 'objects'} & set(reps):
        check(config.model.embed_dim % 64 == 0,
              f"{prefix}.representations asks for an attentive probe ('patch' or 'objects'), "
              f'which needs model.embed_dim divisible by 64 (heads of 64), got '
              f'{config.model.embed_dim}; drop them.')
      numbers(section.learning_rates, f'{prefix}.learning_rates', lambda v: v > 0,
              'positive numbers')
      numbers(section.weight_decays, f'{prefix}.weight_decays', lambda v: v >= 0,
              'non-negative numbers')
      positive_int(section.n_iters, f'{prefix}.n_iters')
      check(_is_int(section.warmup_iters) and 0 <= section.warmup_iters <= section.n_iters,
            f'{prefix}.warmup_iters={section.warmup_iters!r} must be in [0, n_iters].')
      positive_int(section.ranks, f'{prefix}.ranks')
      check(_is_int(section.batch_size) and _is_int(section.ranks) and section.ranks > 0
            and section.batch_size > 0 and section.batch_size % section.ranks == 0,
            f'{prefix}.batch_size={section.batch_size!r} must be a positive multiple of '
            f'{prefix}.ranks={section.ranks!r} (the official 128 per rank x 8 ranks).')
      check(_is_number(section.val_proportion) and 0 < section.val_proportion < 1,
            f'{prefix}.val_proportion={section.val_proportion!r} must be in (0, 1).')
      divides(section.resolution, f'{prefix}.resolution')
      positive_int(section.num_classes, f'{prefix}.num_classes', minimum=0)
      positive_int(section.log_every, f'{prefix}.log_every')
    elif name == 'seg':
      reader = str(section.dataset).partition(':')[0]
      check(reader in _SEG_READERS,
            f'{prefix}.dataset={section.dataset!r} must be ade20k:ROOT, voc2012:ROOT, '
            'cityscapes:ROOT, folder:ROOT or fashion_mnist_scenes[:DIR].')
      for split_key in ('train_split', 'test_split'):
        check(isinstance(section[split_key], str) and section[split_key],
              f'{prefix}.{split_key}={section[split_key]!r} must name a split.')
      check(isinstance(section.val_split, str),
            f"{prefix}.val_split={section.val_split!r} must be a split name or '' (hold out "
            'a tenth of train, as the official code).')
      divides(section.resolution, f'{prefix}.resolution')
      numbers(section.ignore_labels, f'{prefix}.ignore_labels',
              lambda v: _is_int(v) and 0 <= v <= 255, 'labels in [0, 255]')
      check(isinstance(section.classifiers, Sequence) and len(section.classifiers) > 0
            and all(c in ('knn', 'logreg') for c in section.classifiers),
            f"{prefix}.classifiers={section.classifiers!r} must be a non-empty tuple of 'knn', "
            "'logreg'.")
      scalers = ('', 'center', 'center_div', 'StandardScaler', 'RobustScaler', 'pca', 'pca_whiten')
      check(section.standardization in scalers,
            f'{prefix}.standardization={section.standardization!r} must be one of {scalers}.')
      numbers(section.knn_neighbours, f'{prefix}.knn_neighbours', lambda v: _is_int(v) and v > 0,
              'positive integers')
      check(isinstance(section.knn_distances, Sequence) and len(section.knn_distances) > 0
            and all(d in ('cosine', 'L2') for d in section.knn_distances),
            f"{prefix}.knn_distances={section.knn_distances!r} must be a non-empty tuple of "
            "'cosine', 'L2'.")
      check(section.knn_dtype in ('float32', 'bfloat16'),
            f"{prefix}.knn_dtype={section.knn_dtype!r} must be 'float32' or 'bfloat16'.")
      numbers(section.logreg_C, f'{prefix}.logreg_C', lambda v: v > 0, 'positive numbers')
      positive_int(section.logreg_max_iter, f'{prefix}.logreg_max_iter')
      check(_is_number(section.logreg_tol) and section.logreg_tol >= 0,
            f'{prefix}.logreg_tol={section.logreg_tol!r} must be >= 0.')
      positive_int(section.logreg_linesearch_max_iter, f'{prefix}.logreg_linesearch_max_iter')
      positive_int(section.logreg_memory, f'{prefix}.logreg_memory')
      positive_int(section.world_size, f'{prefix}.world_size')
    elif name == 'viz':
      check(str(section.dataset).partition(':')[0] in _SEG_READERS,
            f'{prefix}.dataset={section.dataset!r} must be a segmentation dataset (ade20k:ROOT, '
            '..., fashion_mnist_scenes[:DIR]): its images are drawn.')
      check(isinstance(section.split, str) and section.split,
            f'{prefix}.split={section.split!r} must name a split.')
      if isinstance(section.resolutions, Sequence) and len(section.resolutions):
        for r in section.resolutions:
          divides(r, f'{prefix}.resolutions')
      else:
        found.append(f'{prefix}.resolutions={section.resolutions!r} must be a non-empty tuple.')
      positive_int(section.num_images, f'{prefix}.num_images')
    elif name == 'knn':
      image_set(section.train, f'{prefix}.train')
      image_set(section.test, f'{prefix}.test')
      positive_int(section.max_train_images, f'{prefix}.max_train_images', minimum=0)
      positive_int(section.max_test_images, f'{prefix}.max_test_images', minimum=0)
      numbers(section.ks, f'{prefix}.ks', lambda v: _is_int(v) and v > 0, 'positive integers')
      check(_is_number(section.temperature) and section.temperature > 0,
            f'{prefix}.temperature={section.temperature!r} must be > 0.')
      check(isinstance(section.pixels, bool), f'{prefix}.pixels={section.pixels!r} must be '
            'True or False.')
      divides(section.resolution, f'{prefix}.resolution')
