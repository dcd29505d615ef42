"""Hugging Face datasets (`hf:`) through the `datasets` library, from local files only.

The checks run in one child process inside `unshare -n` (a network namespace with loopback
only: the library may probe the hub) with HF_DATASETS_OFFLINE=1 / HF_HUB_OFFLINE=1 and its
cache in tmp_path. Run as a script (`python tests/test_hf.py DIR`), this file is that child.
Skipped without the `datasets` library (`pip install "capi_jax[hf]"`) or without `unshare`.
"""

import importlib.util
import io
import os
import pathlib
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
N = 40


def _unshare_works() -> bool:
  try:
    return subprocess.run(['unshare', '-n', 'true'], capture_output=True).returncode == 0
  except FileNotFoundError:
    return False


def test_hf_sources_offline(tmp_path):
  if importlib.util.find_spec('datasets') is None:
    pytest.skip('the `datasets` library is not installed (pip install "capi_jax[hf]")')
  if not _unshare_works():
    pytest.skip('`unshare -n` is unavailable (needs root): the checks must not reach a network')
  env = {**os.environ, 'HF_DATASETS_OFFLINE': '1', 'HF_HUB_OFFLINE': '1',
         'HF_HOME': str(tmp_path / 'hf_home'), 'JAX_PLATFORMS': 'cpu',
         'PYTHONPATH': os.pathsep.join([str(ROOT), str(ROOT / 'tests'),
                                        os.environ.get('PYTHONPATH', '')])}
  result = subprocess.run(['unshare', '-n', sys.executable, __file__, str(tmp_path)], env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  assert 'hf checks passed' in result.stdout


def _png(pixels: np.ndarray) -> bytes:
  out = io.BytesIO()
  Image.fromarray(pixels).save(out, format='PNG')
  return out.getvalue()


def _checks(root: pathlib.Path) -> None:
  """Every `hf:` form on a 40-image Fashion-MNIST dataset (train 0-29, test 30-39)."""
  import datasets  # pylint: disable=g-import-not-at-top
  from capi_jax.data import hf  # pylint: disable=g-import-not-at-top
  from capi_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from capi_jax.data import sources  # pylint: disable=g-import-not-at-top
  import test_wds  # pylint: disable=g-import-not-at-top
  keep = test_wds._Keep  # pylint: disable=protected-access

  fmnist = sources.make_source('fashion_mnist', 'test')
  images, labels = fmnist.images[:N], fmnist.labels[:N]
  features = datasets.Features({'image': datasets.Image(),
                                'label': datasets.ClassLabel(names=fmnist.class_names)})
  rows = lambda s: {'image': [{'bytes': _png(x), 'path': None} for x in images[s]],
                    'label': [int(y) for y in labels[s]]}
  splits = datasets.DatasetDict({
      'train': datasets.Dataset.from_dict(rows(slice(0, 30)), features=features),
      'test': datasets.Dataset.from_dict(rows(slice(30, N)), features=features)})
  splits.save_to_disk(str(root / 'saved'))
  (root / 'pq').mkdir()
  splits['train'].to_parquet(str(root / 'pq' / 'train-00000.parquet'))

  def same_as_fmnist(source, first):
    assert len(source) == (30 if first == 0 else 10), source.description
    for i in (0, len(source) - 1):
      record = sources.decode(source[i])
      np.testing.assert_array_equal(np.asarray(record['image'])[..., 0], images[first + i])
      assert record['label'] == labels[first + i]

  saved = sources.make_source(f'hf:{root}/saved', 'train')
  same_as_fmnist(saved, 0)
  assert saved.class_names == list(fmnist.class_names)
  same_as_fmnist(sources.make_source(f'hf:{root}/saved', 'test'), 30)
  # The official form: hf://<name>?key=<Python literal>; the string's split wins.
  official = f"hf://{root}/saved?split='test'&img_field='image'&tgt_field='label'"
  same_as_fmnist(sources.make_source(official, 'train'), 30)
  parquet = (f"hf:parquet?data_files='{root}/pq/*.parquet'&cache_dir='{root}/cache'")
  same_as_fmnist(sources.make_source(parquet, 'train'), 0)
  for bad, message in ((f'hf:{root}/saved?streaming=True', 'no random access'),
                       (f"hf:{root}/saved?img_field='jpg'", 'no column'),
                       (f'hf:{root}/saved', 'not \'validation\'')):
    try:
      sources.make_source(bad, 'validation' if 'validation' in message else 'train')
      raise AssertionError(f'{bad} should fail')
    except hf.HfDatasetError as e:
      assert message in str(e), (bad, e)

  # The training pipeline: each image once per epoch, an exact resume.
  config = test_wds._loader_config(root)  # pylint: disable=protected-access
  config.data.dataset = f'hf:{root}/saved'
  iterator = pipeline.create_train_loader(config, keep(), seed=0)
  epoch = [next(iterator) for _ in range(30 // 8)]
  indices = np.concatenate([b['index'] for b in epoch])
  assert len(set(indices)) == len(indices) == 24
  state = iterator.get_state()
  expected = [next(iterator)['index'] for _ in range(2)]
  resumed = pipeline.create_train_loader(config, keep(), seed=0)
  resumed.set_state(state)
  for want in expected:
    np.testing.assert_array_equal(next(resumed)['index'], want)
  print('hf checks passed')


if __name__ == '__main__':
  _checks(pathlib.Path(sys.argv[1]))
