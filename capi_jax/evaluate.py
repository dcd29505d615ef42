r"""Evaluation of a backbone with the official CAPI protocols, plus capi_jax's extras.

Run (latest checkpoint in WORKDIR, its EMA encoder):
  python -m capi_jax.evaluate --config=configs/tiny.py --workdir=/tmp/capi_tiny
The run's random initialisation (the baseline every result is compared to):
  ... --init=random
The official released weights (converted on the fly, evaluated in float32 as the official
loader does; the config must describe the same architecture, e.g. configs/vitl.py):
  python -m capi_jax.evaluate --config=configs/vitl.py --workdir=/tmp/official \
      --checkpoint=capi_vitl14_lvd.pth          # or .npz with the same names
Or a parameter directory written by `python -m capi_jax.convert --to=capi_jax`.

What runs is `config.evals.protocols` (see `capi_jax.evaluators`): the official 'classif'
(online linear / attentive probes), 'seg' (k-NN and logistic-regression segmentation) and
'viz' (PCA pictures), and the extra 'knn'. Results go to `WORKDIR/eval/<step>/results.json`
(`eval/random_init/`, `eval/converted/`, `eval/<file stem>/` for the others), pictures to
`eval/<step>/viz_<resolution>/`, `curves.png` (the training curves of WORKDIR/metrics.jsonl, if
any); a table is printed, each number named by the protocol that produced it ('extra/...' for
capi_jax's extras). With `evals.random_init_baseline` the table shows the random init's numbers
beside (computed once per workdir and settings).
"""

if __name__ == '__main__':  # First, before jax is imported: this may restart the process.
  from capi_jax.core import huge_pages
  huge_pages.reexec_with_huge_pages()

from collections.abc import Sequence
import copy
import json
import logging
import pathlib
import time
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from capi_jax import evaluators
from capi_jax import methods
from capi_jax.core import sharding
from capi_jax.core import state as state_lib
from capi_jax.evaluators import backbone as backbone_lib
from capi_jax.evaluators import extras

logger = logging.getLogger(__name__)
PyTree = Any
RANDOM_INIT = 'random_init'  # Output folder of the random initialisation's evaluation.
OFFICIAL_SUFFIXES = ('.pth', '.pt', '.npz')


def backbone_module(config: ml_collections.ConfigDict) -> nn.Module:
  """The method's evaluation model (`Method.eval_model`), in `config.evals.compute_dtype` (the
  official evaluations run the model in float32)."""
  eval_config = copy.deepcopy(config)
  with eval_config.unlocked():
    eval_config.efficiency.compute_dtype = config.evals.compute_dtype
  return methods.from_config(eval_config).eval_model()


def make_backbone(config: ml_collections.ConfigDict, params: PyTree,
                  mesh: jax.sharding.Mesh) -> backbone_lib.Backbone:
  """`params` of `backbone_module(config)`, placed on `mesh` by config.sharding's rules."""
  return backbone_lib.Backbone.from_module(backbone_module(config), params, mesh,
                                           config.sharding.param_rules, config.evals.batch_size)


def _log(message: str) -> None:
  if jax.process_index() == 0:
    print(message, flush=True)


def evaluate_params(config: ml_collections.ConfigDict, params: PyTree, mesh: jax.sharding.Mesh,
                    out_dir: pathlib.Path, protocols: Sequence[str] | None = None
                    ) -> dict[str, Any]:
  """Runs `protocols` (default: all of config.evals.protocols) on one backbone.

  Returns:
    {protocol: {'results': {name: number}, 'details': {...}, 'seconds': s}}.
  """
  backbone = make_backbone(config, params, mesh)
  out = {}
  for name in protocols or config.evals.protocols:
    start = time.perf_counter()
    results, details = evaluators.runner(name)(config, backbone, out_dir, _log)
    out[name] = {'results': results, 'details': details,
                 'seconds': time.perf_counter() - start}
  return out


def flatten(results: dict[str, Any]) -> dict[str, float]:
  """{protocol: {'results': ...}} -> {'<protocol>/<name>': number}, extras as 'extra/...'."""
  flat = {}
  for name, part in results.items():
    prefix = name if name in evaluators.OFFICIAL else f'extra/{name}'
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
                       workdir: pathlib.Path, mesh: jax.sharding.Mesh,
                       protocols: Sequence[str] | None) -> tuple[dict[str, Any], pathlib.Path]:
  """(results, output folder); process 0 writes results.json and curves.png."""
  start = time.perf_counter()
  out_dir = workdir / 'eval' / str(step)
  results = evaluate_params(config, params, mesh, out_dir, protocols)
  seconds = time.perf_counter() - start
  if jax.process_index() == 0:
    out_dir.mkdir(parents=True, exist_ok=True)
    # Written aside then renamed: a killed evaluation never leaves a truncated results.json
    # (which random_init_results would otherwise try to reuse).
    tmp = out_dir / 'results.json.tmp'
    tmp.write_text(json.dumps({'step': step, 'settings': _settings(config), 'seconds': seconds,
                               'protocols': results}, indent=2, default=_json_default))
    tmp.replace(out_dir / 'results.json')
    if (workdir / 'metrics.jsonl').exists():
      try:
        extras.save_training_curves(workdir / 'metrics.jsonl', out_dir / 'curves.png')
      except ValueError as e:  # A run that has not logged yet: no curves, not a failed eval.
        logger.info('No training curves: %s', e)
  return {'protocols': results, 'seconds': seconds}, out_dir


def _json_default(value: Any) -> Any:
  if isinstance(value, (np.generic, np.ndarray)):
    return value.tolist()
  raise TypeError(f'{type(value).__name__} is not JSON serialisable')


def random_init_results(config: ml_collections.ConfigDict, workdir: pathlib.Path,
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
              workdir: str | pathlib.Path, *, protocols: Sequence[str] | None = None,
              mesh: jax.sharding.Mesh | None = None) -> dict[str, float]:
  """Evaluates a backbone, writes WORKDIR/eval/<step>/, prints a table.

  Args:
    config: the run's config (`config.evals` says what to run).
    params: the backbone's parameters, e.g. a TrainState's `ema_params['backbone']`.
    step: training step, or a name (RANDOM_INIT, 'converted', ...) for the output folder.
    workdir: the run's directory.
    protocols: a subset of config.evals.protocols (the ones due at a training step); default
      all.
    mesh: devices to use; default `sharding.make_mesh(config)`.

  Returns:
    Flat {'classif/cls_test_acc': 0.81, 'seg/labels_knn_mIoU': ..., 'extra/knn/global/k10': ...}.
  """
  mesh = mesh or sharding.make_mesh(config)
  workdir = pathlib.Path(workdir)
  results, out_dir = _evaluate_and_save(config, params, step, workdir, mesh, protocols)
  baseline = None
  if config.evals.random_init_baseline and step != RANDOM_INIT:
    baseline = random_init_results(config, workdir, mesh)
    baseline = {k: v for k, v in baseline.items() if k in results['protocols']}
  _log(f'Evaluation at {step} ({results["seconds"]:.1f} s), written to {out_dir}:\n'
       + format_table(results['protocols'], baseline))
  return flatten(results['protocols'])


# ----------------------------------------------------------------------------------------------
# Command line.


def _restore_training_checkpoint(config: ml_collections.ConfigDict, step_dir: pathlib.Path,
                                 mesh: jax.sharding.Mesh, which: str) -> tuple[PyTree, int]:
  """(backbone params, step) of the training checkpoint in `step_dir`."""
  from capi_jax.core import checkpointing  # pylint: disable=g-import-not-at-top
  method = methods.from_config(config)
  layout = state_lib.state_layout(config, method, mesh)
  state = checkpointing.restore_step_dir(
      step_dir, config, checkpointing.restore_target(layout.abstract, layout.shardings))
  return method.eval_params(state.variables, which), int(jax.device_get(state.step))


def load_params(config: ml_collections.ConfigDict, workdir: pathlib.Path, checkpoint: str,
                init: str, which: str, mesh: jax.sharding.Mesh) -> tuple[PyTree, int | str]:
  """(backbone params, output folder name) for the command line's choice of encoder."""
  from capi_jax.core import checkpointing  # pylint: disable=g-import-not-at-top
  if init == 'random':
    return random_init_params(config, mesh), RANDOM_INIT
  if checkpoint and pathlib.Path(checkpoint).suffix in OFFICIAL_SUFFIXES:
    path = pathlib.Path(checkpoint)
    if not path.is_file():
      raise FileNotFoundError(f'--checkpoint={checkpoint}: no such official checkpoint file.')
    from capi_jax import convert  # pylint: disable=g-import-not-at-top
    source = 'student' if which == 'student' else 'student_ema'
    backbone = convert.load_official(path, config, source=source)['backbone']
    # The official loader evaluates float32 weights.
    return jax.tree.map(lambda x: np.asarray(x, np.float32), backbone), path.stem
  found = checkpointing.find_checkpoint(checkpoint or workdir)
  if found.kind == 'training':
    return _restore_training_checkpoint(config, found.path, mesh, which)
  from capi_jax import convert  # pylint: disable=g-import-not-at-top
  return convert.restore_backbone(found.path), 'converted'


def main(argv: Sequence[str]) -> None:
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
  # capi_jax's own progress at INFO; libraries (Orbax logs every restore step) at WARNING.
  absl_logging.set_verbosity(absl_logging.WARNING)
  logging.getLogger('capi_jax').setLevel(logging.INFO)
  fl = flags.FLAGS
  config = fl.config
  mesh = sharding.make_mesh(config)
  with jax.set_mesh(mesh):
    params, step = load_params(config, pathlib.Path(fl.workdir), fl.checkpoint, fl.init,
                               fl.model, mesh)
    run_evals(config, params, step, fl.workdir, mesh=mesh)


def _run_cli() -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top
  from capi_jax.core import cli  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file('config', None, 'Config file (configs/*.py).', lock_config=True)
  flags.DEFINE_string('workdir', None, 'Run directory: checkpoints are read from it and '
                      'results written to WORKDIR/eval/<step>/.')
  flags.DEFINE_string('checkpoint', '', 'A checkpoint step folder (WORKDIR/checkpoints/<step>, '
                      'or a copy), a checkpoints folder, a workdir, a `capi_jax.convert` output, '
                      'or an official .pth / .npz file; default: the latest in WORKDIR.')
  flags.DEFINE_enum('init', '', ['', 'random'], "'random': evaluate the run's random init.")
  flags.DEFINE_enum('model', 'ema', ['ema', 'student'], 'Which encoder of a training checkpoint.')
  flags.mark_flags_as_required(['config', 'workdir'])
  cli.run(main)


if __name__ == '__main__':
  _run_cli()
