r"""Evaluation of a CAPI encoder: features, classification probes, segmentation, pictures.

Run (latest checkpoint in WORKDIR, its EMA encoder):
  python -m capi_jax.evaluate --config=configs/tiny.py --workdir=/tmp/capi_tiny
Or a random initialisation (the run's own step-0 weights, the baseline every result is compared
to) plus the raw-pixel k-NN baseline:
  python -m capi_jax.evaluate --config=configs/tiny.py --workdir=/tmp/capi_tiny --init=random
Or a parameter directory written by `python -m capi_jax.convert --to=capi_jax` (e.g. the
official weights): `--checkpoint=OUT/params`.

Results go to `WORKDIR/eval/<step>/results.json` (`eval/random_init/`, `eval/converted/` for the
other two) with `pca.png` (PCA of patch features beside the images) and `curves.png` (the
training curves of WORKDIR/metrics.jsonl, if any); a small table is printed.

What runs is set by `config.evals`:
- features: the eval forward `(global_repr, registers, feature_map)` on `evals.dataset`
  (`evals.train_split` capped at `evals.max_train_images`, all of `evals.test_split`), jitted,
  batch split over every device, parameters placed by `config.sharding`;
- `evals.probes`: 'knn' (cosine, `evals.knn_ks`, `evals.knn_temperature`; on global_repr and
  on the mean patch token), 'linear' (on
  global_repr, on the mean patch token, and on both concatenated) and 'attentive' (patch tokens),
  the trained ones over `evals.probe_lrs` x `evals.probe_wds` for `evals.probe_iters` steps,
  chosen on `evals.held_out_fraction` of train;
- `evals.segmentation`: '' (off), 'fashion_mnist_scenes[:DIR]' (scenes composed from
  Fashion-MNIST items, see `segmentation.py`) or 'folder:PATH' (ADE20K layout), scored with
  k-NN (`evals.seg_knn_ks`, cosine and L2) and a linear classifier, ignoring
  `evals.seg_ignore_labels`;
- `evals.visualize`: the pictures;
- `evals.random_init_baseline`: show the random init's numbers and the
  raw-pixel k-NN beside every evaluation (computed once per workdir, then read back).
Probe training keeps the patch tokens of the whole train set in memory only when 'attentive' is
asked for: (n, tokens, dim) floats, so cap `evals.max_train_images` accordingly.
"""

from collections.abc import Iterable, Iterator, Sequence
import functools
import json
import logging
import pathlib
import time
from typing import Any

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import flax.linen as nn
import ml_collections
import numpy as np

from capi_jax.data import sources
from capi_jax.data import pipeline
from capi_jax.data import transforms
from capi_jax import methods
from capi_jax.evaluators import probes
from capi_jax.evaluators import segmentation
from capi_jax.core import sharding
from capi_jax.core import state as state_lib
from capi_jax.evaluators import visualize

logger = logging.getLogger(__name__)
PyTree = Any
Batch = dict[str, np.ndarray]

# Composed segmentation scenes: per split, and their side in units of data.image_size. Scenes
# twice the training image size hold items at about the size the encoder was trained on.
SCENES_TRAIN, SCENES_TEST = 500, 150
SCENE_SIZE_FACTOR = 2
PCA_IMAGES = 8  # Images in the PCA picture.
RANDOM_INIT = 'random_init'  # Output folder of the random initialisation's evaluation.


# ----------------------------------------------------------------------------------------------
# Feature extraction.


def _forward(model: nn.Module, params: PyTree, images: jax.Array
             ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(global_repr (b, D), mean patch token (b, D), feature_map (b, h, w, D)), float32."""
  global_repr, _, feature_map = model.apply({'params': params}, images)
  feature_map = feature_map.astype(jnp.float32)
  return global_repr.astype(jnp.float32), feature_map.mean(axis=(1, 2)), feature_map


class FeatureExtractor:
  """The eval forward, jitted once, with the batch split over every device of `mesh`."""

  def __init__(self, config: ml_collections.ConfigDict, params: PyTree,
               mesh: jax.sharding.Mesh):
    self.batch_sharding = sharding.batch_sharding(mesh)
    # Fixed-size batches (a multiple of the device count) so that one compilation serves all.
    n_dev = mesh.devices.size
    self.batch_size = -(-config.evals.batch_size // n_dev) * n_dev
    self.params = jax.device_put(
        params, sharding.tree_shardings(mesh, params, config.sharding.param_rules))
    self._fn = jax.jit(functools.partial(_forward, methods.from_config(config).eval_model()),
                       out_shardings=self.batch_sharding)

  def _global_batch(self, images: np.ndarray) -> jax.Array:
    """This batch, identical on every host, as a global array split over the devices."""
    n_proc, proc = jax.process_count(), jax.process_index()
    per_host = self.batch_size // n_proc
    local = images[proc * per_host:(proc + 1) * per_host]
    return jax.make_array_from_process_local_data(self.batch_sharding, local)

  def __call__(self, batches: Iterable[Batch], keep_maps: bool, keep_pixels: bool = False
               ) -> dict[str, np.ndarray]:
    """Features of every image of `batches` (dicts with 'images' and optionally 'label').

    Returns:
      {'global_repr' (n, D), 'patch_mean' (n, D), 'label' (n,) if given, 'feature_map'
      (n, h, w, D) if keep_maps, 'pixels' (n, H*W*3) if keep_pixels, 'pca_images' and
      'pca_maps' (the first PCA_IMAGES images and feature maps)}.
    """
    out: dict[str, list[np.ndarray]] = {}
    # Only what is asked for leaves the devices: feature maps are most of the bytes.
    fetch = lambda x: multihost_utils.process_allgather(x, tiled=True)

    def collect(batch: Batch, features: tuple[jax.Array, jax.Array, jax.Array]) -> None:
      n = batch['n']
      global_repr, patch_mean, feature_map = features
      parts = {'global_repr': fetch(global_repr)[:n], 'patch_mean': fetch(patch_mean)[:n]}
      if keep_maps or not out:
        feature_map = fetch(feature_map)
      if keep_maps:
        parts['feature_map'] = feature_map[:n]
      if keep_pixels:
        parts['pixels'] = batch['images'][:n].reshape(n, -1)
      if 'label' in batch:
        parts['label'] = batch['label'][:n]
      if not out:  # The first images also make the PCA picture.
        parts['pca_images'] = batch['images'][:min(n, PCA_IMAGES)]
        parts['pca_maps'] = feature_map[:min(n, PCA_IMAGES)]
      for k, v in parts.items():
        out.setdefault(k, []).append(np.asarray(v))

    pending = None
    for batch in self._rebatch(batches):
      # Dispatch this batch before fetching the previous one, so the devices never wait for
      # the host to read the next images.
      features = self._fn(self.params, self._global_batch(batch['images']))
      if pending is not None:
        collect(*pending)
      pending = (batch, features)
    if pending is None:
      raise ValueError('The evaluation dataset yielded no images.')
    collect(*pending)
    return {k: np.concatenate(v) for k, v in out.items()}

  def _rebatch(self, batches: Iterable[Batch]) -> Iterator[Batch]:
    """Batches of exactly self.batch_size (zero-padded at the end), with 'n' real images."""
    buffer: list[Batch] = []
    count = 0
    for batch in batches:
      buffer.append({k: np.asarray(batch[k]) for k in ('images', 'label') if k in batch})
      count += len(buffer[-1]['images'])
      while count >= self.batch_size:
        merged = {k: np.concatenate([b[k] for b in buffer]) for k in buffer[0]}
        yield {**{k: v[:self.batch_size] for k, v in merged.items()}, 'n': self.batch_size}
        buffer = [{k: v[self.batch_size:] for k, v in merged.items()}]
        count -= self.batch_size
    if count:
      merged = {k: np.concatenate([b[k] for b in buffer]) for k in buffer[0]}
      pad = lambda v: np.pad(v, [(0, self.batch_size - count)] + [(0, 0)] * (v.ndim - 1))
      yield {**{k: pad(v) for k, v in merged.items()}, 'n': count}


def _array_batches(images: np.ndarray, batch_size: int) -> Iterator[Batch]:
  for start in range(0, len(images), batch_size):
    yield {'images': images[start:start + batch_size]}


# ----------------------------------------------------------------------------------------------
# Protocols.


def classification(config: ml_collections.ConfigDict, train: dict[str, np.ndarray],
                   test: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
  """The `config.evals.probes` on extracted features; accuracies in [0, 1]."""
  ev = config.evals
  if (train['label'] < 0).any() or (test['label'] < 0).any():
    raise ValueError(f'{ev.dataset} has unlabelled images (label -1): classification probes '
                     'need a labelled dataset (for folders, one sub-folder per class).')
  num_classes = int(max(train['label'].max(), test['label'].max())) + 1
  y, y_test = train['label'], test['label']
  trained = dict(num_classes=num_classes, lrs=ev.probe_lrs, wds=ev.probe_wds,
                 iters=ev.probe_iters, batch_size=ev.probe_batch_size,
                 held_out_fraction=ev.held_out_fraction, seed=config.train.seed)
  results = {}
  unknown = set(ev.probes) - {'knn', 'linear', 'attentive'}
  if unknown:
    raise ValueError(f'Unknown probes {sorted(unknown)} in config.evals.probes; '
                     "use 'knn', 'linear', 'attentive'.")
  if 'knn' in ev.probes:
    for name, key in (('knn', 'global_repr'), ('knn_patch_mean', 'patch_mean')):
      results[name] = probes.knn_classify(train[key], y, test[key], y_test, ks=ev.knn_ks,
                                          num_classes=num_classes,
                                          temperature=ev.knn_temperature)
  if 'linear' in ev.probes:
    concat = lambda f: np.concatenate([f['global_repr'], f['patch_mean']], axis=1)
    for name, get in (('global', lambda f: f['global_repr']),
                      ('patch_mean', lambda f: f['patch_mean']), ('concat', concat)):
      results[f'linear_{name}'] = probes.linear_probe(get(train), y, get(test), y_test, **trained)
  if 'attentive' in ev.probes:
    tokens = lambda f: f['feature_map'].reshape(len(f['feature_map']), -1,
                                                f['feature_map'].shape[-1])
    results['attentive'] = probes.attentive_probe(tokens(train), y, tokens(test), y_test,
                                                  **trained)
  return results


def pixel_knn(config: ml_collections.ConfigDict, train: dict[str, np.ndarray],
              test: dict[str, np.ndarray]) -> dict[str, float]:
  """The raw-pixel baseline: cosine k-NN on the normalised eval images themselves."""
  num_classes = int(max(train['label'].max(), test['label'].max())) + 1
  return probes.knn_classify(train['pixels'], train['label'], test['pixels'], test['label'],
                             ks=config.evals.knn_ks, num_classes=num_classes,
                             temperature=config.evals.knn_temperature)


def _to_model_input(images: np.ndarray) -> np.ndarray:
  """uint8 (n, H, W) grey or (n, H, W, 3) RGB -> ImageNet-normalised float32 (n, H, W, 3)."""
  if images.ndim == 3:
    images = np.repeat(images[..., None], 3, axis=-1)
  return transforms.normalize(images)


def segmentation_data(config: ml_collections.ConfigDict
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
  """(train images, train labels, test images, test labels, num_classes) of evals.segmentation.

  Images are normalised float32 (n, S, S, 3) and labels uint8 (n, S, S), S being
  config.data.image_size for folders and SCENE_SIZE_FACTOR times it for composed scenes.
  """
  spec = config.evals.segmentation
  size = config.data.image_size
  kind, _, arg = spec.partition(':')
  if kind == 'fashion_mnist_scenes':
    splits = []
    for split, n_scenes, seed in (('train', SCENES_TRAIN, 0), ('test', SCENES_TEST, 1)):
      items = sources.FashionMnistSource(arg or sources.FASHION_MNIST_DIR, split)
      # One to three items of 40-60% of the scene's side: as large as in pretraining.
      images, labels = segmentation.compose_scenes(
          items.images, items.labels, n_scenes=n_scenes, canvas=SCENE_SIZE_FACTOR * size,
          seed=seed, items_per_scene=(1, 3), item_scale=(0.4, 0.6))
      splits += [_to_model_input(images), labels]
    return (*splits, segmentation.FASHION_MNIST_SEG_CLASSES)
  if kind == 'folder':
    train_images, train_labels = segmentation.load_folder(
        arg, 'train', size, config.evals.max_train_images)
    test_images, test_labels = segmentation.load_folder(arg, 'validation', size)
    ignore = np.asarray(config.evals.seg_ignore_labels)
    used = lambda l: l[~np.isin(l, ignore)]
    num_classes = int(max(used(train_labels).max(), used(test_labels).max())) + 1
    return (_to_model_input(train_images), train_labels, _to_model_input(test_images),
            test_labels, num_classes)
  raise ValueError(f'Unknown config.evals.segmentation {spec!r}: use "", '
                   '"fashion_mnist_scenes[:DIR]" or "folder:PATH".')


def segmentation_eval(config: ml_collections.ConfigDict, extract: FeatureExtractor
                      ) -> tuple[dict[str, dict[str, float]], dict[str, np.ndarray]]:
  """(segmentation results, the test features for pictures) on config.evals.segmentation."""
  ev = config.evals
  train_images, train_labels, test_images, test_labels, num_classes = segmentation_data(config)
  train = extract(_array_batches(train_images, extract.batch_size), keep_maps=True)
  test = extract(_array_batches(test_images, extract.batch_size), keep_maps=True)
  results = segmentation.evaluate_segmentation(
      train['feature_map'], train_labels, test['feature_map'], test_labels,
      num_classes=num_classes, ignore_labels=ev.seg_ignore_labels, knn_ks=ev.seg_knn_ks,
      lrs=ev.probe_lrs, wds=ev.probe_wds, iters=ev.probe_iters, batch_size=ev.probe_batch_size,
      held_out_fraction=ev.held_out_fraction, seed=config.train.seed,
      temperature=ev.knn_temperature)
  return results, test


# ----------------------------------------------------------------------------------------------
# Driver.


def _flatten(results: dict[str, Any], prefix: str = '') -> dict[str, float]:
  """Nested results -> {'a/b/c': number}; strings (e.g. the chosen k-NN metric) are left out."""
  flat = {}
  for k, v in results.items():
    if isinstance(v, dict):
      flat.update(_flatten(v, f'{prefix}{k}/'))
    elif isinstance(v, (int, float)) and not isinstance(v, bool):
      flat[f'{prefix}{k}'] = v
  return flat


def format_table(results: dict[str, Any], baseline: dict[str, Any] | None = None) -> str:
  """The headline numbers (accuracies and mIoU in %), beside the random init's when given."""

  def scores(res):
    return {name: value for name, value in _flatten(res).items()
            if name.rsplit('/', 1)[-1].startswith(('k', 'top1', 'miou', 'pixel_acc'))
            and name.rsplit('/', 1)[-1] != 'k' and 'held_out' not in name}

  mine, base = scores(results), scores(baseline or {})
  names = list(mine) + [n for n in base if n not in mine]
  cell = lambda d, n: f'{100 * d[n]:6.2f}' if n in d else '     -'
  rows = [(n, cell(mine, n) + (f'  {cell(base, n)}' if baseline else '')) for n in names]
  if baseline:
    rows.insert(0, ('', '  this  ' + RANDOM_INIT))
  width = max((len(n) for n, _ in rows), default=0)
  return '\n'.join(f'{n:<{width}}  {v}' for n, v in rows)


def evaluate_params(config: ml_collections.ConfigDict, params: PyTree, mesh: jax.sharding.Mesh,
                    *, pixel_baseline: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
  """Every protocol of config.evals on one encoder.

  Args:
    config: the run's config.
    params: the EncoderDecoder's parameters (`variables['params']`).
    mesh: devices to split the batches over.
    pixel_baseline: also run k-NN on the raw pixels.

  Returns:
    (nested results, pictures' inputs {'images', 'maps'} per dataset, for `save_pictures`).
  """
  ev = config.evals
  extract = FeatureExtractor(config, params, mesh)
  keep_maps = 'attentive' in ev.probes
  results: dict[str, Any] = {}
  pictures = {}
  seconds = {}
  if ev.probes:
    t0 = time.perf_counter()
    train = extract(pipeline.create_eval_dataset(config, ev.train_split,
                                                       ev.max_train_images),
                    keep_maps=keep_maps, keep_pixels=pixel_baseline)
    test = extract(pipeline.create_eval_dataset(config, ev.test_split),
                   keep_maps=keep_maps, keep_pixels=pixel_baseline)
    seconds['features'] = time.perf_counter() - t0
    t0 = time.perf_counter()
    results.update(classification(config, train, test))
    seconds['probes'] = time.perf_counter() - t0
    if pixel_baseline:
      results['pixels_knn'] = pixel_knn(config, train, test)
    pictures['classification'] = (test['pca_images'], test['pca_maps'])
  if ev.segmentation:
    t0 = time.perf_counter()
    results['segmentation'], seg_test = segmentation_eval(config, extract)
    seconds['segmentation'] = time.perf_counter() - t0
    pictures['segmentation'] = (seg_test['pca_images'], seg_test['pca_maps'])
  results['seconds'] = seconds
  return results, pictures


def save_pictures(pictures: dict[str, tuple[np.ndarray, np.ndarray]], out_dir: pathlib.Path,
                  workdir: pathlib.Path, title: str) -> None:
  """pca.png (and pca_segmentation.png) in out_dir; curves.png if workdir has metrics.jsonl."""
  for name, (images, maps) in pictures.items():
    filename = 'pca.png' if name == 'classification' else f'pca_{name}.png'
    visualize.save_pca_figure(images, maps, out_dir / filename, title=f'{title}: {name}')
  if (workdir / 'metrics.jsonl').exists():
    try:
      visualize.save_training_curves(workdir / 'metrics.jsonl', out_dir / 'curves.png')
    except ValueError as e:  # A run that has not logged yet: no curves, not a failed eval.
      logger.info('No training curves: %s', e)


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
                                'image_size': config.data.image_size,
                                'data_dir': config.data.data_dir}))


def _evaluate_and_save(config: ml_collections.ConfigDict, params: PyTree, step: int | str,
                       workdir: pathlib.Path, mesh: jax.sharding.Mesh, pixel_baseline: bool
                       ) -> tuple[dict[str, Any], pathlib.Path]:
  """(nested results, output folder); process 0 writes results.json and the pictures."""
  t0 = time.perf_counter()
  results, pictures = evaluate_params(config, params, mesh, pixel_baseline=pixel_baseline)
  results['seconds']['total'] = time.perf_counter() - t0
  out_dir = workdir / 'eval' / str(step)
  if jax.process_index() == 0:
    out_dir.mkdir(parents=True, exist_ok=True)
    # Written aside then renamed: a killed evaluation never leaves a truncated results.json
    # (which random_init_results would otherwise try to reuse).
    tmp = out_dir / 'results.json.tmp'
    tmp.write_text(json.dumps({'step': step, 'settings': _settings(config), **results}, indent=2))
    tmp.replace(out_dir / 'results.json')
    if config.evals.visualize:
      save_pictures(pictures, out_dir, workdir, title=f'{config.name} {step}')
  return results, out_dir


def random_init_results(config: ml_collections.ConfigDict, workdir: pathlib.Path,
                        mesh: jax.sharding.Mesh) -> dict[str, Any]:
  """The random init's results (with the raw-pixel k-NN), computed once per run and settings.

  They do not change during training, so WORKDIR/eval/random_init/results.json is reused when
  it was made with the same evaluation settings.
  """
  path = workdir / 'eval' / RANDOM_INIT / 'results.json'
  if path.exists():
    saved = json.loads(path.read_text())
    if saved.get('settings') == _settings(config):
      return {k: v for k, v in saved.items() if k not in ('step', 'settings')}
  results, _ = _evaluate_and_save(config, random_init_params(config, mesh), RANDOM_INIT,
                                  workdir, mesh, pixel_baseline=True)
  return results


def run_evals(config: ml_collections.ConfigDict, params: PyTree, step: int | str,
              workdir: str | pathlib.Path, *, pixel_baseline: bool = False,
              mesh: jax.sharding.Mesh | None = None) -> dict[str, float]:
  """Evaluates an encoder, writes WORKDIR/eval/<step>/results.json and pictures, prints a table.

  With `config.evals.random_init_baseline` the table also shows the random
  init's numbers and the raw-pixel k-NN (see `random_init_results`); they are not returned.

  Args:
    config: the run's config (`config.evals` says what to run).
    params: the EncoderDecoder's parameters (`variables['params']`), e.g. a TrainState's
      `ema_params['backbone']`.
    step: training step, or a name (RANDOM_INIT, 'converted') for the output folder.
    workdir: the run's directory.
    pixel_baseline: also run the raw-pixel k-NN baseline.
    mesh: devices to use; default `sharding.make_mesh(config)`.

  Returns:
    Flat {'knn/k10': 0.81, 'linear_global/top1': ..., 'segmentation/knn/miou': ...} numbers.
  """
  mesh = mesh or sharding.make_mesh(config)
  workdir = pathlib.Path(workdir)
  results, out_dir = _evaluate_and_save(config, params, step, workdir, mesh, pixel_baseline)
  baseline = None
  if config.evals.random_init_baseline and step != RANDOM_INIT:
    baseline = random_init_results(config, workdir, mesh)
  if jax.process_index() == 0:
    print(f'Evaluation at {step} ({results["seconds"]["total"]:.1f} s), written to {out_dir}:\n'
          + format_table(results, baseline), flush=True)
  return _flatten({k: v for k, v in results.items() if k != 'seconds'})


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
    run_evals(config, params, step, fl.workdir, pixel_baseline=fl.pixel_baseline, mesh=mesh)


def _run_cli() -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top
  from capi_jax.core import cli  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file('config', None, 'Config file (configs/*.py).', lock_config=True)
  flags.DEFINE_string('workdir', None, 'Run directory: checkpoints are read from it and '
                      'results written to WORKDIR/eval/<step>/.')
  flags.DEFINE_string('checkpoint', '', 'A checkpoint step folder (WORKDIR/checkpoints/<step>, '
                      'or a copy), a checkpoints folder, a workdir, or a `capi_jax.convert` '
                      'output; default: the latest in WORKDIR.')
  flags.DEFINE_enum('init', '', ['', 'random'], "'random': evaluate the run's random init.")
  flags.DEFINE_enum('model', 'ema', ['ema', 'student'], 'Which encoder of a training checkpoint.')
  flags.DEFINE_bool('pixel_baseline', True, 'Also run k-NN on the raw pixels.')
  flags.mark_flags_as_required(['config', 'workdir'])
  cli.run(main)


if __name__ == '__main__':
  _run_cli()
