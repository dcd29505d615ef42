"""MIM-Refiner's heads, queue, loss, optimisation and views against the official formulas.

The shipped fixture holds the official release's numbers (checked end to end by
`check_reference`); the other tests pin each piece to the official code's formulas, written
out here in numpy, and show that the parity suite reads every size from its fixture.
"""

import colorsys
import functools
import json
import pathlib
import pickle
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from PIL import ImageFilter

from capi_jax import check_reference
from capi_jax import methods
from capi_jax.base import interface
from capi_jax.base import optim as core_optim
from capi_jax.base import sharding
from capi_jax.data import pipeline
from capi_jax.data import transforms
from capi_jax.engine import config_checks
from capi_jax.engine import state as state_lib
from capi_jax.engine import step as step_lib
from capi_jax.methods.mim_refiner import augment
from capi_jax.methods.mim_refiner import encoder
from capi_jax.methods.mim_refiner import heads
from capi_jax.methods.mim_refiner import loss
from capi_jax.methods.mim_refiner import objective
from capi_jax.methods.mim_refiner import optim
from capi_jax.methods.mim_refiner import queue
from capi_jax.engine import pretrained
from capi_jax.models import encoder_decoder
from capi_jax.reference import harness
from capi_jax.reference import mim_refiner as parity
from capi_jax.weights import files
from capi_jax.weights import rules
from capi_jax.weights import vit as vit_weights
from configs.mim_refiner import base as base_config
from configs.mim_refiner import capi_vitl
from configs.mim_refiner import d2v2_h14
from configs.mim_refiner import d2v2_l16
from configs.mim_refiner import mae_h14
from configs.mim_refiner import mae_l16
from configs.mim_refiner import tiny

FIXTURE = 'tests/fixtures/mim_refiner_reference/mimref_small.npz'


# ---------------------------------------------------------------------------- parity suite
def test_shipped_fixture_passes(capsys):
  assert check_reference.main(['check_reference', FIXTURE]) == 0
  out = capsys.readouterr().out
  for quantity in ('head/main/act/projector.0', 'head/cls1/queue/topk_index',
                   'head/main/grad/*', 'head_f64/loss_total', 'schedule/l16_stage3_upe10',
                   'param_groups_stage3/encoder/lr_scale', 'freezer_demo',
                   'stage3/step1/lr/encoder', 'stage2/step0/queue/cls2/nn_index'):
    assert quantity in out
  for quantity in ('stage3/step1/loss/total', 'stage3/final/encoder.*', 'stage3/ema/encoder.*',
                   'stage2/final/heads.main.*', 'stage2 encoder after the updates'):
    assert quantity in out
  assert not [line for line in out.splitlines() if line.startswith('skipped:')]
  assert 'FAIL' not in out and out.rstrip().endswith('PASS')


def _random_head_state(head: heads.IdHead, in_dim: int, queue_size: int, batch_ids, seed: int
                       ) -> dict[str, np.ndarray]:
  """An official-format head state_dict with non-trivial BatchNorm and queue buffers (numpy
  random numbers: no compilation)."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(head.init, jax.random.key(0), jnp.zeros((2, in_dim)))
  draw = lambda path, s: np.float32(path[-1].key in ('scale', 'var')) + np.float32(
      0.3 * (np.abs if path[-1].key == 'var' else np.asarray)(rng.normal(size=s.shape)))
  params, stats = (jax.tree_util.tree_map_with_path(draw, shapes[c])
                   for c in ('params', 'batch_stats'))
  ids = np.full(queue_size, -1)
  ids[:2] = batch_ids[:2]  # some stored ids equal batch ids: exercises the exclusion
  q = queue.Queue(x=rng.normal(size=(queue_size, head.output_dim)).astype(np.float32), idx=ids,
                  labels=np.arange(queue_size) % 3, age=np.arange(queue_size),
                  ptr=np.array(queue_size - 2))
  return {**heads.to_official(params, stats), **queue.to_official(q)}


def _generated_part_a(batch=5, n_global=3, n_local=2, in_dim=7, topk=2, queue_size=8):
  """A part-A fixture in the official format with sizes unlike the shipped one; the numbers
  are capi_jax's own (the suite must read every size from it, not agree with the release)."""
  head = heads.IdHead(proj_hidden_dim=9, pred_hidden_dim=11, output_dim=6,
                      proj_hidden_layers=0, pred_hidden_layers=1)
  rng = np.random.default_rng(0)
  idx, cls = rng.permutation(50)[:batch], rng.integers(0, 3, batch)
  rows = (n_global + n_local) * batch
  arrays = {'head/idx': idx, 'head/cls': cls,
            'meta_json': np.array(json.dumps({'head': {'heads': ['a', 'b'], 'n_global': n_global,
                                                       'temperature': 0.3}}))}
  states, lookups = {}, {}
  for i, h in enumerate(('a', 'b')):
    sd = _random_head_state(head, in_dim, queue_size, idx, seed=i)
    arrays.update({f'head/{h}/init/{k}': v for k, v in sd.items()})
    arrays[f'head/{h}/input'] = rng.normal(size=(rows, in_dim)).astype(np.float32)
    arrays[f'head/{h}/queue/choice'] = rng.integers(0, topk, n_global * batch)
    states[h] = parity.HeadState.from_official(sd, in_dim)
    lookups[h] = parity.Lookup(topk, arrays[f'head/{h}/queue/choice'])
  run = parity.run_heads(states, {h: arrays[f'head/{h}/input'] for h in states}, idx, cls,
                         lookups, n_global, 0.3)
  for h, out in run.outputs.items():
    arrays.update({
        f'head/{h}/projected_preswap': np.asarray(out.anchors),
        f'head/{h}/projected_postswap': np.asarray(out.lookup.neighbours),
        f'head/{h}/predicted': np.asarray(out.predicted),
        f'head/{h}/queue/topk_index': np.asarray(out.lookup.topk_index),
        f'head/{h}/queue/nn_index': np.asarray(out.lookup.nn_index),
        f'head/{h}/input_grad': run.input_grads[h],
        f'head_f64/{h}/input_grad': run.input_grads[h]})
    for prefix in ('head', 'head_f64'):
      arrays.update({f'{prefix}/{h}/loss/{k}': np.float64(v) for k, v in run.losses[h].items()
                     if 'loss' in k or k == 'total'})
      arrays.update({f'{prefix}/{h}/info/{k}': np.float64(v) for k, v in run.losses[h].items()
                     if 'alignment' in k})
      arrays.update({f'{prefix}/{h}/grad/{k}': v for k, v in run.param_grads[h].items()})
    arrays.update({f'head/{h}/metric/{k}': np.float64(v) for k, v in out.lookup.metrics.items()})
    arrays.update({f'head/{h}/act/{k}': v
                   for k, v in parity.layer_outputs(states[h], arrays[f'head/{h}/input']).items()})
    arrays.update({f'head/{h}/after/{k}': v
                   for k, v in {**run.stats_after[h], **run.queue_after[h]}.items()})
  arrays['head/loss_total'] = arrays['head_f64/loss_total'] = np.float64(run.loss_total)
  return arrays


def test_suite_reads_every_size_from_the_fixture():
  arrays = _generated_part_a()
  report = harness.run(arrays)
  assert report.kind == 'mim_refiner' and report.ok, report.table()
  assert any(r.quantity == 'head/b/act/predictor.2' for r in report.results)

  wrong_pick = dict(arrays)
  wrong_pick['head/a/queue/nn_index'] = arrays['head/a/queue/nn_index'][::-1]
  wrong_grad = dict(arrays)
  wrong_grad['head/b/grad/predictor.1.0.weight'] = arrays['head/b/grad/predictor.1.0.weight'] * 1.01
  for bad, quantity in ((wrong_pick, 'head/a/queue/nn_index'), (wrong_grad, 'head/b/grad/*')):
    failed = [r.quantity for r in harness.run(bad).results if not r.ok]
    assert failed and all(q.startswith(quantity) for q in failed), failed


# ---------------------------------------------------------------------------- heads
def test_batch_norm_is_torch_batchnorm1d_in_training_mode():
  x = np.random.default_rng(0).normal(2.0, 3.0, (7, 4)).astype(np.float32)
  bn = heads.BatchNorm1d()
  variables = jax.jit(bn.init)(jax.random.key(0), x)
  np.testing.assert_array_equal(variables['batch_stats']['mean'], np.zeros(4))  # init: no move
  scale, bias = np.linspace(0.5, 2, 4), np.linspace(-1, 1, 4)
  variables = {'params': {'scale': scale, 'bias': bias},
               'batch_stats': {'mean': np.full(4, 0.3), 'var': np.full(4, 1.7)}}
  y, new = jax.jit(functools.partial(bn.apply, mutable=['batch_stats']))(variables, x)
  mean, var = x.mean(0), x.var(0)
  np.testing.assert_allclose(y, (x - mean) / np.sqrt(var + 1e-5) * scale + bias, atol=1e-5)
  np.testing.assert_allclose(new['batch_stats']['mean'], 0.9 * 0.3 + 0.1 * mean, rtol=1e-6)
  np.testing.assert_allclose(new['batch_stats']['var'], 0.9 * 1.7 + 0.1 * x.var(0, ddof=1),
                             rtol=1e-6)


def test_head_official_names_round_trip_and_name_their_errors():
  head = heads.IdHead(proj_hidden_dim=6, pred_hidden_dim=5, output_dim=3, pred_hidden_layers=1)
  sd = _random_head_state(head, 4, 8, np.arange(3), seed=0)
  assert sd['projector.2.0.weight'].shape == (3, 6) and 'predictor.2.1.running_var' in sd
  assert heads.config_from_official(sd) == head
  params, stats = heads.from_official(sd, head, 4)
  back = heads.to_official(params, stats)
  assert set(back) == {k for k in sd if not k.startswith('queue.')}
  for k, v in back.items():
    np.testing.assert_array_equal(v, sd[k])
  q = queue.from_official(sd)
  for k, v in queue.to_official(q).items():
    np.testing.assert_array_equal(v, sd[k])

  bad = {**sd, 'projector.1.0.weight': np.zeros((6, 7), np.float32)}
  with pytest.raises(ValueError, match=r'projector\.1\.0\.weight: expected \(6, 6\), found'):
    heads.from_official(bad, head, 4)
  missing = {k: v for k, v in sd.items() if k != 'predictor.0.1.bias'}
  with pytest.raises(ValueError, match=r'missing predictor\.0\.1\.bias'):
    heads.from_official(missing, head, 4)
  with pytest.raises(ValueError, match=r'unexpected projector\.0\.0\.bias'):
    heads.from_official({**sd, 'projector.0.0.bias': np.zeros(6)}, head, 4)


# ---------------------------------------------------------------------------- queue
def test_lookup_excludes_the_sample_and_takes_the_recorded_pick():
  # Stored row 0 is the query itself (same sample id): never retrieved although identical.
  x = np.array([[1, 0], [0.9, 0.1], [0.5, 0.5], [-1, 0], [3, 0.6]], np.float32)
  q = queue.Queue(x=jnp.asarray(x), idx=jnp.array([7, 1, 2, 3, 4]),
                  labels=jnp.array([5, 5, 6, 5, 6]), age=jnp.arange(5), ptr=jnp.array(0))
  anchors = jnp.array([[1.0, 0.0], [0.0, 2.0]])  # views 0 and 1 of sample id 7
  found = jax.jit(queue.lookup, static_argnames='topk')(
      q, anchors, idx=jnp.array([7]), labels=jnp.array([5]), choice=jnp.array([1, 0]), topk=3)
  sim = (x / np.linalg.norm(x, axis=1, keepdims=True)) @ np.array([[1, 0], [0, 1.0]])
  sim[0] = -1
  np.testing.assert_array_equal(found.topk_index, np.argsort(-sim, axis=0)[:3].T)
  np.testing.assert_array_equal(found.nn_index, [found.topk_index[0, 1], found.topk_index[1, 0]])
  np.testing.assert_array_equal(found.neighbours, x[np.asarray(found.nn_index)])  # raw rows
  nn = x[np.asarray(found.nn_index)]
  cos = np.sum(np.asarray(anchors) * nn, 1) / np.linalg.norm(anchors, axis=1) / np.linalg.norm(
      nn, axis=1)
  np.testing.assert_allclose(found.metrics['nn-similarity'], cos.mean(), rtol=1e-6)
  np.testing.assert_allclose(found.metrics['nn-age'], np.asarray(found.nn_index).mean())
  np.testing.assert_allclose(found.metrics['nn-accuracy'],
                             np.mean(np.array([5, 5, 6, 5, 6])[np.asarray(found.nn_index)] == 5))


def test_enqueue_is_fifo_with_wrap_around_and_ages():
  q = queue.Queue(x=np.random.default_rng(0).normal(size=(5, 2)).astype(np.float32),
                  idx=np.full(5, -1), labels=np.full(5, -1), age=np.arange(5), ptr=np.array(3))
  rows = np.arange(8.0, dtype=np.float32).reshape(4, 2)
  new = jax.jit(queue.enqueue)(q, rows, idx=np.array([10, 11, 12, 13]),
                               labels=np.array([1, 2, 3, 4]))
  np.testing.assert_array_equal(new.x[np.array([3, 4, 0, 1])], rows)
  np.testing.assert_array_equal(new.x[2], q.x[2])
  np.testing.assert_array_equal(new.idx, [12, 13, -1, 10, 11])
  np.testing.assert_array_equal(new.labels, [3, 4, -1, 1, 2])
  np.testing.assert_array_equal(new.age, [4, 4, 2 + 4, 4, 4])
  assert int(new.ptr) == 2
  with pytest.raises(ValueError, match='queue size must be at least the global batch'):
    queue.enqueue(q, jnp.zeros((6, 2)), jnp.zeros(6, int), jnp.zeros(6, int))


# ---------------------------------------------------------------------------- loss
def _official_loss(z, n, p, n_global, temperature):
  """`NnclrLoss.forward`'s loops, transcribed in float64 numpy; z, n (B, G, D), p (B, V, D)."""
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  z, n, p = unit(z), unit(n), unit(p)
  batch, n_views = p.shape[:2]

  def term(i, j):
    logits = z[:, i] @ p[:, j].T / temperature
    logits[np.arange(batch), np.arange(batch)] = np.sum(n[:, i] * p[:, j], -1) / temperature
    logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    return -np.mean(np.diag(logp)), np.mean(np.exp(np.diag(logp)))

  glob = [term(i, j) for i in range(n_global) for j in range(n_global) if i != j]
  loc = [term(i, j) for i in range(n_global) for j in range(n_views - n_global)]
  total = (sum(t for t, _ in glob) + sum(t for t, _ in loc)) / (len(glob) + len(loc))
  parts = {'global_loss': np.mean([t for t, _ in glob]) if glob else 0.0,
           'global_alignment': np.mean([a for _, a in glob]) if glob else 0.0}
  if loc:
    parts.update(local_loss=np.mean([t for t, _ in loc]),
                 local_alignment=np.mean([a for _, a in loc]))
  return total, parts


@pytest.mark.parametrize('n_global,n_local', [(2, 3), (3, 1), (2, 0)])
def test_nna_loss_is_the_official_loops(n_global, n_local):
  batch, dim, n_views = 4, 5, n_global + n_local
  rng = np.random.default_rng(n_global * 10 + n_local)
  z, n = rng.normal(size=(2, n_global * batch, dim))
  p = rng.normal(size=(n_views * batch, dim))
  total, parts = jax.jit(loss.nna_loss, static_argnums=(3, 4))(z, n, p, n_global, 0.2)
  view_major = lambda x, v: x.reshape(v, batch, dim).transpose(1, 0, 2)
  ref_total, ref_parts = _official_loss(view_major(z, n_global), view_major(n, n_global),
                                        view_major(p, n_views), n_global, 0.2)
  np.testing.assert_allclose(total, ref_total, rtol=1e-5)
  assert set(parts) == set(ref_parts)
  for k, v in ref_parts.items():
    np.testing.assert_allclose(parts[k], v, rtol=1e-5, err_msg=k)


def test_only_the_predictions_carry_gradient():
  rng = np.random.default_rng(0)
  z, n, p = (rng.normal(size=s).astype(np.float32) for s in ((6, 4), (6, 4), (15, 4)))
  grads = jax.jit(jax.grad(lambda *a: loss.nna_loss(*a, 2, 0.2)[0], argnums=(0, 1, 2)))(z, n, p)
  assert not np.any(grads[0]) and not np.any(grads[1]) and np.any(grads[2])


def test_the_last_projector_bias_gets_no_gradient_and_keeps_the_output():
  """The predictor (bias-free Linear, training-mode BatchNorm) cancels a shift of its input,
  so that bias's gradient is exactly zero (computed, it is rounding noise Adam amplifies)."""
  head = heads.IdHead(proj_hidden_dim=8, pred_hidden_dim=8, output_dim=4)
  x = np.random.default_rng(0).normal(size=(12, 5)).astype(np.float32)
  variables = head.init(jax.random.key(0), x)
  params = jax.tree.map(lambda p: p + 0.3, variables['params'])  # non-trivial affine params

  def apply(p):
    return head.apply({'params': p, 'batch_stats': variables['batch_stats']}, x,
                      mutable=['batch_stats'])[0]

  grads = jax.jit(jax.grad(lambda p: jnp.sum(jnp.sin(apply(p)[1]))))(params)
  assert not np.any(grads['projector']['layer2']['norm']['bias'])
  assert np.all(grads['projector']['layer2']['norm']['scale'] != 0)
  assert np.all(grads['predictor']['layer1']['norm']['bias'] != 0)
  # The bias still shifts the projections (the anchors and enqueued rows).
  shifted = jax.tree.map(lambda p: p, params)
  shifted['projector']['layer2']['norm']['bias'] += 1
  np.testing.assert_allclose(apply(shifted)[0], apply(params)[0] + 1, rtol=1e-6, atol=1e-6)


def test_head_objective_is_the_same_with_rows_sharded_over_devices():
  devices = jax.devices()
  if len(devices) < 2:
    pytest.skip('needs several devices')
  mesh = jax.sharding.Mesh(np.array(devices), ('data',))
  head = heads.IdHead(proj_hidden_dim=8, pred_hidden_dim=8, output_dim=4)
  batch, rows = len(devices), 3 * len(devices)
  features = np.random.default_rng(0).normal(size=(rows, 5)).astype(np.float32)
  variables = head.init(jax.random.key(0), features)
  q = queue.init(jax.random.key(1), 2 * batch, 4)
  step = jax.jit(lambda x: objective.head_objective(
      head, variables['params'], variables['batch_stats'], q, x, jnp.arange(batch),
      jnp.zeros(batch, jnp.int32), jnp.zeros(2 * batch, jnp.int32), n_global=2, topk=2,
      temperature=0.2))
  sharded = jax.device_put(features, jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec('data', None)))
  (loss_a, out_a), (loss_b, out_b) = step(features), step(sharded)
  np.testing.assert_allclose(loss_a, loss_b, rtol=1e-5)
  np.testing.assert_array_equal(out_a.lookup.nn_index, out_b.lookup.nn_index)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               out_a.batch_stats, out_b.batch_stats)


# ---------------------------------------------------------------------------- optimisation
def test_scaled_lr():
  assert optim.scaled_lr(4e-4, 512) == pytest.approx(8e-4)


def test_parameter_group_rules():
  group = lambda name, ndim, **kw: optim.encoder_group(
      name, ndim, depth=6, weight_decay=0.05, layer_decay=0.5, **kw)
  assert group('patch_embed.proj.weight', 4) == core_optim.Group(0.5**7, 0.05)
  assert group('cls_tokens.tokens', 3) == core_optim.Group(0.5**7, 0.0)
  assert group('blocks.0.attn.qkv.weight', 2) == core_optim.Group(0.5**6, 0.05)
  assert group('blocks.5.mlp.fc1.bias', 1) == core_optim.Group(0.5, 0.0)
  assert group('blocks.5.norm1.weight', 1) == core_optim.Group(0.5, 0.0)
  assert group('norm.weight', 1) == core_optim.Group(1.0, 0.0)
  with pytest.raises(ValueError, match='no rule for'):
    group('decoder.weight', 2)
  frozen = lambda name: group(name, 2, freeze_end_percent=0.5).frozen
  assert frozen('patch_embed.proj.weight') and frozen('blocks.2.attn.proj.weight')
  assert not frozen('blocks.3.attn.proj.weight') and not frozen('norm.weight')

  head = heads.IdHead(proj_hidden_dim=6, pred_hidden_dim=5, output_dim=3)
  params = jax.eval_shape(head.init, jax.random.key(0), jnp.zeros((2, 4)))['params']
  groups = core_optim.group_tree(params, lambda path, ndim: optim.head_group(
      heads.official_name(path), ndim, weight_decay=0.01))
  assert groups['projector']['layer1']['linear']['kernel'] == core_optim.Group(1.0, 0.01)
  assert groups['predictor']['layer0']['norm']['scale'] == core_optim.Group(1.0, 0.0)


def test_adamw_first_step_and_frozen_leaves():
  params = {'w': jnp.array([[1.0, -2.0]]), 'b': jnp.array([0.5]), 'f': jnp.array([3.0, 4.0])}
  # wd_mult is the whole decay: the optimizer runs AdamW with weight_decay 1.
  groups = {'w': core_optim.Group(0.5, 0.1), 'b': core_optim.Group(1.0, 0.0),
            'f': core_optim.Group(1.0, 0.1, frozen=True)}
  tx = optim.optimizer(groups, lambda step: jnp.float32(0.01), betas=(0.9, 0.95), eps=1e-8)
  state = tx.init(params)
  # No optimiser state for the frozen leaf: Adam's moments of w and b, and two step counters.
  assert sum(x.size for x in jax.tree.leaves(state)) == 2 * (2 + 1) + 2
  assert set(state.inner_states) == set(core_optim.STATE_LABELS)
  grads = {'w': jnp.array([[0.3, -0.1]]), 'b': jnp.array([2.0]), 'f': jnp.array([1.0, 1.0])}
  updates, _ = tx.update(grads, state, params)
  # torch AdamW's first step moves p by -lr wd p - lr g / (|g| + eps).
  step = lambda p, g, lr, wd: -lr * wd * np.asarray(p, np.float64) - lr * np.asarray(
      g, np.float64) / (np.abs(np.asarray(g, np.float64)) + 1e-8)
  np.testing.assert_allclose(updates['w'], step(params['w'], grads['w'], 0.005, 0.1), rtol=1e-6)
  np.testing.assert_allclose(updates['b'], step(params['b'], grads['b'], 0.01, 0.0), rtol=1e-6)
  np.testing.assert_array_equal(updates['f'], [0.0, 0.0])


# ---------------------------------------------------------------------------- views
def _image(h=40, w=56, seed=0):
  return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), np.uint8))


def test_multicrop_shapes_determinism_and_pickling():
  transform = augment.MultiCrop(global_size=16, local_size=8, n_local=3)
  record = {'image': _image(), 'label': 4, 'index': 17}
  out = transform.random_map(record, np.random.default_rng(1))
  assert out['global_views'].shape == (2, 16, 16, 3) and out['global_views'].dtype == np.float32
  assert out['local_views'].shape == (3, 8, 8, 3) and out['local_views'].dtype == np.float32
  assert out['label'] == 4 and out['label'].dtype == np.int32
  assert out['index'] == 17 and out['index'].dtype == np.int32
  again = pickle.loads(pickle.dumps(transform)).random_map(record, np.random.default_rng(1))
  for k in out:
    np.testing.assert_array_equal(out[k], again[k])
  other = transform.random_map(record, np.random.default_rng(2))
  assert not np.array_equal(out['global_views'], other['global_views'])
  none = augment.MultiCrop(global_size=16, local_size=8, n_local=0).random_map(
      record, np.random.default_rng(1))
  assert none['local_views'].shape == (0, 8, 8, 3)
  with pytest.raises(ValueError, match='one entry per global view'):
    augment.MultiCrop(global_blur_p=(1.0,), global_solarize_p=(0.0, 0.2))
  with pytest.raises(ValueError, match='jitter_p=1.5 is not a probability'):
    augment.MultiCrop(jitter_p=1.5)


def test_views_without_random_ops_are_the_normalised_image_or_its_mirror():
  image = _image(24, 24)
  quiet = dict(global_size=24, local_size=24, n_local=1, global_scale=(1.0, 1.0),
               local_scale=(1.0, 1.0), jitter_p=0.0, grayscale_p=0.0, global_blur_p=(0.0,),
               global_solarize_p=(0.0,), local_blur_p=0.0)
  record = {'image': image, 'label': 0, 'index': 0}
  out = augment.MultiCrop(flip_p=0.0, **quiet).random_map(record, np.random.default_rng(0))
  # Scale 1 of a square image: torchvision's fallback takes the whole image.
  np.testing.assert_array_equal(out['global_views'][0], transforms.normalize(image))
  np.testing.assert_array_equal(out['local_views'][0], transforms.normalize(image))
  flipped = augment.MultiCrop(flip_p=1.0, **quiet).random_map(record, np.random.default_rng(0))
  np.testing.assert_array_equal(flipped['global_views'][0], transforms.normalize(image)[:, ::-1])


def test_colour_operations_follow_their_formulas():
  image = _image(6, 7)
  x = np.asarray(image, np.float64)
  luma = np.asarray(image.convert('L'), np.float64)[..., None]
  np.testing.assert_allclose(luma[..., 0], x @ [0.299, 0.587, 0.114], atol=1)
  close = lambda out, expected: np.testing.assert_allclose(
      np.asarray(out, np.float64), np.clip(expected, 0, 255), atol=1)
  jitter = lambda op, f: transforms.color_jitter(image, [op], {op: f})
  close(jitter(transforms.BRIGHTNESS, 1.3), x * 1.3)
  mean = int(luma.mean() + 0.5)
  close(jitter(transforms.CONTRAST, 0.7), mean + 0.7 * (x - mean))
  close(jitter(transforms.SATURATION, 1.2), luma + 1.2 * (x - luma))
  close(transforms.grayscale(image), np.repeat(luma, 3, axis=-1))
  # Order matters and follows `order`; operations without a factor are left out.
  both = transforms.color_jitter(image, [transforms.BRIGHTNESS, transforms.CONTRAST],
                              {transforms.BRIGHTNESS: 1.3, transforms.CONTRAST: 0.5})
  swapped = transforms.color_jitter(image, [transforms.CONTRAST, transforms.BRIGHTNESS],
                                 {transforms.BRIGHTNESS: 1.3, transforms.CONTRAST: 0.5})
  assert not np.array_equal(np.asarray(both), np.asarray(swapped))
  assert transforms.color_jitter(image, [transforms.HUE], {}) is image

  primaries = Image.fromarray(np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255]]], np.uint8))
  for factor in (0.1, -0.07):
    shifted = np.asarray(transforms.adjust_hue(primaries, factor), np.float64)[0]
    for pixel, hue in zip(shifted, (0, 85, 170)):  # PIL's hue bytes of red, green, blue
      expected = colorsys.hsv_to_rgb(((hue + int(factor * 255)) % 256) / 255, 1.0, 1.0)
      np.testing.assert_allclose(pixel, np.array(expected) * 255, atol=2)


def test_solarize_and_blur():
  transform = augment.MultiCrop(global_size=8, local_size=8, n_local=0, global_scale=(1, 1),
                                jitter_p=0, grayscale_p=0, flip_p=0, global_blur_p=(0.0,),
                                global_solarize_p=(1.0,))
  image = _image(8, 8)
  out = transform.random_map({'image': image, 'label': 0, 'index': 0}, np.random.default_rng(0))
  x = np.asarray(image)
  np.testing.assert_array_equal(out['global_views'][0],
                                transforms.normalize(np.where(x >= 128, 255 - x, x)))
  # PIL's blur radius is the Gaussian's standard deviation.
  impulse = np.zeros((41, 41, 3), np.uint8)
  impulse[20, 20] = 255
  for sigma in (0.5, 2.0):
    blurred = np.asarray(Image.fromarray(impulse).filter(
        ImageFilter.GaussianBlur(radius=sigma)), np.float64)[..., 0].sum(0)
    offsets = np.arange(41) - 20
    std = np.sqrt(np.sum(blurred * offsets**2) / blurred.sum())
    assert abs(std - sigma) < 0.1 * sigma


# torchvision 0.20.1 on Pillow 11.0.0 (tests/fixtures/torchvision_transforms/README.md): the
# expected pixels are read from the file, so this runs where torchvision is not installed (CI).
TORCHVISION_FIXTURE = (pathlib.Path(__file__).parent / 'fixtures' / 'torchvision_transforms' /
                       'torchvision_transforms.npz')


def test_operations_match_torchvision():
  with np.load(TORCHVISION_FIXTURE) as data:
    tv = {k.removeprefix('jitter/'): data[k] for k in data.files if k.startswith('jitter/')}
  image = Image.fromarray(tv['input'])
  same = lambda ours, name: np.testing.assert_array_equal(np.asarray(ours), tv[name], name)
  same(transforms.color_jitter(image, [transforms.BRIGHTNESS], {transforms.BRIGHTNESS: 1.3}),
       'brightness')
  same(transforms.color_jitter(image, [transforms.CONTRAST], {transforms.CONTRAST: 0.7}),
       'contrast')
  same(transforms.color_jitter(image, [transforms.SATURATION], {transforms.SATURATION: 1.2}),
       'saturation')
  for factor in (0.08, -0.1):
    same(transforms.adjust_hue(image, factor), f'hue_{factor}')
  same(transforms.grayscale(image), 'grayscale')


# ---------------------------------------------------------------------------- the method
def small_config(encoder_kind='kappamodules', stage=3, batch=8):
  """configs/mim_refiner/tiny.py shrunk: 8x8 global and 4x4 local views, a 2-block encoder."""
  c = tiny.get_config(str(stage))
  c.data.image_size = 8
  c.train.global_batch_size, c.train.total_iters = batch, 10
  c.sharding.mesh = (('data', -1),)
  r = c.mim_refiner
  r.optim.warmup_iters = 2
  r.encoder, r.heads, r.topk, r.queue_size = encoder_kind, ('main', 'cls0'), 2, 3 * batch
  r.proj_hidden_dim, r.pred_hidden_dim, r.output_dim = 8, 8, 4
  r.views.local_size, r.views.n_local = 4, 2
  if encoder_kind == encoder.CAPI:
    r.model.update(patch_size=4, n_registers=4, embed_dim=16, num_heads=2, encoder_depth=2,
                   decoder_depth=1)
  else:
    r.model = base_config.vit_model(encoder_kind, patch_size=4, embed_dim=16, depth=2,
                                    num_heads=2)
    r.model.image_size = 8
  return c


def _batches(config, n, seed=0):
  rng = np.random.default_rng(seed)
  b, r = config.train.global_batch_size, config.mim_refiner.views
  s = config.data.image_size
  return [{'global_views': rng.normal(size=(b, 2, s, s, 3)).astype(np.float32),
           'local_views': rng.normal(size=(b, r.n_local, r.local_size, r.local_size, 3)
                                     ).astype(np.float32),
           'index': np.arange(b) + b * t, 'label': np.arange(b) % 3} for t in range(n)]


def _train(config, devices, batches, with_init=False):
  """(final state, losses), with the initial state first if `with_init`."""
  mesh = sharding.make_mesh(config, devices)
  with jax.set_mesh(mesh):
    method = methods.from_config(config)
    state, layout = state_lib.create_state(config, method, mesh, jax.random.PRNGKey(0))
    init = jax.device_get(state)
    step = step_lib.jit_train_step(method, layout, mesh)
    losses = []
    for batch in batches:
      state, metrics = step(state, pipeline.make_global_batch(
          batch, mesh, sharding.batch_sharding(mesh).spec))
      losses.append(float(metrics['loss']))
    return (init, jax.device_get(state), losses) if with_init else (jax.device_get(state), losses)


def test_a_step_on_8_devices_is_the_global_batch_step_on_1():
  """SyncBatchNorm statistics, all devices' predictions as negatives, anchors enqueued in
  global order: the sharded step is the single-device step on the whole batch.

  Compared: what the steps changed (final - init), at a real learning rate (1e-3 after one
  warm-up step), so that a leaf left at its init by either run cannot pass (issue 23: at the
  tiny config's 3e-5, 24 of 60 leaves equalled their untrained init within the tolerances).
  """
  config = small_config()
  config.mim_refiner.optim.warmup_iters = 1
  config.mim_refiner.optim.base_lr = 1e-3 * 256 / config.train.global_batch_size
  batches = _batches(config, 2)
  init, one, losses_one = _train(config, jax.devices()[:1], batches, with_init=True)
  eight, losses_eight = _train(config, jax.devices()[:8], batches)
  np.testing.assert_allclose(losses_eight, losses_one, rtol=1e-5)
  assert losses_one[0] > 0
  q = one.buffers['heads']['main']['queue']
  np.testing.assert_array_equal(q['idx'][:16], np.arange(16))  # both batches, in order
  assert int(q['ptr']) == 16
  # Entries with an analytically zero gradient that is computed (key bias, final-norm bias)
  # take Adam steps of up to the lr from rounding noise, which the reduction order decides
  # (the fixture README): each run moves them by up to the lrs' sum (2e-3), in either
  # direction. (The last projector BatchNorm bias gets no gradient at all: `heads.IdHead`.)
  zero_gradient = re.compile(r'(attn/qkv/bias|(encoder|ema)/norm/bias|projector/layer2/norm/bias)$')
  flat = lambda s: jax.tree_util.tree_flatten_with_path((s.params, s.buffers))[0]
  unmoved = []
  for (path, a), b, start in zip(flat(eight), jax.tree.leaves((one.params, one.buffers)),
                                 jax.tree.leaves((init.params, init.buffers))):
    name = core_optim.path_name(path)
    if not np.issubdtype(np.asarray(start).dtype, np.floating):
      np.testing.assert_array_equal(a, b, err_msg=name)
      continue
    da, db = (np.asarray(x, np.float64) - np.asarray(start, np.float64) for x in (a, b))
    if zero_gradient.search(name):
      assert np.abs(da - db).max() <= 2 * 2.1e-3, name
      continue
    if not np.any(db):
      unmoved.append(name)
      continue
    # Rounding the stored float32 value costs a few of its ulps (the EMA moves by ~1e-5); the
    # running mean of a normalised layer's input is 0 up to summation noise (~1e-8).
    ulps = 4 * float(np.spacing(np.abs(np.asarray(start, np.float32)).max()))
    np.testing.assert_allclose(da, db, rtol=1e-3, atol=1e-3 * np.abs(db).max() + ulps + 1e-7,
                               err_msg=name)
  # The fixed sin-cos position embedding is the only leaf that must not move.
  assert unmoved == ['0/encoder/pos_embed', '1/ema/pos_embed'], (
      f'left at their init by two steps at lr 1e-3: {unmoved}')


def test_stage_2_trains_the_heads_only_and_evaluates_the_frozen_encoder():
  config = small_config(stage=2)
  method = methods.from_config(config)
  variables = method.init(jax.random.PRNGKey(0))
  assert set(variables.params) == {'heads'} and set(variables.frozen) == {'encoder'}
  assert set(variables.buffers) == {'heads'}
  assert method.eval_params(variables, 'ema') is variables.frozen['encoder']
  stage3 = methods.from_config(small_config(stage=3))
  flops2, flops3 = method.flops_per_step(), stage3.flops_per_step()
  assert flops2['heads'] == flops3['heads'] and flops3['encoder'] > 2 * flops2['encoder']
  assert flops3['total'] == sum(v for k, v in flops3.items() if k != 'total')
  global_repr, registers, feature_map = jax.eval_shape(
      method.eval_model().apply, {'params': variables.frozen['encoder']},
      jnp.zeros((3, 8, 8, 3)))
  assert (global_repr.shape, registers.shape, feature_map.shape) == (
      (3, 16), (3, 0, 16), (3, 2, 2, 16))


def test_from_pretrained_takes_a_backbone_or_a_stage_2_run_and_names_mismatches():
  config = small_config(encoder.CAPI)
  method = methods.from_config(config)
  fresh = method.init(jax.random.PRNGKey(0))
  capi = encoder_decoder.from_config(config.mim_refiner.model, config.efficiency)
  backbone = capi.init(jax.random.PRNGKey(1), jnp.zeros((1, 8, 8, 3)))['params']
  from_capi = lambda tree: {'init': interface.Pretrained(backbone=tree, method='capi')}
  loaded = method.from_pretrained(fresh, from_capi(backbone))
  jax.tree.map(np.testing.assert_array_equal, loaded.params['encoder'], backbone)
  jax.tree.map(np.testing.assert_array_equal, loaded.buffers['ema'], backbone)
  jax.tree.map(np.testing.assert_array_equal, loaded.params['heads'], fresh.params['heads'])

  stage2 = methods.from_config(small_config(encoder.CAPI, stage=2))
  source = stage2.init(jax.random.PRNGKey(2))
  continued = method.from_pretrained(fresh, {'init': interface.Pretrained(
      backbone=backbone, method='mim_refiner', variables=source)})
  jax.tree.map(np.testing.assert_array_equal, continued.params['heads'], source.params['heads'])
  jax.tree.map(np.testing.assert_array_equal, continued.buffers['heads'], source.buffers['heads'])
  jax.tree.map(np.testing.assert_array_equal, continued.params['encoder'],
               source.frozen['encoder'])

  wrong = jax.tree.map(lambda x: x, backbone)
  wrong['registers'] = np.zeros((1, 3, 16), np.float32)
  del wrong['mask_token']
  with pytest.raises(ValueError, match=r'registers: expected \(1, 4, 16\), found \(1, 3, 16\)'
                     r'.*'):
    method.from_pretrained(fresh, from_capi(wrong))
  with pytest.raises(ValueError, match='mask_token: missing'):
    method.from_pretrained(fresh, from_capi(wrong))


def test_capi_encoder_encode_and_parameter_groups():
  config = small_config(encoder.CAPI)
  method = methods.from_config(config)
  params = method.init(jax.random.PRNGKey(0)).params['encoder']
  images = jax.random.normal(jax.random.PRNGKey(1), (2, 8, 8, 3))
  model = method.encoder
  out = model.apply({'params': params}, images, blocks=(0, 1), method='encode')
  patches = model.apply({'params': params}, images, method='encode_all')
  np.testing.assert_allclose(out.tokens[:, 4:], patches, atol=1e-6)
  np.testing.assert_allclose(model.apply({'params': params}, out.blocks[1], method=lambda m, x:
                                         m.enc_norm(x)), out.tokens, atol=1e-6)
  groups = method.encoder_groups(params)
  d = config.mim_refiner.layer_decay
  assert groups['decoder']['blocks_0']['residual1']['norm']['scale'].frozen
  assert groups['mask_token'].frozen
  assert groups['encoder']['blocks_0']['residual1']['fn']['rope']['freqs'].frozen
  assert groups['registers'].lr_mult == pytest.approx(d ** 3)
  assert groups['registers'].wd_mult == 0.0
  assert groups['encoder']['blocks_1']['residual2']['fn']['fc1']['kernel'].lr_mult == (
      pytest.approx(d))
  vit_groups = methods.from_config(small_config()).encoder_groups(
      methods.from_config(small_config()).init(jax.random.PRNGKey(0)).params['encoder'])
  assert vit_groups['pos_embed'].frozen  # the fixed sin-cos table


@pytest.mark.parametrize('module,arg', [(mae_l16, '2'), (mae_h14, '3'), (d2v2_l16, '3'),
                                        (d2v2_h14, '2'), (capi_vitl, '3'), (tiny, '')])
def test_configs_are_valid(module, arg):
  config = module.get_config(arg)
  assert config_checks.problems(config, device_count=1) == []
  assert config.mim_refiner.stage == (int(arg) if arg else 3)


def test_config_problems_name_each_bad_key():
  config = small_config()
  config.mim_refiner.stage = 4
  config.mim_refiner.heads = ('main', 'cls7', 'last')
  config.mim_refiner.queue_size = 4
  config.mim_refiner.pooling = 'max'
  config.mim_refiner.views.blur = 0.5
  config.mim_refiner.optim.warmup_iters = 10
  config.mim_refiner.optim.base_lr = float('inf')
  config.mim_refiner.optim.weight_decay = float('nan')
  found = config_checks.problems(config, device_count=1)
  for key in ('mim_refiner.stage=4', "'cls7' reads block 7", "'last' is neither",
              'queue_size=4 must be at least', "pooling='max'", "unknown keys ['blur']",
              'mim_refiner.optim.warmup_iters=10 must be in [0, train.total_iters=10)',
              'base_lr=inf must be a finite number > 0', 'weight_decay=nan and'):
    assert any(key in sentence for sentence in found), (key, found)


def test_init_checkpoint_of_another_architecture_is_refused_in_one_line(tmp_path):
  """A wider official file, or another method's run of another width: one line naming the
  file, the first mismatching parameter with both shapes and the config keys to check."""
  config = small_config('mae')
  wide = methods.from_config(config).encoder.clone(embed_dim=24, num_heads=2)
  params = jax.tree.map(lambda s: np.zeros(s.shape, np.float32), vit_weights.param_shapes(wide))
  files.write_state_dict(vit_weights.params_to_official(params, 'mae'), tmp_path / 'wide.npz')
  config.init.checkpoint = str(tmp_path / 'wide.npz')
  method = methods.from_config(config)
  with pytest.raises(rules.CheckpointMismatchError) as error:
    pretrained.apply(method, jax.eval_shape(method.init, jax.random.key(0)))
  assert str(error.value) == (
      f"{tmp_path / 'wide.npz'} (init) does not fit the configured mim_refiner model: parameter "
      "'blocks.0.attn.proj.bias': expected shape (16,), found (24,) (and 29 more). Check "
      "mim_refiner.model and mim_refiner.encoder against the checkpoint's architecture.")

  config = small_config(encoder.CAPI)
  narrow = config.mim_refiner.model.copy_and_resolve_references()
  narrow.embed_dim = 8
  capi = encoder_decoder.from_config(narrow, config.efficiency)
  backbone = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), jax.eval_shape(
      capi.init, jax.random.key(1), jax.ShapeDtypeStruct((1, 8, 8, 3), jnp.float32))['params'])
  files.save_params({'backbone': backbone}, tmp_path / 'capi_run')
  config.init.checkpoint = str(tmp_path / 'capi_run')
  method = methods.from_config(config)
  with pytest.raises(rules.CheckpointMismatchError) as error:
    pretrained.apply(method, jax.eval_shape(method.init, jax.random.key(0)))
  message = str(error.value)
  assert len(message.splitlines()) == 1, message
  assert message.startswith(f"{tmp_path / 'capi_run'} (init) does not fit the configured "
                            'mim_refiner model: '), message
  assert re.search(r': expected \(\d*,? ?16\)?.*, found \(.*8\)', message), message
  assert message.endswith('Check mim_refiner.model and mim_refiner.encoder against the '
                          "checkpoint's architecture."), message
