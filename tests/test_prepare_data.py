"""prepare_data: image folders -> resized ArrayRecord TFDS datasets the training loader reads."""

import io
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from capi_jax import methods
from capi_jax import prepare_data
from capi_jax.data import pipeline
from capi_jax.data import sources
from configs import tiny
from test_input_pipeline import _write_bad_data_folder

_ROOT = pathlib.Path(__file__).parent.parent


def _records(source) -> list[sources.Record]:
  return [source[i] for i in range(len(source))]


def test_odd_folder_to_array_record_and_back_through_the_training_loader(tmp_path):
  folder, out = tmp_path / 'images', tmp_path / 'tfds'
  good, bad = _write_bad_data_folder(folder)
  # The command line, with encoding worker processes and a fixed shard count.
  run = subprocess.run(
      [sys.executable, '-m', 'capi_jax.prepare_data', f'--input=folder:{folder}',
       f'--output={out}', '--name=odd_images', '--resize=24', '--quality=90', '--shards=2',
       '--workers=2'], cwd=_ROOT, capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stderr
  assert f'--config.data.dataset=tfds:odd_images --config.data.data_dir={out}' in run.stdout

  version_dir = out / 'odd_images' / prepare_data.VERSION
  assert len(list(version_dir.glob('odd_images-train.array_record-*-of-00002'))) == 2
  metadata = json.loads((version_dir / 'metadata.json').read_text())
  assert metadata == {'input': f'folder:{folder}', 'skipped': {'train': len(bad)},
                      'resize': 24, 'quality': 90}
  assert sorted(p.name for p in out.iterdir()) == ['odd_images']  # No downloads/, no leftovers.

  # Every good file, in the folder's order, labels and class names kept; bad files skipped.
  original = sources.make_source(f'folder:{folder}', 'train')
  prepared = sources.make_source('tfds:odd_images', 'train', str(out))
  assert prepared.class_names == original.class_names == ['a', 'b']
  kept = [r for r in _records(original)
          if pathlib.Path(r['name']).relative_to(folder).as_posix() in good]
  assert len(kept) == len(good) == len(prepared)
  for record, prepared_record in zip(kept, _records(prepared)):
    assert prepared_record['label'] == record['label']
    image, resized = sources.decode(record)['image'], sources.decode(prepared_record)['image']
    # The shorter side shrinks to 24 (torchvision's rounding of the longer one), never grows.
    short, long = sorted(image.size)
    assert sorted(resized.size) == ([short, long] if short <= 24 else [24, int(24 * long / short)])
  assert Image.open(io.BytesIO(prepared[0]['image'])).format == 'JPEG'

  # Read by the training loader: uint8 crops with CAPI's masks.
  config = tiny.get_config()
  config.data.dataset, config.data.data_dir = 'tfds:odd_images', str(out)
  config.data.image_size, config.capi.model.patch_size = 16, 4
  config.train.global_batch_size, config.data.num_workers = 4, 0
  loader = pipeline.create_train_loader(config, methods.from_config(config).train_transform(),
                                        seed=0, process_index=0, process_count=1)
  batch = next(loader)
  assert batch['images'].shape == (4, 16, 16, 3) and batch['images'].dtype == np.uint8

  with pytest.raises(FileExistsError, match='already exists; delete it'):
    prepare_data.prepare(f'folder:{folder}', ['train'], str(out), 'odd_images',
                         prepare_data.Encoding(resize=24, quality=90))


def test_without_resize_the_original_bytes_are_kept_for_every_split(tmp_path):
  folder = tmp_path / 'images'
  rng = np.random.default_rng(0)
  for split, n in (('train', 3), ('val', 2)):
    for cls in ('cat', 'dog'):
      (folder / split / cls).mkdir(parents=True)
      for i in range(n):
        pixels = rng.integers(0, 256, (9 + i, 7, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / split / cls / f'{i}.png')
  result = prepare_data.prepare(f'folder:{folder}', ['train', 'val'], str(tmp_path / 'tfds'),
                                'pets', prepare_data.Encoding(resize=0, quality=90))
  assert result['num_examples'] == {'train': 6, 'val': 4}
  assert result['skipped'] == {'train': 0, 'val': 0}
  for split in ('train', 'val'):
    original = sources.make_source(f'folder:{folder}', split)
    prepared = sources.make_source('tfds:pets', split, str(tmp_path / 'tfds'))
    assert prepared.class_names == ['cat', 'dog']
    for record, prepared_record in zip(_records(original), _records(prepared), strict=True):
      assert prepared_record['image'] == record['image']  # The PNG bytes, untouched.
      assert prepared_record['label'] == record['label']


def test_a_failed_conversion_leaves_no_dataset(tmp_path, monkeypatch):
  folder, out = tmp_path / 'images', tmp_path / 'tfds'
  folder.mkdir()
  for i in range(6):
    Image.fromarray(np.full((8, 8, 3), i * 40, np.uint8)).save(folder / f'{i}.png')
  real_encode = prepare_data.encode
  calls = []

  def encode_then_die(record, encoding):  # Fault injection: the conversion dies half-way.
    calls.append(record['name'])
    if len(calls) == 4:
      raise KeyboardInterrupt
    return real_encode(record, encoding)

  monkeypatch.setattr(prepare_data, 'encode', encode_then_die)
  encoding = prepare_data.Encoding(resize=0, quality=90)
  with pytest.raises(KeyboardInterrupt):
    prepare_data.prepare(f'folder:{folder}', ['train'], str(out), 'flat', encoding)
  assert not (out / 'flat' / prepare_data.VERSION).exists()
  with pytest.raises(FileNotFoundError, match="no dataset named 'flat'"):
    sources.make_source('tfds:flat', 'train', str(out))

  monkeypatch.setattr(prepare_data, 'encode', real_encode)
  result = prepare_data.prepare(f'folder:{folder}', ['train'], str(out), 'flat', encoding)
  assert result['num_examples'] == {'train': 6}
  prepared = sources.make_source('tfds:flat', 'train', str(out))
  assert prepared.class_names == [] and prepared[0]['label'] == -1  # An unlabelled folder.

  with pytest.raises(ValueError, match='not a TFDS dataset name'):
    prepare_data.prepare(f'folder:{folder}', ['train'], str(out), 'Flat-2', encoding)


def test_a_file_name_that_is_not_utf8_is_converted_and_refusals_are_one_line(tmp_path):
  """Issue 23 items 9 and 15: one Latin-1 file name aborted the whole conversion
  (UnicodeEncodeError); a bad --name or an existing output printed a traceback."""
  folder = tmp_path / 'images'
  folder.mkdir()
  for i, name in enumerate((b'caf\xe9.png', b'plain.png')):
    Image.fromarray(np.full((8, 8, 3), 60 * i, np.uint8)).save(
        os.path.join(os.fsencode(folder), name), format='PNG')
  out = tmp_path / 'tfds'
  result = prepare_data.prepare(f'folder:{folder}', ['train'], str(out), 'latin',
                                prepare_data.Encoding(resize=0, quality=90))
  assert result['num_examples'] == {'train': 2} and result['skipped'] == {'train': 0}
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  examples = tfds.data_source('latin', split='train', data_dir=str(out), download=False)
  names = [examples[i]['file_name'] for i in range(len(examples))]
  names = [n.decode() if isinstance(n, bytes) else n for n in names]
  assert sorted(n.rsplit('/', 1)[-1] for n in names) == ['caf\\xe9.png', 'plain.png']
  for name, words in (('Bad-Name', 'is not a TFDS dataset name'), ('latin', 'already exists')):
    run = subprocess.run(
        [sys.executable, '-m', 'capi_jax.prepare_data', f'--input=folder:{folder}',
         f'--output={out}', f'--name={name}', '--workers=1'],
        capture_output=True, text=True, timeout=300, cwd=pathlib.Path(__file__).parents[1])
    assert run.returncode == 1 and words in run.stderr, run.stderr
    assert 'Traceback' not in run.stderr, run.stderr
