"""Evaluating a backbone with the run's protocols: results, tables, the random-init baseline.

`run_evals` runs `config.evals.protocols` (or the ones due at a training step), each built by the
evaluator registry (`capi_jax.evaluators`) from its section `config.evals.<name>`, on a
backbone's parameters, writes
WORKDIR/eval/<step>/results.json (+ pictures, training curves) on process 0 and prints a table,
each number named by the protocol that produced it ('extra/...' for capi_jax's extras). With
`evals.random_init_baseline` the table shows the random init's numbers beside (computed once per
workdir and settings). The training loop and `python -m capi_jax.evaluate` both call it.
"""

from collections.abc import Sequence
import contextlib
import copy
import errno
import json
import logging
import os
import tempfile
import time
from typing import Any

from etils import epath
import flax.linen as nn
import jax
import ml_collections
import numpy as np

from capi_jax import evaluators
from capi_jax import methods
from capi_jax.base import errors
from capi_jax.base import interface
from capi_jax.base import sharding
from capi_jax.base import storage
from capi_jax.engine import curves
from capi_jax.engine import state as state_lib
from capi_jax.evaluators import backbone as backbone_lib
from capi_jax.evaluators import protocol
from capi_jax.weights import files

logger = logging.getLogger(__name__)
PyTree = Any
RANDOM_INIT = 'random_init'  # Output folder of the random initialisation's evaluation.


def eval_method(config: ml_collections.ConfigDict, compute_dtype: str | None = None
                ) -> interface.Method:
  """The config's method built in `compute_dtype` (default `config.evals.compute_dtype`: the
  official evaluations run the model in float32)."""
  eval_config = copy.deepcopy(config)
  with eval_config.unlocked():
    eval_config.efficiency.compute_dtype = compute_dtype or config.evals.compute_dtype
  return methods.from_config(eval_config)


def backbone_module(config: ml_collections.ConfigDict) -> nn.Module:
  """The method's evaluation model (`Method.eval_model`) in `config.evals.compute_dtype`."""
  return eval_method(config).eval_model()


def official_backbone(config: ml_collections.ConfigDict, path: str | os.PathLike[str],
                      which: str = 'ema', compute_dtype: str | None = None
                      ) -> tuple[nn.Module, PyTree]:
  """(model, float32 params) of the official-format file `path`, as the config's method reads
  it (`Method.official_backbone`: any method, any family it knows)."""
  return eval_method(config, compute_dtype).official_backbone(files.read_state_dict(path), which)


def model_shape(config: ml_collections.ConfigDict) -> protocol.ModelShape | None:
  """The evaluated model's patch size and width, read from `backbone_module(config)` (its
  `patch_size` and `embed_dim`); None when the method cannot build it from this config (its own
  checks name the problem) or the model does not say."""
  try:
    module = backbone_module(config)
    return protocol.ModelShape(int(module.patch_size), int(module.embed_dim))
  except Exception:  # pylint: disable=broad-except  (config checks never raise)
    return None


def environment(config: ml_collections.ConfigDict) -> protocol.Environment:
  """What every protocol gets from the run's config besides its own section."""
  return protocol.Environment(data_dir=config.data.data_dir, num_workers=config.data.num_workers,
                              seed=config.train.seed)


def make_backbone(config: ml_collections.ConfigDict, params: PyTree,
                  mesh: jax.sharding.Mesh, module: nn.Module | None = None
                  ) -> backbone_lib.Backbone:
  """`params` of `module` (default `backbone_module(config)`), placed on `mesh` by
  config.sharding's rules."""
  return backbone_lib.Backbone.from_module(module or backbone_module(config), params, mesh,
                                           config.sharding.param_rules, config.evals.batch_size)


def _log(message: str) -> None:
  if jax.process_index() == 0:
    print(message, flush=True)


class EvaluationWriteError(errors.UserError):
  """An evaluation's outputs could not be written (a full disk)."""


def evaluate_params(config: ml_collections.ConfigDict, params: PyTree, mesh: jax.sharding.Mesh,
                    out_dir: epath.Path, protocols: Sequence[str] | None = None,
                    module: nn.Module | None = None) -> dict[str, Any]:
  """Runs `protocols` (default: all of config.evals.protocols) on one backbone.

  Returns:
    {protocol: {'results': {name: number}, 'details': {...}, 'seconds': s}}.
  """
  backbone = make_backbone(config, params, mesh, module)
  env = environment(config)
  out = {}
  for name in protocols or config.evals.protocols:
    start = time.perf_counter()
    try:
      results, details = evaluators.from_config(config.evals, name).run(backbone, env, out_dir,
                                                                         _log)
      out[name] = {'results': results, 'details': details,
                   'seconds': time.perf_counter() - start}
      if jax.process_index() == 0:
        # Each protocol's numbers as soon as they exist: a later failure (a full disk, a
        # crash) does not lose them.
        storage.write_atomic(out_dir / f'results_{name}.json', json.dumps(
            out[name], indent=2, default=_json_default))
    except OSError as e:
      if e.errno not in (errno.ENOSPC, errno.EDQUOT):
        raise
      kept = ', '.join(f'results_{n}.json' for n in out) or 'none'
      raise EvaluationWriteError(
          f'Evaluation {name!r} could not write to {out_dir}: {e.strerror}. Results of the '
          f'protocols done before it are kept there ({kept}); free disk space and evaluate '
          'again.') from None
  return out


def flatten(results: dict[str, Any]) -> dict[str, float]:
  """{protocol: {'results': ...}} -> {'<protocol>/<name>': number}, extras as 'extra/...'."""
  flat = {}
  for name, part in results.items():
    prefix = name if evaluators.get(name).official else f'extra/{name}'
    flat.update({f'{prefix}/{k}': float(v) for k, v in part['results'].items()})
  return flat


def format_table(results: dict[str, Any], baseline: dict[str, Any] | None = None) -> str:
  """The numbers in % (official protocols first, then extras), beside the random init's.

  The segmentation grid's held-out scores ('hparam_fitting.*') stay in results.json.
  """
  shown = lambda flat: {k: v for k, v in flat.items() if '/hparam_fitting.' not in k}
  mine, base = shown(flatten(results)), shown(flatten(baseline or {}))
  names = [n for n in mine if not n.startswith('extra/')] + [n for n in mine
                                                              if n.startswith('extra/')]
  names += [n for n in base if n not in mine]
  cell = lambda d, n: f'{100 * d[n]:6.2f}' if n in d else '     -'
  rows = [(n, cell(mine, n) + (f'  {cell(base, n)}' if baseline else '')) for n in names]
  if baseline:
    rows.insert(0, ('', '  this  ' + RANDOM_INIT))
  width = max((len(n) for n, _ in rows), default=0)
  return '\n'.join(f'{n:<{width}}  {v}' for n, v in rows)


def format_headline(flat: dict[str, float], headline: Any) -> str:
  """Lines 'name  ours  | paper: figure (source)' for each `config.evals.headline` entry whose
  result this evaluation produced ('' if none did)."""
  rows = [(name, flat[name], text) for name, text in (headline or {}).items() if name in flat]
  if not rows:
    return ''
  width = max(len(name) for name, _, _ in rows)
  lines = [f'{name:<{width}}  {100 * value:6.2f}  | paper: {text}' for name, value, text in rows]
  return 'Beside the papers:\n' + '\n'.join(lines)


def random_init_params(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> PyTree:
  """The encoder the run starts from (seed config.train.seed), born sharded."""
  method = methods.from_config(config)
  rng = jax.random.PRNGKey(config.train.seed)
  # jit drops the rest of the variables.
  backbone = lambda r: method.eval_params(state_lib.initial_variables(method, r)[0], 'ema')
  abstract = jax.eval_shape(backbone, rng)
  return jax.jit(backbone, out_shardings=sharding.tree_shardings(
      mesh, abstract, config.sharding.param_rules))(rng)


def _settings(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """What a saved random-init evaluation depends on (besides the architecture)."""
  return json.loads(json.dumps({'evals': config.evals.to_dict(), 'seed': config.train.seed,
                                'data_dir': config.data.data_dir}))


def _evaluate_and_save(config: ml_collections.ConfigDict, params: PyTree, step: int | str,
                       workdir: epath.Path, mesh: jax.sharding.Mesh,
                       protocols: Sequence[str] | None, module: nn.Module | None = None
                       ) -> tuple[dict[str, Any], epath.Path]:
  """(results, output folder); process 0 writes results.json and curves.png.

  The protocols (pictures) and the curves write local files: for a gs:// workdir they write into
  a local folder that is uploaded when the evaluation is done, results.json last.
  """
  start = time.perf_counter()
  out_dir = workdir / 'eval' / str(step)
  with contextlib.ExitStack() as stack:
    if jax.process_index() == 0:
      local = stack.enter_context(storage.staged_dir(out_dir, last=('results.json',)))
    elif storage.is_gcs(out_dir):  # Only process 0's files are uploaded.
      local = storage.path(stack.enter_context(tempfile.TemporaryDirectory()))
    else:
      local = out_dir
    results = evaluate_params(config, params, mesh, local, protocols, module)
    seconds = time.perf_counter() - start
    if jax.process_index() == 0:
      # Written whole or not at all: a killed evaluation never leaves a truncated results.json
      # (which random_init_results would otherwise try to reuse).
      storage.write_atomic(local / 'results.json', json.dumps(
          {'step': step, 'settings': _settings(config), 'seconds': seconds,
           'protocols': results}, indent=2, default=_json_default))
      _save_training_curves(workdir / 'metrics.jsonl', local / 'curves.png')
  return {'protocols': results, 'seconds': seconds}, out_dir


def _save_training_curves(metrics: epath.Path, png: epath.Path) -> None:
  """`curves.save_training_curves` of the run's metrics.jsonl (wherever it is), if it has one."""
  if not metrics.exists():
    return
  with storage.local_copy(metrics) as local:
    try:
      curves.save_training_curves(local, png)
    except ValueError as e:  # A run that has not logged yet: no curves, not a failed eval.
      logger.warning('No training curves in %s: %s', png, e)


def _json_default(value: Any) -> Any:
  if isinstance(value, (np.generic, np.ndarray)):
    return value.tolist()
  raise TypeError(f'{type(value).__name__} is not JSON serialisable')


def random_init_results(config: ml_collections.ConfigDict, workdir: epath.Path,
                        mesh: jax.sharding.Mesh) -> dict[str, Any]:
  """The random init's results on every protocol, computed once per run and settings.

  They do not change during training, so WORKDIR/eval/random_init/results.json is reused when
  it was made with the same evaluation settings.
  """
  path = workdir / 'eval' / RANDOM_INIT / 'results.json'
  if path.exists():
    saved = json.loads(path.read_text())
    if saved.get('settings') == _settings(config):
      return saved['protocols']
  results, _ = _evaluate_and_save(config, random_init_params(config, mesh), RANDOM_INIT,
                                  workdir, mesh, None)
  return results['protocols']


def run_evals(config: ml_collections.ConfigDict, params: PyTree, step: int | str,
              workdir: str | os.PathLike[str], *, protocols: Sequence[str] | None = None,
              mesh: jax.sharding.Mesh | None = None, module: nn.Module | None = None
              ) -> dict[str, float]:
  """Evaluates a backbone, writes WORKDIR/eval/<step>/, prints a table.

  Args:
    config: the run's config (`config.evals` says what to run).
    params: the backbone's parameters, e.g. a TrainState's `ema_params['backbone']`.
    step: training step, or a name (RANDOM_INIT, 'converted', ...) for the output folder.
    workdir: the run's directory.
    protocols: a subset of config.evals.protocols (the ones due at a training step); default
      all.
    mesh: devices to use; default `sharding.make_mesh(config)`.
    module: the model `params` belong to (`official_backbone`); default the method's
      `eval_model`. With another model the random init's baseline (of the method's model) is
      not shown.

  Returns:
    Flat {'classif/cls_test_acc': 0.81, 'seg/labels_knn_mIoU': ..., 'extra/knn/global/k10': ...}.
  """
  mesh = mesh or sharding.make_mesh(config)
  workdir = storage.path(workdir)
  results, out_dir = _evaluate_and_save(config, params, step, workdir, mesh, protocols, module)
  baseline = None
  if config.evals.random_init_baseline and step != RANDOM_INIT and (
      module is None or module == backbone_module(config)):
    baseline = random_init_results(config, workdir, mesh)
    baseline = {k: v for k, v in baseline.items() if k in results['protocols']}
  flat = flatten(results['protocols'])
  headline = format_headline(flat, config.evals.get('headline'))
  _log(f'Evaluation at {step} ({results["seconds"]:.1f} s), written to {out_dir}:\n'
       + format_table(results['protocols'], baseline) + (f'\n{headline}' if headline else ''))
  return flat
