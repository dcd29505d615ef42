"""configs/family.py: the model family matches the shipped configs and the published sizes."""

import jax
import pytest

from capi_jax import methods
from configs import family
from configs import vitb
from configs import vith
from configs import vitl
from configs import vits


@pytest.mark.parametrize('name,module', [('vits', vits), ('vitb', vitb), ('vitl', vitl),
                                         ('vith', vith)])
def test_family_is_the_shipped_configs(name, module):
  assert family.capi(name).to_dict() == module.get_config().to_dict()


def test_7b_encoder_has_dinov3_size():
  """DINOv3's ViT-7B has 6716M parameters (its model card); ours, a GELU MLP of the same
  weights, 6711M (no biases or LayerScale, and a /14 patch embedding instead of /16)."""
  params = jax.eval_shape(methods.from_config(family.capi('vit7b')).init,
                          jax.random.PRNGKey(0)).params
  count = sum(x.size for x in jax.tree.leaves(params['backbone']['encoder']))
  assert 6.70e9 < count < 6.72e9, count
