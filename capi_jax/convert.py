r"""Official checkpoints <-> capi_jax parameters, both directions, bit for bit.

CAPI (the default; `methods/capi/convert.py` says which names map where):
  # official -> capi_jax: writes OUT/params, an Orbax StandardCheckpointer checkpoint of
  # {'backbone': ..., ['head': ...], ['clustering_head': ...]} (capi_jax parameter trees).
  python -m capi_jax.convert --config=configs/vitl.py --to=capi_jax \
      --input=capi_vitl14_lvd.pth --output=/tmp/capi_vitl14_lvd
  # capi_jax -> official names (.npz, or .pth when PyTorch is installed).
  python -m capi_jax.convert --config=configs/vitl.py --to=official \
      --input=/tmp/capi_vitl14_lvd/params --output=/tmp/capi_vitl14_lvd.npz
  # A capi_jax training checkpoint (a step folder; --source=student_ema for the EMA) -> official.
  python -m capi_jax.convert --config=configs/tiny.py --to=official --source=student_ema \
      --input=/tmp/capi_tiny/checkpoints/1500 --output=/tmp/capi_tiny_ema.pth
Official-format files (`.pth`, or `.npz` with the same names) hold `backbone.<name>` (required),
`head.<name>` (student head) and `teacher_head.<name>` (clustering head); a full official
training checkpoint is read too (`--source` picks the student or its EMA). Reading `.pth` needs
PyTorch (the `capi_jax[torch]` extra); `.npz` does not. The architecture comes from
`config.capi.model`, the number of clusters from `config.capi`; any name or shape that does not
fit it is an error naming the parameter (never a silent skip), and so is a weight that is not
floating point or holds NaN/inf. A file that cannot be read is an error naming the file.

ViT families (`weights/vit.py`) convert with `--family`, the ViT's fields read from the config
section `--section` (default: the config's method's `model`, e.g. `caev2.model`), e.g. OpenAI
CLIP's ViT-B/16 (CAE v2's teacher) and back:
  python -m capi_jax.convert --config=configs/caev2/base.py --family=clip \
      --section=caev2.teacher.model --to=capi_jax --input=ViT-B-16.pt --output=/tmp/clip_b16
  python -m capi_jax.convert --config=configs/caev2/base.py --family=clip \
      --section=caev2.teacher.model --to=official --input=/tmp/clip_b16 --output=/tmp/clip.pth
The official side holds the ViT under `vit_weights.OFFICIAL_PREFIXES[family]` (CLIP: `visual.`;
the rest of OpenAI's file, the text tower, is not read); the capi_jax side is a params
directory with the ViT as 'backbone' (also a capi_jax training run: its evaluation backbone).
A params directory does not record the MLP activation (OpenAI's QuickGELU or open_clip / LAION's
GELU, same names): whoever loads it sets it (`caev2.teacher.model.activation`); a TorchScript
archive whose modules contradict the section's activation is refused here.
"""

from absl import flags
import ml_collections
from ml_collections import config_flags

from capi_jax.base import cli
from capi_jax.base import errors
from capi_jax.engine import checkpointing
from capi_jax.engine import pretrained
from capi_jax.methods.capi import convert as capi_convert
from capi_jax.models import vit
from capi_jax.weights import files
from capi_jax.weights import vit as vit_weights


def _config_section(cfg: ml_collections.ConfigDict, section: str) -> ml_collections.ConfigDict:
  """`cfg`'s section at a dotted path, e.g. 'caev2.teacher.model'."""
  node = cfg
  for key in section.split('.'):
    if key not in node:
      raise errors.UserError(f'The config has no section {section!r} (no {key!r} in it): pass '
                             '--section=<the dotted path of the ViT\'s fields>, e.g. '
                             'caev2.teacher.model.')
    node = node[key]
  return node


def _run_vit(cfg: ml_collections.ConfigDict, family: str, section: str, direction: str,
             source_path: str, output: str) -> None:
  """The command line's work for a ViT family (`weights/vit.py`): its official file (names
  under `vit_weights.OFFICIAL_PREFIXES[family]`, e.g. OpenAI CLIP's `.pt`) <-> the 'backbone'
  of a capi_jax params directory."""
  section = section or f'{cfg.method}.model'
  fields = _config_section(cfg, section)
  activation = fields.get('activation', vit_weights.FROM_FILE)
  model = vit.from_config(fields, cfg.efficiency,
                          activation=vit_weights.built_activation(activation, family))
  prefix = vit_weights.OFFICIAL_PREFIXES[family]
  if direction == 'capi_jax':
    state_dict = files.read_state_dict(source_path)
    # The parameters do not depend on it: only an archive that contradicts the section's
    # activation is refused (the output does not record it; whoever loads it sets the key).
    vit_weights.check_activation(state_dict, model, activation, f'{section}.activation',
                                 source_path, prefix, required=False)
    params = vit_weights.official_to_params(state_dict, model, family, prefix)
    target = files.save_params({'backbone': params}, output)
    print(f'Wrote the {family} ViT ({prefix}*) as backbone to {target}')
    return
  # A params directory, or a capi_jax training run of any method (its evaluation backbone).
  params = pretrained.load(source_path).backbone
  if params is None:
    raise errors.UserError(f'{source_path} is an official file already; --to=official reads a '
                           'capi_jax params directory or training run.')
  sd = vit_weights.params_to_official(params, family, prefix)
  vit_weights.official_to_params(sd, model, family, prefix)  # Fails unless it fits `section`.
  files.write_state_dict(sd, output)
  print(f'Wrote the {family} ViT under official names ({prefix}*) to {output}')


def _run(cfg: ml_collections.ConfigDict, direction: str, source_path: str, output: str,
         source: str) -> None:
  """The command line's work: one CAPI conversion in `direction` ('capi_jax' or 'official')."""
  if direction == 'capi_jax':
    parts = capi_convert.load_official(source_path, cfg, source=source)
    target = files.save_params(parts, output)
    print(f'Wrote {sorted(parts)} to {target}')
    return
  found = checkpointing.find_checkpoint(source_path)
  if found.kind == 'training':
    run = pretrained.restore_run(found.path, cfg)
    parts = capi_convert.parts_from_variables(run.variables, source)
  else:
    parts = files.restore_params(found.path)
    capi_convert.check_restored_architecture(parts, cfg)
  capi_convert.export_official(parts, output)
  print(f'Wrote {sorted(parts)} under official names to {output}')


def main() -> None:
  config = config_flags.DEFINE_config_file(
      'config', None, 'capi_jax config: architecture (capi.model) and clusters (capi).',
      lock_config=True)
  direction = flags.DEFINE_enum('to', None, ['capi_jax', 'official'], 'Conversion direction.')
  source_path = flags.DEFINE_string(
      'input', None, 'official .pth/.pt/.npz; or a capi_jax OUT/params directory or training '
      'checkpoint step folder (WORKDIR/checkpoints/<step>).')
  output = flags.DEFINE_string(
      'output', None, 'directory (to capi_jax) or .npz/.pth file (to official).')
  source = flags.DEFINE_enum('source', 'student', ['student', 'student_ema'],
                             'Which network of a full training checkpoint (official or '
                             'capi_jax) to read.')
  family = flags.DEFINE_enum(
      'family', '', ['', *vit_weights.FAMILIES],
      'Convert a ViT of this family (weights/vit.py; e.g. clip: OpenAI CLIP\'s visual tower, '
      'CAE v2\'s teacher) as the backbone, instead of a CAPI checkpoint.')
  section = flags.DEFINE_string(
      'section', '', 'With --family: the config section holding the ViT\'s fields (e.g. '
      'caev2.teacher.model); empty: the method\'s model section (<config.method>.model).')
  flags.mark_flags_as_required(['config', 'to', 'input', 'output'])

  def run(_):
    if family.value:
      _run_vit(config.value, family.value, section.value, direction.value, source_path.value,
               output.value)
    else:
      _run(config.value, direction.value, source_path.value, output.value, source.value)

  cli.run(run)


if __name__ == '__main__':
  main()
