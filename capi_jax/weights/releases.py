"""The official releases by name: where each is published, how capi_jax reads it, a local cache.

`RELEASES` holds the files the official repositories publish (facebookresearch/capi `hubconf.py`,
ml-jku/MIM-Refiner `hubconf.py` / README), each with the config that describes its architecture
(a config module and dotted overrides). `fetch(name)` downloads a file once into the cache
(`$CAPI_JAX_CACHE/releases/`, default ~/.cache/capi_jax/releases/) and returns its path.

Checksums: the releases publish none, so the first download records the file's size and sha256
beside it (`<file>.json`); every later use checks the file against that record, and a file
that no longer matches (cut short, replaced) is an error naming it. Offline, or with the host
unreachable, the error says where to put the file (downloaded elsewhere). A mirror
(`$CAPI_JAX_RELEASES_MIRROR`, or `base_url=`) replaces each URL's folder, e.g. an internal
server, a local HTTP server in tests, or `file:///shared/weights/`.
"""

import dataclasses
import hashlib
import json
import os
import pathlib
import shutil
import tempfile
import urllib.error
import urllib.request
from typing import Any

from capi_jax.base import errors
from capi_jax.base import storage

MIRROR_ENV = 'CAPI_JAX_RELEASES_MIRROR'
_CAPI = 'https://dl.fbaipublicfiles.com/capi/'
_MIMREF = 'https://ml.jku.at/research/mimrefiner/download/'


@dataclasses.dataclass(frozen=True)
class Release:
  """An official file and the capi_jax config that reads it.

  Attributes:
    url: where the release is published.
    config: the config module describing its architecture (e.g. 'configs.vitl').
    config_arg: the argument of the module's get_config, if any.
    vit: for a MIM-Refiner hub model, the encoder it holds: its `vit.FAMILIES` name
      (kappamodules' PrenormVit 'kappamodules', PostnormVit 'data2vec2') and sizes, which
      replace the recipe's `mim_refiner.encoder` / `mim_refiner.model` (the recipes start from
      the unrefined MAE / data2vec 2.0 files).
  """
  url: str
  config: str
  config_arg: str = ''
  vit: dict[str, Any] | None = None

  @property
  def file_name(self) -> str:
    return self.url.rsplit('/', 1)[1]


def _refined(file: str, recipe: str, family: str, patch: int, dim: int, depth: int,
             heads: int) -> Release:
  return Release(_MIMREF + file, f'configs.mim_refiner.{recipe}', config_arg='3',
                 vit=dict(family=family, patch_size=patch, embed_dim=dim, depth=depth,
                          num_heads=heads))


RELEASES: dict[str, Release] = {
    # facebookresearch/capi hubconf.py (the in22k entry's file is named i22k there).
    'capi_vitl14_lvd': Release(_CAPI + 'capi_vitl14_lvd.pth', 'configs.vitl'),
    'capi_vitl14_p205': Release(_CAPI + 'capi_vitl14_p205.pth', 'configs.vitl'),
    'capi_vitl14_in22k': Release(_CAPI + 'capi_vitl14_i22k.pth', 'configs.vitl'),
    'capi_vitl14_in1k': Release(_CAPI + 'capi_vitl14_in1k.pth', 'configs.vitl'),
    # ml-jku/MIM-Refiner hubconf.py (VIT_CONFIGS l16 / h14; twob14 has no capi_jax recipe).
    'mae_refined_l16': _refined('maerefined_l16.th', 'mae_l16', 'kappamodules', 16, 1024, 24, 16),
    'dbot_refined_l16': _refined('dbotrefined_l16.th', 'mae_l16', 'kappamodules', 16, 1024, 24,
                                 16),
    'crossmae_refined_l16': _refined('crossmaerefined_l16.th', 'mae_l16', 'kappamodules', 16,
                                     1024, 24, 16),
    'd2v2_refined_l16': _refined('d2v2refined_l16.th', 'd2v2_l16', 'data2vec2', 16, 1024, 24, 16),
    'mae_refined_h14': _refined('maerefined_h14.th', 'mae_h14', 'kappamodules', 14, 1280, 32, 16),
    'dbot_refined_h14': _refined('dbotrefined_h14.th', 'mae_h14', 'kappamodules', 14, 1280, 32,
                                 16),
    'd2v2_refined_h14': _refined('d2v2refined_h14.th', 'd2v2_h14', 'data2vec2', 14, 1280, 32, 16),
}


class ReleaseError(errors.UserError, OSError):
  """A named release cannot be fetched or fails its recorded checksum."""


def cache_dir() -> pathlib.Path:
  """The downloaded releases' folder (local: urllib writes there): storage.cache_dir's."""
  return pathlib.Path(storage.cache_dir('releases'))


def _sha256(path: pathlib.Path) -> str:
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 20), b''):
      digest.update(block)
  return digest.hexdigest()


def _checked(path: pathlib.Path) -> pathlib.Path:
  """`path` if it matches the size and sha256 recorded at its download (recorded now if the
  file was put there by hand)."""
  record_path = path.with_name(path.name + '.json')
  size, sha = path.stat().st_size, _sha256(path)
  if not record_path.exists():
    record_path.write_text(json.dumps({'size': size, 'sha256': sha}))
    return path
  record = json.loads(record_path.read_text())
  if (size, sha) != (record['size'], record['sha256']):
    raise ReleaseError(f'{path} ({size} bytes, sha256 {sha[:12]}...) differs from the file '
                       f'first downloaded there ({record["size"]} bytes, sha256 '
                       f'{record["sha256"][:12]}...): delete both {path.name} and '
                       f'{record_path.name} to download it again.')
  return path


def url_of(name: str, base_url: str | None = None) -> str:
  """The release's URL, its folder replaced by `base_url` or $CAPI_JAX_RELEASES_MIRROR."""
  release = RELEASES[name]
  mirror = base_url or os.environ.get(MIRROR_ENV)
  return mirror.rstrip('/') + '/' + release.file_name if mirror else release.url


def fetch(name: str, base_url: str | None = None, timeout_s: float = 60) -> pathlib.Path:
  """The cached file of release `name`, downloaded on first use (see the module docstring)."""
  if name not in RELEASES:
    raise ReleaseError(f'No release named {name!r}; known: {", ".join(sorted(RELEASES))}.')
  target = cache_dir() / RELEASES[name].file_name
  if target.exists():
    return _checked(target)
  url = url_of(name, base_url)
  target.parent.mkdir(parents=True, exist_ok=True)
  fd, partial = tempfile.mkstemp(dir=target.parent, prefix=f'.{target.name}.')
  try:
    with os.fdopen(fd, 'wb') as out, urllib.request.urlopen(url, timeout=timeout_s) as response:
      shutil.copyfileobj(response, out, 1 << 20)
      expected = response.headers.get('Content-Length')
    if expected is not None and os.path.getsize(partial) != int(expected):
      raise OSError(f'got {os.path.getsize(partial)} of {expected} bytes')
    os.replace(partial, target)  # Whole or absent: a cut download never lands in the cache.
  except (urllib.error.URLError, OSError, ValueError) as e:
    reason = getattr(e, 'reason', e)
    raise ReleaseError(
        f'Cannot download release {name!r} from {url} ({reason}). Offline: download it '
        f'elsewhere (e.g. `curl -o {target.name} {RELEASES[name].url}`) and put it at {target} '
        f'(or set ${storage.CACHE_ENV} to the folder above its releases/, or ${MIRROR_ENV} to '
        'a server that has it).'
    ) from e
  finally:
    if os.path.exists(partial):
      os.remove(partial)
  return _checked(target)
