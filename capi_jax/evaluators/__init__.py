"""Evaluation protocols, by name: `config.evals.protocols` picks them, `config.evals.<name>` is
the keyword arguments of each one's class (`protocol.Protocol`; the evaluation runner is
`capi_jax.engine.evaluation`).

Official protocols, as facebookresearch/capi runs them (`docs/reference/capi_eval_protocols.md`):
  'classif'  linear and attentive probes trained online (classif.py)
  'seg'      k-NN and logistic-regression segmentation of patch features (seg.py)
  'viz'      PCA pictures (viz.py)
MIM-Refiner's, as ml-jku/MIM-Refiner runs them (`docs/reference/mim_refiner_eval_protocols.md`):
  'mimref_knn'      k-NN on standardised block features (mimref.py)
  'mimref_lowshot'  logistic regression on 1/2/5 images per class (mimref.py)
  'mimref_probe'    the dinov2-grid linear probe: 52 heads on the last 1 / 4 blocks
                    (mimref_probe.py)
CAE v2's, as Atten4Vis/CAE runs it (`docs/reference/caev2_eval_protocols.md`):
  'caev2_linear'    BatchNorm + Linear on the class token, LARS (caev2_linear.py)
  'finetune_top1'   top-1 / top-5 of a fine-tuned classifier's logits (`config.method =
                    'finetune'`; the fine-tuning itself is a method: methods/finetune) (top1.py)
capi_jax's extras, named as such wherever their numbers appear:
  'knn'             weighted k-NN classification (and on raw pixels) (extras.py)
  'mimref_cluster'  k-means on block features: accuracy, NMI, AMI, ARI (mimref.py; the MIM-Refiner
                    release has no clustering code)

Each protocol has a `period`: during training the student is evaluated every `period` steps
(0: never), and every protocol runs on the EMA at the end (`evals.final`). The official
schedule is seg + viz every 10k steps, classif every 20k (configs/vitl.py). The built-in
protocols are imported when first used; `register` adds one (a research prototype, a test's
toy protocol) without touching the engine or this registry.
"""

from collections.abc import Sequence
import importlib
from typing import Any

import ml_collections

from capi_jax.base import problems as problems_lib
from capi_jax.evaluators import protocol

# name -> 'module:Class' of the built-in protocols, in the order tables list them.
_BUILT_IN = {
    'classif': 'capi_jax.evaluators.classif:Classif',
    'seg': 'capi_jax.evaluators.seg:Seg',
    'viz': 'capi_jax.evaluators.viz:Viz',
    'knn': 'capi_jax.evaluators.extras:Knn',
    'mimref_knn': 'capi_jax.evaluators.mimref:Knn',
    'mimref_lowshot': 'capi_jax.evaluators.mimref:Lowshot',
    'mimref_probe': 'capi_jax.evaluators.mimref_probe:Probe',
    'mimref_cluster': 'capi_jax.evaluators.mimref:Cluster',
    'caev2_linear': 'capi_jax.evaluators.caev2_linear:Linear',
    'finetune_top1': 'capi_jax.evaluators.top1:Top1',
}
_REGISTERED: dict[str, type[protocol.Protocol]] = {}
# The keys of `config.evals` besides the protocols' sections (read by the evaluation runner).
EVALS_KEYS = ('model', 'final', 'batch_size', 'compute_dtype', 'random_init_baseline',
              'protocols', 'headline')
# `headline`: {result name ('mimref_probe/max'): the paper's figure it stands beside, and where
# it is from}, printed beside the run's numbers; optional.
OPTIONAL_EVALS_KEYS = ('headline',)


def register(protocol_cls: type[protocol.Protocol]) -> type[protocol.Protocol]:
  """Makes `protocol_cls` selectable as `protocol_cls.name` in evals.protocols (a decorator)."""
  _REGISTERED[protocol_cls.name] = protocol_cls
  return protocol_cls


def names() -> tuple[str, ...]:
  return tuple(dict.fromkeys([*_BUILT_IN, *_REGISTERED]))


def get(name: str) -> type[protocol.Protocol]:
  """The Protocol subclass called `name`."""
  if name in _REGISTERED:
    return _REGISTERED[name]
  if name not in _BUILT_IN:
    raise ValueError(f'Unknown evaluation protocol {name!r} (config.evals.protocols); known: '
                     f'{names()}.')
  module, cls = _BUILT_IN[name].split(':')
  return getattr(importlib.import_module(module), cls)


def from_config(evals: ml_collections.ConfigDict, name: str) -> protocol.Protocol:
  """Protocol `name` built from its section `evals[name]`."""
  protocol_cls = get(name)
  return protocol_cls(**{k: evals[name][k] for k in protocol_cls.keys()})


def due(config: ml_collections.ConfigDict, step: int) -> tuple[str, ...]:
  """The protocols to run on the student at training step `step` (their period divides it)."""
  ev = config.evals
  return tuple(name for name in ev.protocols
               if ev[name].period and step % ev[name].period == 0)


def config_problems(evals: Any, model: protocol.ModelShape | None) -> list[str]:
  """Every invalid value of `config.evals`, one sentence each (key, value, what is valid); [] if
  usable. Never raises, whatever the values.

  Args:
    evals: the `config.evals` section.
    model: the evaluated model's shape (`Method.eval_model()`'s), or None when unknown: the
      checks that need it (resolutions in whole patches, heads of 64) are then skipped.
  """
  p = problems_lib.Problems()
  try:
    _check(p, evals, model)
  except Exception as e:  # pylint: disable=broad-except
    p.found.append(f'config.evals could not be checked ({type(e).__name__}: {e}); compare it '
                   'with the evals section of configs/vitl.py.')
  return p.found


def _check(p: problems_lib.Problems, ev: Any, model: protocol.ModelShape | None) -> None:
  known = names()
  listed = ev.get('protocols') if isinstance(ev, ml_collections.ConfigDict) else None
  listed_ok = isinstance(listed, Sequence) and not isinstance(listed, str)
  # A section is needed for each listed protocol; the others' may be there, unused.
  required = [*EVALS_KEYS, *(n for n in (listed if listed_ok else ()) if n in known)]
  if not protocol.check_keys(p, 'evals', ev, (*EVALS_KEYS, *known), required=required,
                            optional=OPTIONAL_EVALS_KEYS):
    return
  headline = ev.get('headline', ml_collections.ConfigDict())
  p.check(isinstance(headline, ml_collections.ConfigDict)
          and all(isinstance(v, str) for v in headline.values()),
          f'evals.headline={headline!r} must be a section {{result name: "paper figure, source"}}.')
  p.check(ev.model in ('student', 'ema'), f"evals.model={ev.model!r} must be 'student' or 'ema'.")
  p.boolean('evals.final', ev.final)
  p.boolean('evals.random_init_baseline', ev.random_init_baseline)
  p.number('evals.batch_size', ev.batch_size, 1, integer=True)
  p.check(ev.compute_dtype in ('float32', 'bfloat16'),
          f"evals.compute_dtype={ev.compute_dtype!r} must be 'float32' (official) or 'bfloat16'.")
  if not listed_ok:
    p.found.append(f'evals.protocols={listed!r} must be a tuple of names from {known}.')
    return
  unknown = [n for n in listed if n not in known]
  p.check(not unknown, f'evals.protocols has unknown names {unknown}; use some of {known}.')
  for name in (n for n in listed if n in known):
    p.found.extend(get(name).problems(ev[name], model))
