r"""Hugging Face datasets as a random-access source (`hf:`), through the `datasets` library.

  hf:NAME_OR_PATH[?key=value&...]      e.g. hf:/data/fmnist_saved, hf:ORG/NAME?split=train
  hf://ORG/NAME?split='train'&img_field='jpg'&tgt_field='cls'   (the official CAPI strings)

NAME_OR_PATH is a folder written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk` (read with
`load_from_disk`), or anything `datasets.load_dataset` takes: a builder with local files
(`hf:parquet?data_files='DIR/*.parquet'`, `hf:imagefolder?data_dir=DIR`), a dataset in the local
cache, or a hub dataset when online (`HF_DATASETS_OFFLINE=1` / `HF_HUB_OFFLINE=1` keep the
library off the network). Values are Python literals as in the official strings (`'train'`,
`True`) or bare words. Keys read here: `split` (default: the config's split), `img_field`
(default: the first Image column, else 'image'), `tgt_field` / `label_field` (default: 'label'
when present); every other key goes to `load_dataset` (`data_files`, `cache_dir`, `name`, ...).

The dataset is read map-style (Arrow files, memory-mapped), so the pipeline's guarantees hold
(per-record determinism, exact resume, each host its slice); `streaming=True` has no random
access and is refused with the alternatives. Images stay encoded until `sources.decode` (a bad
one is skipped and counted); labels are ints (-1 without a label column).
"""

import ast
import os
from typing import Any
from urllib import parse

from capi_jax.base import errors

_OURS = ('split', 'img_field', 'tgt_field', 'label_field')


class HfDatasetError(errors.UserError, ValueError):
  """An `hf:` dataset cannot be read (library missing, unknown column, streaming, ...)."""


def _value(text: str) -> Any:
  """A query value: a Python literal ('train', True, 3), else the bare text."""
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
  """'//ORG/NAME?split=\'train\'&x=1' or 'PATH?...' -> (name or path, {key: value})."""
  name, _, query = spec.removeprefix('//').partition('?')
  return name, {k: _value(v) for k, v in parse.parse_qsl(query, keep_blank_values=True)}


def _datasets():
  try:
    import datasets  # pylint: disable=g-import-not-at-top  (an optional dependency)
  except ImportError as e:
    raise HfDatasetError('hf: datasets need the `datasets` library: pip install '
                         '"capi_jax[hf]".') from e
  return datasets


def _load(name: str, split: str, kwargs: dict[str, Any]):
  """The map-style `datasets.Dataset` of `split`."""
  datasets = _datasets()
  if kwargs.get('streaming'):
    raise HfDatasetError(
        f'hf:{name} with streaming=True has no random access, which exact resume and per-host '
        'slices need: drop streaming (the dataset is prepared once into the local cache), or '
        'read a WebDataset repository\'s tar shards directly with wds:PATTERN.')
  if os.path.isdir(name) and (os.path.exists(os.path.join(name, 'dataset_dict.json'))
                              or os.path.exists(os.path.join(name, 'dataset_info.json'))):
    loaded = datasets.load_from_disk(name)
  else:
    try:
      loaded = datasets.load_dataset(name, split=split, **kwargs)
    except (FileNotFoundError, ValueError, ConnectionError, OSError) as e:
      reason = ' '.join(str(e).strip().splitlines()[:2])
      raise HfDatasetError(
          f'Cannot load hf:{name} split {split!r}: {type(e).__name__}: {reason}. Offline, pass '
          'local files (hf:parquet?data_files=\'DIR/*.parquet\', hf:imagefolder?data_dir=DIR), '
          'a save_to_disk folder, or a dataset already in the local cache.') from e
  if isinstance(loaded, datasets.DatasetDict):
    if split not in loaded:
      raise HfDatasetError(f'hf:{name} has splits {sorted(loaded)}, not {split!r}.')
    loaded = loaded[split]
  return loaded


class HfSource:
  """Records of a Hugging Face `datasets.Dataset` (see the module docstring)."""

  def __init__(self, spec: str, split: str):
    datasets = _datasets()
    name, options = parse_spec(spec)
    split = options.get('split', split)
    kwargs = {k: v for k, v in options.items() if k not in _OURS}
    ds = _load(name, split, kwargs)
    features = ds.features
    image_columns = [k for k, f in features.items() if isinstance(f, datasets.Image)]
    self.image_key = options.get('img_field') or (image_columns[0] if image_columns else 'image')
    if self.image_key not in features:
      raise HfDatasetError(f'hf:{name} has no column {self.image_key!r} (columns: '
                           f'{list(features)}): set img_field=<the image column>.')
    label = options.get('tgt_field') or options.get('label_field')
    self.label_key = label or ('label' if 'label' in features else None)
    if self.label_key is not None and self.label_key not in features:
      raise HfDatasetError(f'hf:{name} has no column {self.label_key!r} (columns: '
                           f'{list(features)}).')
    if isinstance(features[self.image_key], datasets.Image):
      # Encoded bytes, decoded (and counted when bad) by `sources.decode`, not by the library.
      ds = ds.cast_column(self.image_key, datasets.Image(decode=False))
    columns = [self.image_key] + ([self.label_key] if self.label_key else [])
    self._ds = ds.select_columns(columns)
    label_feature = features.get(self.label_key) if self.label_key else None
    self.class_names = (list(label_feature.names)
                        if isinstance(label_feature, datasets.ClassLabel) else [])
    self.num_classes = len(self.class_names)
    self._name = name
    self.description = f'hf:{name} split {split!r} ({len(self)} images)'

  def __len__(self) -> int:
    return len(self._ds)

  def __getitem__(self, index: int) -> dict[str, Any]:
    row = self._ds[int(index)]
    image = row[self.image_key]
    if isinstance(image, dict):  # datasets.Image(decode=False): {'bytes', 'path'}.
      image = image.get('bytes') or _read(image.get('path'))
    label = row[self.label_key] if self.label_key else -1
    return {'image': image, 'label': int(label) if label is not None else -1,
            'name': f'hf:{self._name}[{index}]'}


def _read(path: str | None) -> bytes | Exception:
  """The bytes of an image the dataset stores by path (an unreadable one is a bad record)."""
  try:
    with open(path, 'rb') as f:
      return f.read()
  except (OSError, TypeError) as e:
    return e
