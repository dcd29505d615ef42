r"""CAPI's parity suite: `python -m capi_jax.check_reference` on a CAPI fixture.

The fixture format is `tests/fixtures/capi_reference/README.md`: the model config comes from
its `meta_json`; image shapes, batch size, token counts and the number of clusters come from
the arrays. Comparisons: eval forward, training forward, clustering head, student head,
schedules, and two training iterations (the engine's train step from `step/init/...`), whose
parameters are judged against the float64 re-run (`step_f64/final`).
"""

from collections.abc import Mapping
import functools
import json
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from capi_jax.base import interface
from capi_jax.base import schedules
from capi_jax.engine import state as state_lib
from capi_jax.engine import step as step_lib
from capi_jax.methods.capi import convert as capi_convert
from capi_jax.methods.capi import heads
from capi_jax.methods.capi import method as capi
from capi_jax.models import encoder_decoder
from capi_jax.reference import harness
from capi_jax.reference.harness import compare, Result

FORWARD_TOL = 1e-5
GRAD_TOL = 1e-4
SCHEDULE_TOL = 1e-10

# Official EncoderDecoder constructor defaults (model.py), for keys a fixture's meta leaves out.
_OFFICIAL_MODEL_DEFAULTS = {
    'patch_size': 14, 'in_chans': 3, 'norm_layer_type': 'RMSNorm', 'n_registers': 16,
    'register_coordinates': 'edge', 'scale_reg_to_visible': True,
    'norm_layer_kwargs': {'eps': 1e-5}, 'final_norm_kwargs': {'elementwise_affine': False},
    'out_layer': -1,
}


def config_from_meta(meta: Mapping[str, Any], scan_layers: bool = False
                     ) -> ml_collections.ConfigDict:
  """A capi_jax config (float32, no remat) for the official model config in `meta['model']`.

  Raises:
    ValueError: the official config uses something capi_jax does not implement; names the key.
  """
  official = {**_OFFICIAL_MODEL_DEFAULTS, **meta['model']}
  transformer = dict(official.pop('transformers_kwargs', {}))
  encoder = {**transformer, **official.pop('encoder_kwargs', {})}
  decoder = {**transformer, **official.pop('decoder_kwargs', {})}
  for name, value, supported in [
      ('in_chans', official.pop('in_chans'), 3),
      ('norm_layer_type', official.pop('norm_layer_type'), 'RMSNorm'),
      ('final_norm_kwargs', official.pop('final_norm_kwargs'), {'elementwise_affine': False}),
  ]:
    if value != supported:
      raise ValueError(f'model.{name}={value!r} is not supported by capi_jax (only {supported!r}).')
  for stack_name, stack in (('encoder', encoder), ('decoder', decoder)):
    block = dict(stack.pop('block_kwargs', {}))
    stack['num_heads'] = dict(block.pop('attn_kwargs', {})).pop('num_heads')
    if block.pop('drop_path_type', 'efficient') != 'efficient' or block:
      raise ValueError(f'model {stack_name} block_kwargs {block} are not supported by capi_jax.')
  for key in ('embed_dim', 'num_heads', 'drop_path_rate'):
    if encoder[key] != decoder[key]:
      raise ValueError(f'capi_jax needs the same {key} for encoder and decoder, got '
                       f'{encoder[key]} and {decoder[key]}.')
  norm_kwargs = dict(official.pop('norm_layer_kwargs'))
  eps = norm_kwargs.pop('eps', 1e-5)
  if norm_kwargs:
    raise ValueError(f'model.norm_layer_kwargs {norm_kwargs} are not supported by capi_jax.')

  model = ml_collections.ConfigDict(dict(
      patch_size=official.pop('patch_size'), n_registers=official.pop('n_registers'),
      register_coordinates=official.pop('register_coordinates'),
      scale_reg_to_visible=official.pop('scale_reg_to_visible'), norm_eps=eps,
      embed_dim=encoder.pop('embed_dim'), num_heads=encoder.pop('num_heads'), mlp_ratio=4,
      drop_path_rate=encoder.pop('drop_path_rate'), encoder_depth=encoder.pop('depth'),
      decoder_depth=decoder.pop('depth'), out_layer=official.pop('out_layer')))
  leftover = {**official, **{f'encoder.{k}': v for k, v in encoder.items()}}
  leftover.update({f'decoder.{k}': v for k, v in decoder.items()
                   if k not in ('embed_dim', 'num_heads', 'drop_path_rate')})
  if leftover:
    raise ValueError(f'Unknown official model config keys {sorted(leftover)}.')
  capi = meta.get('capi', {})
  cfg = ml_collections.ConfigDict()
  cfg.capi = ml_collections.ConfigDict(dict(
      model=model,
      num_clusters=int(meta.get('num_clusters', 0)), student_temp=capi.get('student_temp', 0.12),
      clustering_kwargs=dict(target_temp=capi.get('target_temp', 0.06),
                             pred_temp=capi.get('pred_temp', 0.12),
                             n_sk_iter=capi.get('n_sk_iter', 3), bias=capi.get('bias', True))))
  cfg.efficiency = ml_collections.ConfigDict(dict(
      compute_dtype='float32', param_dtype='float32', reduce_dtype='float32',
      remat_policy='none', scan_layers=scan_layers))
  return cfg


class Context:
  """The fixture's arrays and what every comparison derives from them (computed once)."""

  def __init__(self, arrays: Mapping[str, np.ndarray], scan_layers: bool = False):
    self.arrays = arrays
    self.meta = json.loads(str(arrays['meta_json']))
    self.config = config_from_meta(self.meta, scan_layers)
    # The arrays, not the meta, say how many clusters the heads have.
    for key in ('clustering/layer.weight', 'step/init/teacher_head/layer.weight',
                'student_head/last_layer.weight_v'):
      if key in arrays:
        self.config.capi.num_clusters = int(arrays[key].shape[0])
        break
    self.model = encoder_decoder.from_config(self.config.capi.model, self.config.efficiency)

  def has(self, *keys: str) -> bool:
    return all(k in self.arrays for k in keys)

  def group(self, prefix: str) -> dict[str, np.ndarray]:
    """Arrays under `prefix/`, prefix stripped (official parameter names)."""
    return {k[len(prefix) + 1:]: v for k, v in self.arrays.items() if k.startswith(prefix + '/')}

  @functools.cached_property
  def backbone(self):
    return capi_convert.backbone_to_flax(self.group('backbone'), self.config)

  def images(self, key: str) -> jax.Array:
    """NCHW fixture images -> NHWC."""
    return jnp.asarray(self.arrays[key]).transpose(0, 2, 3, 1)

  def n_tokens(self, images_key: str) -> int:
    _, _, h, w = self.arrays[images_key].shape
    p = self.config.capi.model.patch_size
    return (h // p) * (w // p)

  def per_image_indices(self, key: str, images_key: str) -> np.ndarray:
    """Flat indices into batch * n_tokens -> (batch, n) per-image token indices."""
    return per_image_indices(self.arrays[key], self.arrays[images_key].shape[0],
                             self.n_tokens(images_key))


def per_image_indices(flat: np.ndarray, batch: int, n_tokens: int) -> np.ndarray:
  """The reference's flat `b * n_tokens + idx` indices -> (batch, n) int32 `idx`.

  Raises:
    ValueError: the indices are not grouped by image with the same count per image.
  """
  flat = np.asarray(flat)
  if flat.size % batch:
    raise ValueError(f'{flat.size} indices do not split evenly over a batch of {batch}.')
  rows = flat.reshape(batch, -1)
  idx = rows - np.arange(batch)[:, None] * n_tokens
  if idx.min() < 0 or idx.max() >= n_tokens:
    raise ValueError('Flat indices are not grouped by image (b * n_tokens + idx, image by image).')
  return idx.astype(np.int32)


def _matches(arrays: Mapping[str, np.ndarray]) -> bool:
  """CAPI fixtures hold official EncoderDecoder weights or CAPI's heads."""
  return any(k.startswith(('backbone/', 'step/init/student/backbone/', 'clustering/',
                           'student_head/')) for k in arrays)


SUITE = harness.Suite('capi', _matches, Context)


@SUITE.register('eval forward', requires=('fwd/images', 'fwd/global_repr', 'fwd/registers',
                                    'fwd/feature_map'))
def _eval_forward(ctx: Context) -> list[Result]:
  apply = jax.jit(ctx.model.apply)
  global_repr, registers, feature_map = apply({'params': ctx.backbone}, ctx.images('fwd/images'))
  return [compare('fwd/global_repr', global_repr, ctx.arrays['fwd/global_repr'], FORWARD_TOL),
          compare('fwd/registers', registers, ctx.arrays['fwd/registers'], FORWARD_TOL),
          compare('fwd/feature_map', feature_map, ctx.arrays['fwd/feature_map'], FORWARD_TOL)]


@SUITE.register('training forward', requires=(
    'pretrain/images', 'pretrain/visible_indices', 'pretrain/predict_indices',
    'pretrain/student_patches', 'pretrain/student_predictions', 'pretrain/teacher_patches'))
def _training_forward(ctx: Context) -> list[Result]:
  images = ctx.images('pretrain/images')
  visible = ctx.per_image_indices('pretrain/visible_indices', 'pretrain/images')
  predict = ctx.per_image_indices('pretrain/predict_indices', 'pretrain/images')
  variables = {'params': ctx.backbone}
  # The fixture's model runs with drop path 0, so train=False computes the same thing without
  # needing an rng.
  pretrain = jax.jit(functools.partial(ctx.model.apply, method='pretrain', train=False))
  student_patches, predictions = pretrain(variables, images, visible, predict)
  teacher = jax.jit(functools.partial(ctx.model.apply, method='encode_all'))(variables, images)
  ref_predictions = ctx.arrays['pretrain/student_predictions']
  return [
      compare('pretrain/student_patches', student_patches,
              ctx.arrays['pretrain/student_patches'], FORWARD_TOL),
      compare('pretrain/student_predictions',
              np.asarray(predictions).reshape(ref_predictions.shape), ref_predictions, FORWARD_TOL),
      compare('pretrain/teacher_patches', teacher, ctx.arrays['pretrain/teacher_patches'],
              FORWARD_TOL)]


@SUITE.register('clustering head', requires=(
    'clustering/layer.weight', 'clustering/input', 'clustering/assignments', 'clustering/loss',
    'clustering/grad_weight'))
def _clustering_head(ctx: Context) -> list[Result]:
  sd = ctx.group('clustering')
  sd = {k: v for k, v in sd.items() if k in ('layer.weight', 'layer.bias')}
  num_clusters, dim = sd['layer.weight'].shape
  params = capi_convert.clustering_head_to_flax(sd, dim, num_clusters, use_bias='layer.bias' in sd)
  kw = ctx.config.capi.clustering_kwargs
  loss_fn = functools.partial(heads.clustering_targets_and_loss, target_temp=kw.target_temp,
                              pred_temp=kw.pred_temp, n_sk_iter=kw.n_sk_iter)
  (loss, assignments), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(
      params, jnp.asarray(ctx.arrays['clustering/input']))
  grads = capi_convert.clustering_head_to_official(grads)
  results = [
      compare('clustering/assignments', assignments, ctx.arrays['clustering/assignments'],
              FORWARD_TOL),
      compare('clustering/loss', loss, ctx.arrays['clustering/loss'], FORWARD_TOL),
      compare('clustering/grad_weight', grads['layer.weight'], ctx.arrays['clustering/grad_weight'],
              GRAD_TOL)]
  if ctx.has('clustering/grad_bias'):
    results.append(compare('clustering/grad_bias', grads['layer.bias'],
                           ctx.arrays['clustering/grad_bias'], GRAD_TOL))
  return results


@SUITE.register('student head', requires=(
    'student_head/last_layer.weight_v', 'student_head/last_layer.weight_g', 'student_head/input',
    'student_head/targets', 'student_head/logits', 'student_head/loss',
    'student_head/grad_weight_v', 'student_head/grad_weight_g'))
def _student_head(ctx: Context) -> list[Result]:
  sd = {k: v for k, v in ctx.group('student_head').items() if k.startswith('last_layer.')}
  num_clusters, dim = sd['last_layer.weight_v'].shape
  params = capi_convert.student_head_to_flax(sd, dim, num_clusters)
  head = heads.L2NormLinear(num_clusters)

  def loss_fn(p, x, targets):
    logits = head.apply({'params': p}, x)
    return heads.capi_loss(logits, targets, ctx.config.capi.student_temp), logits

  (loss, logits), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(
      params, jnp.asarray(ctx.arrays['student_head/input']),
      jnp.asarray(ctx.arrays['student_head/targets']))
  grads = capi_convert.student_head_to_official(grads)
  return [
      compare('student_head/logits', logits, ctx.arrays['student_head/logits'], FORWARD_TOL),
      compare('student_head/loss', loss, ctx.arrays['student_head/loss'], FORWARD_TOL),
      compare('student_head/grad_weight_v', grads['last_layer.weight_v'],
              ctx.arrays['student_head/grad_weight_v'], GRAD_TOL),
      compare('student_head/grad_weight_g', grads['last_layer.weight_g'],
              ctx.arrays['student_head/grad_weight_g'], GRAD_TOL)]


def reference_schedule(settings: Mapping[str, Any], length: int) -> np.ndarray:
  """The release's WarmupThenCosine indexed at 0 .. length-1 (final value from total_iters on)."""
  settings = dict(settings)
  total = int(settings.pop('total_iters'))
  values = schedules.warmup_cosine(total_iters=total, **settings)
  tail = np.full(max(length - total, 0), settings['final_value'], np.float64)
  return np.concatenate([values, tail])[:length]


@SUITE.register('schedules', requires=('schedule/lr', 'schedule/momentum'))
def _schedules(ctx: Context) -> list[Result]:
  results = []
  for name in ('lr', 'momentum'):
    ref = ctx.arrays[f'schedule/{name}']
    ours = reference_schedule(ctx.meta[f'schedule_{name}'], len(ref))
    results.append(compare(f'schedule/{name}', ours, ref, SCHEDULE_TOL))
  return results


# ---------------------------------------------------------------------------- training
TRAIN_TOL = 1e-4
# Parameters after the two iterations are judged against the float64 re-run: float32 rounding
# decides the first Adam steps of weights whose gradients sit near Adam's eps, in any float32
# implementation, the official one included. Ours may be at most twice as far from float64 as
# the official float32 run is, per parameter, with a floor for those the official run gets exact.
F64_FACTOR = 2.0
F64_FLOOR = 1e-5
# Vectors and tokens: float32 puts them within ~2 ulps of 1.0 (1.8e-7) of float64.
VECTOR_FLOOR = 1e-6
_STEP_PARTS = ('student/backbone', 'student/head', 'ema/backbone', 'ema/head', 'teacher_head')


def _step_parts(ctx: Context, prefix: str) -> dict[str, Any]:
  """The official parameters under `prefix` ('step/init' or 'step/final') as capi_jax trees."""
  dim, k = ctx.config.capi.model.embed_dim, ctx.config.capi.num_clusters
  use_bias = ctx.config.capi.clustering_kwargs.bias
  parts = {}
  for part in _STEP_PARTS:
    sd = ctx.group(f'{prefix}/{part}')
    if not sd:
      continue
    if part.endswith('backbone'):
      parts[part] = capi_convert.backbone_to_flax(sd, ctx.config)
    elif part.endswith('head') and part != 'teacher_head':
      parts[part] = capi_convert.student_head_to_flax(sd, dim, k)
    else:
      parts[part] = capi_convert.clustering_head_to_flax(sd, dim, k, use_bias)
  return parts


def _official(part: str, params: Any) -> dict[str, np.ndarray]:
  if part.endswith('backbone'):
    return capi_convert.backbone_to_official(params)
  if part == 'teacher_head':
    return capi_convert.clustering_head_to_official(params)
  return capi_convert.student_head_to_official(params)


def _constant(value: float) -> ml_collections.ConfigDict:
  """A warmup-cosine schedule section whose value is `value` at every step."""
  return ml_collections.ConfigDict(dict(base_value=value, final_value=value, warmup_iters=0,
                                        start_warmup_value=value, truncate_cos=1.0))


def fixture_training_config(ctx: Context) -> ml_collections.ConfigDict:
  """The fixture run's settings (`meta.opt`) as a capi_jax config: constant lr and momentum,
  PyTorch's AdamW defaults where the fixture leaves them out (eps 1e-8; weight decay 0.01 for
  the clustering head)."""
  opt = ctx.meta['opt']
  config = ctx.config.copy_and_resolve_references()
  config.capi.num_clusters = ctx.arrays['step/init/teacher_head/layer.weight'].shape[0]
  eps = opt.get('eps', 1e-8)
  config.capi.clustering_optimizer = ml_collections.ConfigDict(dict(
      betas=tuple(opt['betas']), eps=eps, weight_decay=opt.get('clustering_wd', 0.01),
      lr_schedule=_constant(opt['clustering_lr'])))
  config.train = ml_collections.ConfigDict(dict(
      total_iters=1_000, global_batch_size=int(ctx.arrays['step/0/images'].shape[0])))
  config.capi.optim = ml_collections.ConfigDict(dict(
      betas=tuple(opt['betas']), eps=eps, weight_decay=opt['wd'],
      lr_schedule=_constant(opt['lr']), momentum_schedule=_constant(opt['momentum']),
      patch_embed_lr_mult=opt['patch_embed_lr_mult'], rope_lr_mult=opt['rope_lr_mult'],
      layernorm_wd_mult=opt['layernorm_wd_mult']))
  _, _, h, w = ctx.arrays['step/0/images'].shape
  config.data = ml_collections.ConfigDict(dict(image_size=(h, w)))
  return config


class _Prenormalised(capi.Capi):
  """CAPI on the fixture's images, which the official run normalised already (float32)."""

  def normalize(self, images):
    return images


@SUITE.register('two training iterations', requires=(
    'step/init/student/backbone/patch_embed.weight', 'step/init/teacher_head/layer.weight',
    'step_f64/final/student/backbone/patch_embed.weight',
    'step/0/images', 'step/0/visible_indices', 'step/0/predict_indices', 'step/0/capi_loss',
    'step/1/images', 'step/1/capi_loss'))
def _two_training_iterations(ctx: Context) -> list[Result]:
  """The engine's train step with CAPI's optimiser, from the fixture's weights on its batches."""
  method = _Prenormalised(fixture_training_config(ctx))
  init = _step_parts(ctx, 'step/init')
  student = {'backbone': init['student/backbone'], 'head': init['student/head']}
  params = {**student, 'clustering_head': init['teacher_head']}
  optimizer = method.optimizer(params)
  # The release copies the student into the EMA at init.
  variables = interface.Variables(params, {}, {'ema': jax.tree.map(jnp.copy, student)})
  state = state_lib.TrainState(
      step=jnp.zeros([], jnp.int32), rng=jax.random.PRNGKey(0), params=variables.params,
      frozen=variables.frozen, buffers=variables.buffers, opt_state=optimizer.init(params))
  step_fn = jax.jit(step_lib.make_train_step(method, optimizer))

  results = []
  i = 0
  while ctx.has(f'step/{i}/images'):
    images_key = f'step/{i}/images'
    batch = {'images': ctx.images(images_key),
             'visible_indices': ctx.per_image_indices(f'step/{i}/visible_indices', images_key),
             'predict_indices': ctx.per_image_indices(f'step/{i}/predict_indices', images_key)}
    state, metrics = step_fn(state, batch)
    for name in ('capi_loss', 'clustering_loss', 'target_entropy'):
      if ctx.has(f'step/{i}/{name}'):
        results.append(compare(f'step/{i}/{name}', metrics[name], ctx.arrays[f'step/{i}/{name}'],
                               TRAIN_TOL))
    i += 1
  ema = state.buffers['ema']
  ours = {'student/backbone': state.params['backbone'], 'student/head': state.params['head'],
          'ema/backbone': ema['backbone'], 'ema/head': ema['head'],
          'teacher_head': state.params['clustering_head']}
  for part in _STEP_PARTS:
    truth = ctx.group(f'step_f64/final/{part}')
    official = ctx.group(f'step/final/{part}')
    if not truth or not official:
      continue
    results.append(_per_parameter(f'step/final/{part}', _official(
        part, jax.device_get(ours[part])), official, truth))
  return results


def _per_parameter(quantity: str, ours: Mapping[str, Any], official: Mapping[str, Any],
                   truth: Mapping[str, np.ndarray]) -> Result:
  """One row: the parameter closest to (or furthest past) its own bound.

  Weight matrices share the part's bound, F64_FACTOR x the official float32 run's worst
  distance from float64 in the part (floor F64_FLOOR): float32 rounding decides the sign of
  Adam's first steps where gradients sit near eps, in different entries for each
  implementation. Every other parameter (norm scales, biases, tokens, registers, RoPE
  frequencies) gets F64_FACTOR x the official run's distance for that parameter (floor
  VECTOR_FLOOR): weight decay moves a norm scale or a token by ~1e-5 in two steps, far below the
  part's worst (an fc2 weight's 9e-5), so a missing decay only shows against its own bound.
  """
  distance = lambda sd, n: float(np.max(np.abs(np.asarray(sd[n], np.float64) - truth[n])))
  part_bound = max(F64_FACTOR * max(distance(official, n) for n in truth), F64_FLOOR)
  is_matrix = lambda n: n.endswith('.weight') and truth[n].ndim >= 2
  bound = {n: part_bound if is_matrix(n) else max(F64_FACTOR * distance(official, n),
                                                  VECTOR_FLOOR) for n in truth}
  error = {n: distance(ours, n) for n in truth}
  name = max(truth, key=lambda n: error[n] / bound[n])
  return Result(f'{quantity} vs float64, per parameter (worst: {name}, official float32: '
                f'{distance(official, name):.2g})', error[name],
                float(np.max(np.abs(truth[name]))), bound[name], absolute=True)
