r"""Evaluation of a backbone with the official CAPI protocols, plus capi_jax's extras.

Run (latest checkpoint in WORKDIR, its EMA encoder):
  python -m capi_jax.evaluate --config=configs/tiny.py --workdir=/tmp/capi_tiny
The run's random initialisation (the baseline every result is compared to):
  ... --init=random
An official file of any family the config's method reads (converted on the fly by
`Method.official_backbone`, evaluated in float32 as the official loaders do; the config must
describe the same architecture): CAPI's release with configs/vitl.py, an MAE / dBOT / data2vec
2.0 file with a MIM-Refiner recipe, OpenAI CLIP's (the teacher) or a CAE v2 file with a CAE v2
recipe:
  python -m capi_jax.evaluate --config=configs/vitl.py --workdir=/tmp/official \
      --checkpoint=capi_vitl14_lvd.pth          # or .npz with the same names
  python -m capi_jax.evaluate --config=configs/mim_refiner/mae_l16.py --workdir=/tmp/mae \
      --checkpoint=mae_pretrain_vit_large.pth
Or a parameter directory written by `python -m capi_jax.convert --to=capi_jax`.

What runs is `config.evals.protocols` (see `capi_jax.evaluators`): the official 'classif'
(online linear / attentive probes), 'seg' (k-NN and logistic-regression segmentation) and
'viz' (PCA pictures), and the extra 'knn'; MIM-Refiner's configs run its own 'mimref_probe',
'mimref_knn', 'mimref_lowshot' (and the extra 'mimref_cluster'), CAE v2's its 'caev2_linear',
with the paper's figures (`evals.headline`) printed beside. Results go to `WORKDIR/eval/<step>/results.json`
(`eval/random_init/`, `eval/converted/`, `eval/<file stem>/` for the others), pictures to
`eval/<step>/viz_<resolution>/`, `curves.png` (the training curves of WORKDIR/metrics.jsonl, if
any); a table is printed, each number named by the protocol that produced it ('extra/...' for
capi_jax's extras). With `evals.random_init_baseline` the table shows the random init's numbers
beside (computed once per workdir and settings).
"""

if __name__ == '__main__':  # First, before jax is imported: this may restart the process.
  from capi_jax.base import huge_pages
  huge_pages.reexec_with_huge_pages()

from collections.abc import Sequence
import logging
import os
from typing import Any

from absl import app
from absl import flags
from absl import logging as absl_logging
import flax.linen as nn
import jax
import ml_collections
from ml_collections import config_flags

from capi_jax.base import cli
from capi_jax.base import sharding
from capi_jax.base import storage
from capi_jax.engine import checkpointing
from capi_jax.engine import config_checks
from capi_jax.engine import evaluation
from capi_jax.engine import pretrained
from capi_jax.engine import runs
from capi_jax.weights import files

PyTree = Any
logger = logging.getLogger(__name__)
# Newer checkpoints tried when the one being read is removed by the run that wrote it.
_ROTATION_RETRIES = 3


def load_params(config: ml_collections.ConfigDict, workdir: str | os.PathLike[str],
                checkpoint: str, init: str, which: str, mesh: jax.sharding.Mesh
                ) -> tuple[PyTree, int | str, nn.Module | None]:
  """(backbone params, output folder name, their model: None for the method's `eval_model`)
  for the command line's choice of encoder."""
  if init == 'random':
    return evaluation.random_init_params(config, mesh), evaluation.RANDOM_INIT, None
  if checkpoint and storage.path(checkpoint).suffix in files.OFFICIAL_SUFFIXES:
    path = storage.path(checkpoint)
    if not path.is_file():
      raise checkpointing.CheckpointNotFoundError(
          f'--checkpoint={checkpoint}: no such official checkpoint file; check the path.')
    # The config's method reads the file (any family it knows), float32 as the releases do.
    module, params = evaluation.official_backbone(config, path, which)
    return params, path.stem, module
  for attempt in range(_ROTATION_RETRIES + 1):
    found = checkpointing.find_checkpoint(checkpoint or workdir)
    if found.kind == 'params':
      return pretrained.restore_backbone(found.path), 'converted', None
    try:
      run = pretrained.restore_run(found.path, config, mesh)
    except checkpointing.DamagedCheckpointError:
      if storage.path(found.path).exists():
        raise  # Really damaged.
      # A training run with a small max_to_keep removed it while it was read: not damage.
      named = bool(checkpoint) and storage.path(checkpoint) == storage.path(found.path)
      if named or attempt == _ROTATION_RETRIES:
        raise checkpointing.CheckpointNotFoundError(
            f'{found.path} was removed while it was being read (a training run rotating its '
            'checkpoints, train.checkpointing.max_to_keep): evaluate again, or copy the step '
            'folder first and evaluate the copy.') from None
      logger.warning('%s was removed while it was being read (a training run rotating its '
                     'checkpoints); reading the newest one instead.', found.path)
      continue
    # Labelled by the step restored (the state's), whatever the folder is called.
    return run.method.eval_params(run.variables, which), run.step, None
  raise AssertionError('unreachable')


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  # capi_jax's own progress at INFO; libraries (Orbax logs every restore step) at WARNING.
  absl_logging.set_verbosity(absl_logging.WARNING)
  logging.getLogger('capi_jax').setLevel(logging.INFO)
  fl = flags.FLAGS
  config = fl.config
  # The training checks, less the batch's split over this host's devices (training's, not
  # evaluation's): an evaluation setting such as evals.batch_size=0 is one line, not a crash.
  config_checks.validate(config, device_count=0)
  runs.make_workdir(fl.workdir)  # Results go to WORKDIR/eval/.
  mesh = sharding.make_mesh(config)
  with jax.set_mesh(mesh):
    params, step, module = load_params(config, storage.path(fl.workdir), fl.checkpoint, fl.init,
                                       fl.model, mesh)
    evaluation.run_evals(config, params, step, fl.workdir, mesh=mesh, module=module)


if __name__ == '__main__':
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
