"""Official CAE v2 student tensors <-> the method's params, both directions, bit for bit.

The release's `ContextAutoencoderViT.state_dict()` (the `model` of its pretraining checkpoints)
holds the encoder under `encoder.` (the ViT family 'caev2', `models/vit_weights.py`) and the
regressor and decoder under their own names (`mask_token`, `encoder_to_regresser*`,
`regresser.regressor_blocks.*`, `decoder.*`), which `RegressorDecoder` mirrors, mapped by
`capi_jax.rules.dotted_rule`. Two official tensors have no parameter here (`NOT_PARAMETERS`):
the frozen table `rd_pos_embed` (a constant, `regressor.sincos_table`) and `regresser.norm`,
which CAE v2 never applies. Every other missing, unexpected or misshaped tensor is a
`rules.CheckpointMismatchError` naming it with the expected and found shapes.
"""

from collections.abc import Mapping
import re
from typing import Any

from capi_jax.models import vit
from capi_jax.weights import rules
from capi_jax.weights import vit as vit_weights

Params = Any

ENCODER_FAMILY = 'caev2'
ENCODER_PREFIX = vit_weights.OFFICIAL_PREFIXES[ENCODER_FAMILY]
NOT_PARAMETERS = re.compile(r'^(rd_pos_embed|regresser\.norm\..*)$')


def regressor_to_flax(state_dict: Mapping[str, Any], expected: Params) -> Params:
  """Official tensors after the encoder -> `regressor.RegressorDecoder` params.

  Args:
    state_dict: `mask_token`, `encoder_to_regresser*`, `regresser.regressor_blocks.*`,
      `decoder.*` under their official names, without `NOT_PARAMETERS`.
    expected: the configured module's params tree (arrays or ShapeDtypeStructs).
  """
  return rules.to_flax(state_dict, expected, rules.dotted_rule, 'CAE v2 regressor/decoder',
                         fix='check the regressor width, depth and the output width C')


def regressor_to_official(params: Params) -> rules.StateDict:
  """`RegressorDecoder` params -> official names and layouts."""
  return rules.to_official(params, rules.dotted_rule)


def student_to_flax(state_dict: Mapping[str, Any], encoder: vit.ViT,
                    regressor_expected: Params) -> dict[str, Params]:
  """A whole official student state_dict -> {'encoder': ViT params, 'regressor': ...}.

  Args:
    state_dict: `ContextAutoencoderViT.state_dict()` names; `NOT_PARAMETERS` are skipped.
    encoder: the configured encoder (its fields must describe the checkpoint's).
    regressor_expected: the configured `RegressorDecoder`'s params tree.
  """
  encoder_sd = {k: v for k, v in state_dict.items() if k.startswith(ENCODER_PREFIX)}
  rest = {k: v for k, v in state_dict.items()
          if not k.startswith(ENCODER_PREFIX) and not NOT_PARAMETERS.match(k)}
  return {'encoder': vit_weights.official_to_params(encoder_sd, encoder, ENCODER_FAMILY,
                                                    prefix=ENCODER_PREFIX),
          'regressor': regressor_to_flax(rest, regressor_expected)}


def student_to_official(params: Mapping[str, Params]) -> rules.StateDict:
  """{'encoder', 'regressor'} params (or trees shaped like them, e.g. gradients) -> official
  names and layouts, without `NOT_PARAMETERS`."""
  return {**vit_weights.params_to_official(params['encoder'], ENCODER_FAMILY,
                                           prefix=ENCODER_PREFIX),
          **regressor_to_official(params['regressor'])}
