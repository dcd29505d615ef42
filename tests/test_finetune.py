"""End-to-end fine-tuning's pieces: relative position bias, layer-decay groups, Mixup / CutMix,
RandAugment, RandomErasing. The parity with CAE v2's release is the `caev2_eval` fixture's
(tests/test_method_evals.py)."""

import importlib
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image
from PIL import ImageOps
import pytest

from capi_jax.base import optim
from capi_jax.data import augment
from capi_jax.engine import config_checks
from capi_jax.engine import train
from capi_jax.methods.finetune import method as ft_method
from capi_jax.methods.finetune import mixing
from capi_jax.methods.finetune import model as ft_model
from capi_jax.models import vit
from capi_jax.weights import files
from capi_jax.weights import vit as vit_weights
from configs.caev2 import finetune_fashion_mnist

TINY = dict(vit.FAMILIES['caev2'], patch_size=4, image_size=8, embed_dim=16, depth=2,
            num_heads=2)


def test_relative_position_index_of_a_2x2_grid():
  index = vit.relative_position_index(2, 2)
  n_rel = 3 * 3 + 3
  assert index.shape == (5, 5)
  assert index[0, 0] == n_rel - 1 and set(index[0, 1:]) == {n_rel - 3}
  assert set(index[1:, 0]) == {n_rel - 2}
  # Patch (0, 0) -> (1, 1) is offset (-1, -1): (0 * 3) + 0; the diagonal is offset (0, 0) = 4.
  assert index[1, 4] == 0 and index[4, 1] == 8 and set(np.diag(index)[1:]) == {4}


def test_zero_relative_position_bias_keeps_the_function():
  images = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
  plain, biased = vit.ViT(**TINY), vit.ViT(**TINY, rel_pos_bias=True)
  params = biased.init(jax.random.key(1), images)['params']
  table = params['blocks_1']['relative_position_bias_table']
  assert table.shape == (3 * 3 + 3, 2) and not np.any(table)
  without = {k: ({n: v for n, v in p.items() if n != 'relative_position_bias_table'}
                 if k.startswith('blocks_') else p) for k, p in params.items()}
  np.testing.assert_array_equal(plain.apply({'params': without}, images)[0],
                                biased.apply({'params': params}, images)[0])
  params['blocks_0']['relative_position_bias_table'] = jnp.ones_like(table).at[0].set(3.0)
  assert not np.allclose(plain.apply({'params': without}, images)[0],
                         biased.apply({'params': params}, images)[0])
  with pytest.raises(ValueError, match='rel_pos_bias'):
    biased.apply({'params': params}, jnp.zeros((1, 12, 12, 3)))


def test_layer_decay_groups():
  model = ft_model.Classifier(vit.ViT(**{**TINY, 'final_norm': False}, rel_pos_bias=True),
                              num_classes=3)
  params = model.init(jax.random.key(0), jnp.zeros((2, 8, 8, 3)))['params']
  assert params['head']['kernel'].shape == (16, 3) and not np.any(params['head']['bias'])
  assert float(jnp.max(jnp.abs(params['head']['kernel']))) <= 2 * 0.02 * 0.001
  groups = optim.group_tree(params, ft_model.group_rule(2, 0.5))
  by_path = {optim.path_name(p): g for p, g in jax.tree_util.tree_leaves_with_path(
      groups, is_leaf=lambda x: isinstance(x, optim.Group))}
  assert by_path['backbone/patch_embed/kernel'] == optim.Group(0.125, 1.0)
  assert by_path['backbone/cls_token'] == optim.Group(0.125, 0.0)
  assert by_path['backbone/pos_embed'].frozen
  assert by_path['backbone/blocks_0/attn/qkv/kernel'] == optim.Group(0.25, 1.0)
  assert by_path['backbone/blocks_1/relative_position_bias_table'] == optim.Group(0.5, 1.0)
  assert by_path['backbone/blocks_1/gamma_1'] == optim.Group(0.5, 0.0)
  assert by_path['fc_norm/scale'] == optim.Group(1.0, 0.0)
  assert by_path['head/kernel'] == optim.Group(1.0, 1.0)
  # Scanned blocks (depth, ...): one multiplier per block; decay decided per block.
  rule = ft_model.group_rule(2, 0.5)
  stacked = rule('backbone/blocks/attn/qkv/kernel', 3)
  np.testing.assert_array_equal(stacked.lr_mult, np.reshape([0.25, 0.5], (2, 1, 1)))
  assert stacked.wd_mult == 1.0 and rule('backbone/blocks/norm1/scale', 2).wd_mult == 0.0


def test_mixup_and_cutmix():
  images = jax.random.normal(jax.random.key(0), (4, 6, 6, 3))
  labels = jnp.asarray([0, 1, 2, 1])
  same, targets = mixing.mix(images, labels, mixing.params(1.0), 3, 0.1)
  np.testing.assert_array_equal(same, images)
  np.testing.assert_allclose(targets.sum(-1), 1.0, rtol=1e-6)
  assert float(targets[0, 0]) == pytest.approx(0.9 + 0.1 / 3)
  rng = np.random.default_rng(0)
  draws = [mixing.draw(rng, 6, 6, mixup_alpha=0.8, cutmix_alpha=1.0) for _ in range(40)]
  assert {bool(d.cutmix) for d in draws} == {True, False}
  cut = next(d for d in draws if d.cutmix and 0 < d.lam < 1)
  mixed, _ = mixing.mix(images, labels, cut, 3, 0.0)
  top, bottom, left, right = (int(v) for v in cut.box)
  np.testing.assert_array_equal(mixed[:, top:bottom, left:right],
                                images[::-1, top:bottom, left:right])
  assert float(cut.lam) == pytest.approx(1 - (bottom - top) * (right - left) / 36)
  only_mixup = mixing.draw(rng, 6, 6, mixup_alpha=0.2, cutmix_alpha=0.0)
  assert not only_mixup.cutmix and not np.any(only_mixup.box)


def test_rand_augment_and_erasing():
  image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (12, 12, 3), np.uint8))
  assert augment.level_args('solarize', 9.0) == (256 - 230,)
  assert augment.level_args('posterize', 9.0) == (1,)
  assert augment.level_args('rotate', 5.0, negate=True) == (-15.0,)
  assert augment.level_args('contrast', 10.0, negate=True) == pytest.approx((0.1,))
  for op in augment.INCREASING_OPS:
    for magnitude in (0.0, 9.0, 10.0):
      out = augment.rand_augment(image, [augment.OpDraw(op, True, magnitude, True)])
      assert out.size == image.size and out.mode == 'RGB'
  np.testing.assert_array_equal(augment.apply_op(image, 'posterize', (2,)),
                                ImageOps.posterize(image, 2))
  assert not np.any(augment.apply_op(image, 'posterize', (0,)))
  rng = np.random.default_rng(1)
  draws = [augment.draw_ops(rng) for _ in range(50)]
  assert all(len(d) == 2 for d in draws)
  applied = [op for d in draws for op in d if op.applied]
  assert 0.3 < len(applied) / 100 < 0.7 and all(0 <= op.magnitude <= 10 for op in applied)
  x = np.zeros((10, 10, 3), np.float32)
  boxes = [augment.erase_box(rng, 10, 10) for _ in range(200)]
  erased = [b for b in boxes if b is not None]
  assert 0.15 < len(erased) / len(boxes) < 0.35
  for top, left, h, w in erased:
    assert 0 <= top <= 10 - h and 0 <= left <= 10 - w and h < 10 and w < 10
  out = augment.random_erasing(x, np.random.default_rng(2), prob=1.0)
  assert out.shape == x.shape and np.any(out != 0)


def _folder(root, split: str, per_class: int) -> None:
  rng = np.random.default_rng(len(split))
  for label in range(3):
    (root / split / f'c{label}').mkdir(parents=True)
    for k in range(per_class):
      pixels = np.full((30, 32, 3), 60 * label, np.uint8) + rng.integers(0, 40, (30, 32, 3),
                                                                          np.uint8)
      Image.fromarray(pixels).save(root / split / f'c{label}' / f'{k}.png')


def test_finetune_run_starts_from_an_official_file_resumes_and_scores_every_image(tmp_path):
  _folder(tmp_path / 'data', 'train', 4)
  _folder(tmp_path / "data", "test", 3)  # 9 test images: the second batch of 8 is padded.
  config = finetune_fashion_mnist.get_config()
  config.data.dataset = f'folder:{tmp_path / "data"}'
  config.train.global_batch_size, config.evals.batch_size = 8, 8  # The tests see 8 devices.
  config.train.checkpointing.period, config.train.log_loss_every = 2, 1
  config.finetune.num_classes, config.finetune.optim.warmup_iters = 3, 1
  config.finetune.model.depth, config.finetune.model.embed_dim = 2, 24
  config.finetune.model.drop_path_rate = 0.1
  config.evals.finetune_top1.test = ml_collections.ConfigDict(dict(
      dataset=f'folder:{tmp_path / "data"}', split='test'))
  config.evals.finetune_top1.period = 0  # At the end only.
  # A CAE v2 pretraining file: the encoder under `encoder.*`, official names.
  config.init.checkpoint = 'set below'
  vit = ft_method.Finetune(config)._pretraining_vit()
  pre = vit.init(jax.random.key(1), jnp.zeros((1, 28, 28, 3)))['params']
  files.write_state_dict({f'encoder.{k}': np.asarray(v) for k, v in
                          vit_weights.params_to_official(pre, 'caev2').items()},
                         tmp_path / 'init.npz')
  config.init.checkpoint = str(tmp_path / 'init.npz')
  config.train.total_iters, config.evals.final = 2, False
  train.train_and_evaluate(config, tmp_path / 'run')
  config.train.total_iters, config.evals.final = 4, True  # Resumes from step 2.
  train.train_and_evaluate(config, tmp_path / 'run')
  steps = [json.loads(l)['step'] for l in (tmp_path / 'run' / 'metrics.jsonl').read_text()
           .splitlines()]
  assert steps == [0, 1, 2, 3]
  result = json.loads((tmp_path / 'run' / 'eval' / '4' / 'results.json').read_text())
  top1 = result['protocols']['finetune_top1']
  assert top1['details']['images'] == 9 and 0 <= top1['results']['top1'] <= 1


@pytest.mark.parametrize('name', ['finetune_base', 'finetune_large', 'finetune_fashion_mnist'])
def test_shipped_finetune_configs_are_valid(name):
  config = importlib.import_module(f'configs.caev2.{name}').get_config()
  assert any('init.checkpoint is empty' in p
             for p in config_checks.problems(config, device_count=8))
  config.init.checkpoint = '/runs/caev2_base'
  assert config_checks.problems(config, device_count=8) == []
  config.finetune.optim.layer_decay, config.finetune.model.final_norm = 1.5, True
  found = ' '.join(config_checks.problems(config, device_count=8))
  assert 'finetune.optim.layer_decay=1.5' in found and 'final_norm must be False' in found
