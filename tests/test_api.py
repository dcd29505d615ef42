"""Encoders from Python and on the command line: `evaluate --checkpoint=FILE` for every method
(each method's `official_backbone`), and `capi_jax.load` (runs, convert outputs, official files,
README's Python section)."""

import http.server
import importlib.util
import io
import json
import logging
import os
import pathlib
import re
import subprocess
import sys
import threading

from absl import logging as absl_logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image
import pytest

import capi_jax
from capi_jax import api
from capi_jax import convert
from capi_jax import evaluate
from capi_jax import extract
from capi_jax.base import cli
from capi_jax.base import platforms
from capi_jax.base import sharding
from capi_jax.base import storage
from capi_jax.data import sources
from capi_jax.data import wds
from capi_jax.engine import evaluation
from capi_jax.engine import train
from capi_jax.models import vit
from capi_jax.weights import files
from capi_jax.weights import releases
from capi_jax.weights import vit as vit_weights
from configs.caev2 import fashion_mnist as caev2_fashion_mnist
from configs.mim_refiner import base as mimref_base
from configs.mim_refiner import tiny as mimref_tiny

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _random_tree(shapes, seed):
  """Random float32 numpy leaves shaped like `shapes` (no init to compile)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: (0.1 * rng.normal(size=x.shape)).astype(np.float32), shapes)


def _mimref_mae_config() -> ml_collections.ConfigDict:
  """MIM-Refiner from an MAE encoder (the mae_l16 recipe's family), 2 blocks of 16 at 8 px."""
  c = mimref_tiny.get_config()
  c.data.image_size = 8
  c.mim_refiner.encoder = 'mae'
  c.mim_refiner.model = mimref_base.vit_model('mae', patch_size=4, embed_dim=16, depth=2,
                                              num_heads=2)
  c.mim_refiner.model.image_size = 8
  return c


def _caev2_clip_config() -> ml_collections.ConfigDict:
  """CAE v2 with an OpenAI-CLIP-layout teacher (the release's), everything a few channels."""
  c = caev2_fashion_mnist.get_config()
  c.data.image_size = 8
  c.caev2.model.update(patch_size=4, image_size=8, embed_dim=16, depth=1, num_heads=2)
  c.caev2.regressor.update(embed_dim=8, depth=1, num_heads=2)
  c.caev2.teacher.backbone = 'clip'
  c.caev2.teacher.normalization = 'clip'
  c.caev2.teacher.image_size = 8
  c.caev2.teacher.model = ml_collections.ConfigDict(dict(
      vit.FAMILIES['clip'], patch_size=4, image_size=8, embed_dim=16, depth=2, num_heads=2,
      out_dim=6))
  return c


def _png(pixels: np.ndarray) -> bytes:
  out = io.BytesIO()
  Image.fromarray(pixels).save(out, format='PNG')
  return out.getvalue()


def _write(state_dict: dict[str, np.ndarray], path: pathlib.Path) -> pathlib.Path:
  """`state_dict` as a `.pth` when PyTorch is installed (as the releases ship), else `.npz`."""
  if importlib.util.find_spec('torch') is None:
    path = path.with_suffix('.npz')
  files.write_state_dict(state_dict, path)
  return path


def _check_official(config, module, family, prefix, tmp_path, name):
  """Writes random params of `module` as `family`'s file; evaluate reads them back exactly and
  the backbone it builds runs."""
  params = _random_tree(vit_weights.param_shapes(module), seed=1)
  path = _write(vit_weights.params_to_official(params, family, prefix), tmp_path / name)
  mesh = sharding.make_mesh(config)
  loaded, step, model = evaluate.load_params(config, tmp_path, str(path), '', 'ema', mesh)
  assert step == path.stem
  jax.tree.map(np.testing.assert_array_equal, loaded, params)
  backbone = evaluation.make_backbone(config, loaded, mesh, model)
  size = config.data.image_size
  n = backbone.batch_size
  images = np.zeros((n, size, size, 3), np.float32)
  out = backbone.extract([{'images': images, 'index': np.arange(n), 'valid': np.ones(n, bool)}])
  assert out['global_repr'].shape[0] == n and np.isfinite(out['global_repr']).all()
  return model


def test_evaluate_reads_an_mae_file_with_a_mim_refiner_config(tmp_path):
  config = _mimref_mae_config()
  method = evaluation.eval_method(config)
  model = _check_official(config, method.encoder, 'mae', '', tmp_path, 'mae_pretrain.pth')
  assert model == method.eval_model()


def test_evaluate_reads_clip_and_caev2_files_with_a_caev2_config(tmp_path):
  config = _caev2_clip_config()
  method = evaluation.eval_method(config)
  # OpenAI CLIP's file (visual tower under `visual.`): the teacher is what is evaluated.
  model = _check_official(config, method.teacher, 'clip', 'visual.', tmp_path, 'ViT-B-16.pt')
  assert model == method.teacher
  # A CAE v2 release (encoder under `encoder.`): the student encoder.
  model = _check_official(config, method.encoder, 'caev2', 'encoder.', tmp_path, 'caev2.pth')
  assert model == method.eval_model()


def test_evaluate_asks_for_a_conversion_where_the_method_cannot_read_the_file():
  config = mimref_tiny.get_config()  # Refines a CAPI encoder: its file is converted first.
  with pytest.raises(ValueError, match='convert it first'):
    evaluation.eval_method(config).official_backbone({'x': np.zeros(1)}, 'ema')


_SMALL_TINY = '''
from configs import tiny


def get_config():
  """configs/tiny.py at 28 px with a 32-wide, 1 + 1 block model, 2 steps of 16 images."""
  c = tiny.get_config()
  c.capi.model.update(embed_dim=32, num_heads=2, encoder_depth=1, decoder_depth=1)
  c.capi.num_clusters = 16
  c.data.dataset = 'synthetic'
  c.train.update(total_iters=2, global_batch_size=16)
  for s in (c.capi.optim.lr_schedule, c.capi.optim.momentum_schedule,
            c.capi.clustering_optimizer.lr_schedule):
    s.warmup_iters = 1
  c.evals.final = False
  return c
'''


def _readme_python_block() -> str:
  readme = (pathlib.Path(__file__).resolve().parent.parent / 'README.md').read_text()
  section = readme.split('\n## Python\n', 1)[1].split('\n## ', 1)[0]
  return re.search(r'```python\n(.*?)```', section, re.S).group(1)


@pytest.fixture(scope='module')
def small_run(tmp_path_factory):
  """(config file, its config, a 2-step run of it, the run's EMA as an official file)."""
  tmp_path = tmp_path_factory.mktemp('small_run')
  config_file = tmp_path / 'tiny_small.py'
  config_file.write_text(_SMALL_TINY)
  config = api.read_config(str(config_file))
  run = tmp_path / 'capi_tiny'
  train.train_and_evaluate(config, run)
  official = tmp_path / 'capi_tiny_ema.npz'
  convert._run(  # pylint: disable=protected-access
      config, 'official', str(run / 'checkpoints' / '2'), str(official), 'student_ema')
  return config_file, config, run, official


def test_readme_python_section_runs(small_run):
  """README's block, on a 2-step run of a small tiny.py and its official file (the paths
  replaced): a run and its `convert --to=official` file give identical features."""
  config_file, _, run, official = small_run
  code = (_readme_python_block().replace('/tmp/capi_tiny_ema.pth', str(official))
          .replace('/tmp/capi_tiny', str(run)).replace('configs/tiny.py', str(config_file)))
  namespace = {}
  exec(compile(code, 'README.md', 'exec'), namespace)  # pylint: disable=exec-used
  features = namespace['features']
  assert features['global_repr'].shape == (8, 32)
  assert features['registers'].shape == (8, 4, 32)
  assert features['feature_map'].shape == (8, 7, 7, 32)
  assert all(v.dtype == np.float32 for v in features.values())


def test_load_inputs_weights_and_errors(small_run, tmp_path):
  config_file, config, run, official = small_run
  encoder = capi_jax.load(run / 'checkpoints' / '2')
  assert encoder.module.dtype == jnp.float32  # float32 whatever the run computed in
  pixels = np.random.default_rng(1).integers(0, 256, (3, 28, 28, 3), np.uint8)
  as_uint8 = encoder(pixels)
  as_float = encoder(pixels.astype(np.float32) / 255)
  np.testing.assert_allclose(as_float['global_repr'], as_uint8['global_repr'], atol=1e-5)
  one = encoder(pixels[0], outputs=('global_repr',))
  assert list(one) == ['global_repr'] and one['global_repr'].shape == (32,)
  np.testing.assert_allclose(one['global_repr'], as_uint8['global_repr'][0], atol=1e-5)
  # Token outputs of chosen blocks (what MIM-Refiner's / CAE v2's protocols pool).
  tokens = encoder(pixels, outputs=(), blocks=(-1, 0))
  assert tokens['tokens'].shape == (3, 4 + 49, 32) and tokens['blocks'].shape == (3, 2, 53, 32)
  np.testing.assert_allclose(tokens['tokens'][:, 4:].reshape(3, 7, 7, 32),
                             as_uint8['feature_map'], atol=1e-5)
  # Sides rounded to whole patches (29 -> 28, 27 -> 28), or resized to image_size.
  assert encoder(np.zeros((1, 29, 27, 3), np.uint8))['feature_map'].shape == (1, 7, 7, 32)
  resized = capi_jax.load(run, image_size=16)(pixels)
  assert resized['feature_map'].shape == (3, 4, 4, 32)
  # The student differs from its EMA; a convert output needs the config.
  student = capi_jax.load(run, which='student')(pixels)
  assert not np.array_equal(student['global_repr'], as_uint8['global_repr'])
  files.save_params({'backbone': jax.device_get(encoder.params)}, tmp_path / 'converted')
  with pytest.raises(capi_jax.UserError, match='pass config='):
    capi_jax.load(tmp_path / 'converted')
  converted = capi_jax.load(tmp_path / 'converted', config=config)(pixels)
  np.testing.assert_array_equal(converted['feature_map'], as_uint8['feature_map'])
  with pytest.raises(capi_jax.UserError, match='weights of a CAPI model.*pass config='):
    capi_jax.load(official)
  del config_file


def test_no_libtpu_noise_without_a_tpu(monkeypatch):
  """With libtpu installed on a host without TPU chips, a command's jax start prints nothing of
  libtpu's (it asked the metadata server, then warned on every command); preset values win."""
  if importlib.util.find_spec('libtpu') is None or platforms.tpu_chips_present():
    pytest.skip('needs libtpu installed on a host without a TPU')
  env = {k: v for k, v in os.environ.items() if k not in platforms.QUIET_TPU_ENV}
  env.pop('JAX_PLATFORMS', None)
  out = subprocess.run([sys.executable, '-c', 'import capi_jax, jax; print(jax.devices())'],
                       env=env, capture_output=True, text=True, timeout=120)
  assert out.returncode == 0 and 'CpuDevice' in out.stdout, out.stderr
  assert 'TPU' not in out.stderr, out.stderr
  monkeypatch.setenv('TPU_HOST_BOUNDS', '2,2,1')
  for key in ('TPU_SKIP_MDS_QUERY', 'TPU_WORKER_HOSTNAMES'):
    monkeypatch.delenv(key, raising=False)
  assert platforms.quiet_libtpu_without_tpu() == {'TPU_SKIP_MDS_QUERY': '1',
                                                  'TPU_WORKER_HOSTNAMES': 'localhost'}
  assert os.environ['TPU_HOST_BOUNDS'] == '2,2,1'
  monkeypatch.setenv('JAX_FORCE_TPU_INIT', '1')
  monkeypatch.delenv('TPU_SKIP_MDS_QUERY')
  assert platforms.quiet_libtpu_without_tpu() == {}


@pytest.fixture
def release_server(tmp_path):
  """An HTTP server on 127.0.0.1 serving tmp_path/served; yields (base URL, request paths)."""
  served = tmp_path / 'served'
  served.mkdir()
  requests = []

  class Handler(http.server.SimpleHTTPRequestHandler):

    def __init__(self, *args, **kwargs):
      super().__init__(*args, directory=str(served), **kwargs)

    def do_GET(self):  # pylint: disable=invalid-name
      requests.append(self.path)
      super().do_GET()

    def log_message(self, *args):  # Quiet.
      del args

  server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
  threading.Thread(target=server.serve_forever, daemon=True).start()
  yield served, f'http://127.0.0.1:{server.server_address[1]}/', requests
  server.shutdown()


def test_a_named_release_downloads_once_from_a_mirror(small_run, release_server, tmp_path,
                                                      monkeypatch):
  config_file, _, run, official = small_run
  served, base_url, requests = release_server
  (served / 'capi_test_tiny.npz').write_bytes(official.read_bytes())
  monkeypatch.syspath_prepend(str(config_file.parent))  # Its config, as a module.
  monkeypatch.setitem(releases.RELEASES, 'capi_test_tiny', releases.Release(
      'https://dl.fbaipublicfiles.com/capi/capi_test_tiny.npz', config_file.stem))
  monkeypatch.setenv(storage.CACHE_ENV, str(tmp_path / 'cache'))
  monkeypatch.setenv(releases.MIRROR_ENV, base_url)  # Nothing reaches the real host.
  pixels = np.random.default_rng(2).integers(0, 256, (2, 28, 28, 3), np.uint8)
  want = capi_jax.load(run)(pixels)
  for _ in range(2):
    got = capi_jax.load('capi_test_tiny')(pixels)
    np.testing.assert_array_equal(got['global_repr'], want['global_repr'])
  assert requests == ['/capi_test_tiny.npz']  # Downloaded once, then read from the cache.
  record = json.loads((tmp_path / 'cache' / 'releases' / 'capi_test_tiny.npz.json').read_text())
  assert record['size'] == official.stat().st_size
  cached = tmp_path / 'cache' / 'releases' / 'capi_test_tiny.npz'
  cached.write_bytes(cached.read_bytes()[:-1])
  with pytest.raises(releases.ReleaseError, match='differs from the file first downloaded'):
    capi_jax.load('capi_test_tiny')
  # Unreachable (offline): the error says where to put the file.
  monkeypatch.setenv(releases.MIRROR_ENV, 'http://127.0.0.1:9/')
  with pytest.raises(releases.ReleaseError,
                     match=r'put it at .*cache/releases/capi_vitl14_lvd.pth'):
    releases.fetch('capi_vitl14_lvd', timeout_s=5)
  # No partial file left.
  assert not list((tmp_path / 'cache' / 'releases').glob('.capi_vitl14_lvd*'))


def test_release_table_and_configs():
  assert releases.url_of('capi_vitl14_in22k') == (
      'https://dl.fbaipublicfiles.com/capi/capi_vitl14_i22k.pth')  # hubconf's file name.
  assert releases.url_of('d2v2_refined_h14', 'http://mirror/w') == (
      'http://mirror/w/d2v2refined_h14.th')
  capi = api.release_config('capi_vitl14_lvd').capi.model
  assert (capi.patch_size, capi.embed_dim) == (14, 1024)
  refined = api.release_config('d2v2_refined_h14').mim_refiner
  assert refined.encoder == 'data2vec2' and refined.model.block == 'postnorm'
  assert (refined.model.patch_size, refined.model.embed_dim, refined.model.depth) == (14, 1280,
                                                                                         32)


def test_extract_writes_resumable_shards(small_run, tmp_path):
  _, _, run, _ = small_run
  fmnist = sources.make_source('fashion_mnist', 'test')
  samples = [(_png(fmnist.images[i]), 'png', int(fmnist.labels[i])) for i in range(20)]
  samples[5] = (b'broken', 'jpg', 0)
  wds.write_shards(samples, str(tmp_path / '%04d.tar'), 10)
  pattern = f'wds:{tmp_path}/{{0000..0001}}.tar'
  source = sources.make_source(pattern, 'train')
  encoder = capi_jax.load(run)
  out = tmp_path / 'features'
  lines = []
  kw = dict(resolution=28, shard_size=8, outputs=('global_repr',))
  assert extract.extract(encoder, source, str(out), batch_size=8, log=lines.append, **kw) == 3
  manifest = extract.write_manifest(source, str(out), **kw)
  assert manifest['num_images'] == 19 and manifest['skipped'] == 1 and manifest['shards'] == 3
  assert len(lines) == 3 and 'images/s' in lines[0]
  shards = [np.load(out / extract.shard_name(k, 3)) for k in range(3)]
  index = np.concatenate([s['index'] for s in shards])
  assert list(index) == [i for i in range(20) if i != 5]
  want = encoder(np.stack([fmnist.images[i][..., None].repeat(3, -1) for i in index]))
  np.testing.assert_allclose(np.concatenate([s['global_repr'] for s in shards]),
                             want['global_repr'], atol=1e-5)
  np.testing.assert_array_equal(np.concatenate([s['label'] for s in shards]),
                                fmnist.labels[index])
  # A killed run left shard 1 unwritten: the rerun writes only that one, the same bytes.
  before = {k: (out / extract.shard_name(k, 3)).read_bytes() for k in range(3)}
  (out / extract.shard_name(1, 3)).unlink()
  lines.clear()
  extract.extract(encoder, source, str(out), batch_size=8, log=lines.append, **kw)
  assert len(lines) == 1 and lines[0].startswith('[extract] shard 2/3')
  assert {k: (out / extract.shard_name(k, 3)).read_bytes() for k in range(3)} == before
  # The command as 2 processes of 1 device: shards 0 and 2 from process 0, 1 from process 1,
  # the manifest from process 0 once both are done; batches of 3 (uneven, padded) give the
  # same features.
  two = tmp_path / 'features_2proc'
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
  done = subprocess.run(
      [sys.executable, str(ROOT / 'launch' / 'local_multiprocess.py'), '--num_processes=2',
       '--devices_per_process=1', '--', sys.executable, '-m', 'capi_jax.extract',
       f'--checkpoint={run}', f'--dataset={pattern}', f'--output={two}', '--resolution=28',
       '--shard_size=8', '--batch_size=3', '--outputs=global_repr'],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
  assert done.returncode == 0, done.stdout + done.stderr
  written = sorted(re.findall(r'shard (\d)/3 written', done.stdout))
  assert written == ['1', '2', '3'], done.stdout
  assert json.loads((two / 'manifest.json').read_text()) == json.loads(
      (out / 'manifest.json').read_text())
  for k in range(3):
    a, b = np.load(two / extract.shard_name(k, 3)), np.load(out / extract.shard_name(k, 3))
    np.testing.assert_array_equal(a['index'], b['index'])
    np.testing.assert_allclose(a['global_repr'], b['global_repr'], atol=1e-5)


def test_commands_hide_library_info_logs_unless_asked():
  before = absl_logging.get_verbosity()
  try:
    absl_logging.set_verbosity(absl_logging.INFO)
    cli.quiet_libraries()  # What every command does first (cli.run).
    assert absl_logging.get_verbosity() == absl_logging.WARNING
    assert logging.getLogger('capi_jax').getEffectiveLevel() == logging.INFO
  finally:
    absl_logging.set_verbosity(before)


@pytest.mark.parametrize('which', ['mae', 'clip'])
def test_load_official_files_of_other_methods(which, tmp_path):
  """An MAE file with a MIM-Refiner config, OpenAI CLIP's with a CAE v2 one (CLIP statistics)."""
  if which == 'mae':
    config, family, prefix, name = _mimref_mae_config(), 'mae', '', 'mae.pth'
    module = evaluation.eval_method(config).encoder
  else:
    config, family, prefix, name = _caev2_clip_config(), 'clip', 'visual.', 'ViT-B-16.pt'
    module = evaluation.eval_method(config).teacher
  params = _random_tree(vit_weights.param_shapes(module), seed=3)
  path = _write(vit_weights.params_to_official(params, family, prefix), tmp_path / name)
  encoder = capi_jax.load(path, config=config)
  assert encoder.normalization == ('clip' if which == 'clip' else 'imagenet')
  out = encoder(np.zeros((2, 8, 8, 3), np.uint8))
  assert out['global_repr'].shape[0] == 2 and np.isfinite(out['global_repr']).all()
  with pytest.raises(capi_jax.UserError, match='pass config='):
    capi_jax.load(path)
