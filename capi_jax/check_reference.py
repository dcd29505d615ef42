r"""Parity check against numbers produced by the official PyTorch release.

Run:
  python -m capi_jax.check_reference tests/fixtures/capi_ref_small.npz

Reads any fixture in the format of `tests/fixtures/README.md`: the model config comes from its
`meta_json`; image shapes, batch size, token counts and the number of clusters come from the
arrays. Runs every comparison the fixture has the arrays for, prints

  quantity | max abs err | max rel err | tolerance | ok

and exits non-zero if any quantity is out of tolerance. A quantity passes when
max|ours - ref| <= tolerance * max(1, max|ref|) (absolute for values of order one, relative for
larger ones); `max rel err` is max|ours - ref| / max|ref|. Computation is float32 with
'highest' matmul precision.

Comparisons are named functions in `COMPARISONS`, added with `@register(name, requires=...)`:
eval forward, training forward, clustering head, student head, schedules and two training
iterations (the train step from `step/init/...`). One whose fixture arrays are missing, or whose
code is not importable, is reported as skipped with the reason, never silently.
"""

from collections.abc import Callable, Mapping, Sequence
import dataclasses
import functools
import json
import sys
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from capi_jax import convert
from capi_jax.methods.capi import heads
from capi_jax.models import encoder_decoder

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


class Skipped(Exception):
  """A comparison that this fixture (or this checkout) cannot run; the message says why."""


@dataclasses.dataclass(frozen=True)
class Result:
  quantity: str
  max_abs: float
  scale: float  # max |reference|
  tolerance: float

  @property
  def max_rel(self) -> float:
    if self.scale > 0:
      return self.max_abs / self.scale
    return 0.0 if self.max_abs == 0 else float('inf')

  @property
  def ok(self) -> bool:
    # NaN compares False, so a NaN anywhere fails.
    return self.max_abs <= self.tolerance * max(1.0, self.scale)


def compare(quantity: str, ours: Any, ref: Any, tolerance: float) -> Result:
  """Errors of `ours` against `ref` (same shape) as a `Result`."""
  ours = np.asarray(ours, np.float64)
  ref = np.asarray(ref, np.float64)
  if ours.shape != ref.shape:
    raise ValueError(f'{quantity}: shape {ours.shape} differs from the reference {ref.shape}.')
  max_abs = float(np.max(np.abs(ours - ref))) if ours.size else 0.0
  scale = float(np.max(np.abs(ref))) if ref.size else 0.0
  return Result(quantity, max_abs, scale, tolerance)


# ---------------------------------------------------------------------------- fixture context
def config_from_meta(meta: Mapping[str, Any]) -> ml_collections.ConfigDict:
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

  cfg = ml_collections.ConfigDict()
  cfg.model = ml_collections.ConfigDict(dict(
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
  cfg.capi = ml_collections.ConfigDict(dict(
      num_clusters=int(meta.get('num_clusters', 0)), student_temp=capi.get('student_temp', 0.12),
      clustering_kwargs=dict(target_temp=capi.get('target_temp', 0.06),
                             pred_temp=capi.get('pred_temp', 0.12),
                             n_sk_iter=capi.get('n_sk_iter', 3), bias=capi.get('bias', True))))
  cfg.efficiency = ml_collections.ConfigDict(dict(
      compute_dtype='float32', param_dtype='float32', reduce_dtype='float32',
      remat_policy='none'))
  return cfg


class Context:
  """The fixture's arrays and what every comparison derives from them (computed once)."""

  def __init__(self, arrays: Mapping[str, np.ndarray]):
    self.arrays = arrays
    self.meta = json.loads(str(arrays['meta_json']))
    self.config = config_from_meta(self.meta)
    # The arrays, not the meta, say how many clusters the heads have.
    for key in ('clustering/layer.weight', 'step/init/teacher_head/layer.weight',
                'student_head/last_layer.weight_v'):
      if key in arrays:
        self.config.capi.num_clusters = int(arrays[key].shape[0])
        break
    self.model = encoder_decoder.from_config(self.config)

  def has(self, *keys: str) -> bool:
    return all(k in self.arrays for k in keys)

  def group(self, prefix: str) -> dict[str, np.ndarray]:
    """Arrays under `prefix/`, prefix stripped (official parameter names)."""
    return {k[len(prefix) + 1:]: v for k, v in self.arrays.items() if k.startswith(prefix + '/')}

  @functools.cached_property
  def backbone(self):
    return convert.backbone_to_flax(self.group('backbone'), self.config)

  def images(self, key: str) -> jax.Array:
    """NCHW fixture images -> NHWC."""
    return jnp.asarray(self.arrays[key]).transpose(0, 2, 3, 1)

  def n_tokens(self, images_key: str) -> int:
    _, _, h, w = self.arrays[images_key].shape
    p = self.config.model.patch_size
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


# ---------------------------------------------------------------------------- registry
@dataclasses.dataclass(frozen=True)
class Comparison:
  name: str
  requires: tuple[str, ...]
  fn: Callable[[Context], list[Result]]


COMPARISONS: list[Comparison] = []


def register(name: str, requires: Sequence[str] = ()) -> Callable[..., Any]:
  """Adds a comparison `fn(ctx) -> [Result]`; it is skipped when a `requires` key is missing."""

  def wrap(fn: Callable[[Context], list[Result]]) -> Callable[[Context], list[Result]]:
    COMPARISONS.append(Comparison(name, tuple(requires), fn))
    return fn

  return wrap


@register('eval forward', requires=('fwd/images', 'fwd/global_repr', 'fwd/registers',
                                    'fwd/feature_map'))
def _eval_forward(ctx: Context) -> list[Result]:
  apply = jax.jit(ctx.model.apply)
  global_repr, registers, feature_map = apply({'params': ctx.backbone}, ctx.images('fwd/images'))
  return [compare('fwd/global_repr', global_repr, ctx.arrays['fwd/global_repr'], FORWARD_TOL),
          compare('fwd/registers', registers, ctx.arrays['fwd/registers'], FORWARD_TOL),
          compare('fwd/feature_map', feature_map, ctx.arrays['fwd/feature_map'], FORWARD_TOL)]


@register('training forward', requires=(
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


@register('clustering head', requires=(
    'clustering/layer.weight', 'clustering/input', 'clustering/assignments', 'clustering/loss',
    'clustering/grad_weight'))
def _clustering_head(ctx: Context) -> list[Result]:
  sd = ctx.group('clustering')
  sd = {k: v for k, v in sd.items() if k in ('layer.weight', 'layer.bias')}
  num_clusters, dim = sd['layer.weight'].shape
  params = convert.clustering_head_to_flax(sd, dim, num_clusters, use_bias='layer.bias' in sd)
  kw = ctx.config.capi.clustering_kwargs
  loss_fn = functools.partial(heads.clustering_targets_and_loss, target_temp=kw.target_temp,
                              pred_temp=kw.pred_temp, n_sk_iter=kw.n_sk_iter)
  (loss, assignments), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(
      params, jnp.asarray(ctx.arrays['clustering/input']))
  grads = convert.clustering_head_to_official(grads)
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


@register('student head', requires=(
    'student_head/last_layer.weight_v', 'student_head/last_layer.weight_g', 'student_head/input',
    'student_head/targets', 'student_head/logits', 'student_head/loss',
    'student_head/grad_weight_v', 'student_head/grad_weight_g'))
def _student_head(ctx: Context) -> list[Result]:
  sd = {k: v for k, v in ctx.group('student_head').items() if k.startswith('last_layer.')}
  num_clusters, dim = sd['last_layer.weight_v'].shape
  params = convert.student_head_to_flax(sd, dim, num_clusters)
  head = heads.L2NormLinear(num_clusters)

  def loss_fn(p, x, targets):
    logits = head.apply({'params': p}, x)
    return heads.capi_loss(logits, targets, ctx.config.capi.student_temp), logits

  (loss, logits), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(
      params, jnp.asarray(ctx.arrays['student_head/input']),
      jnp.asarray(ctx.arrays['student_head/targets']))
  grads = convert.student_head_to_official(grads)
  return [
      compare('student_head/logits', logits, ctx.arrays['student_head/logits'], FORWARD_TOL),
      compare('student_head/loss', loss, ctx.arrays['student_head/loss'], FORWARD_TOL),
      compare('student_head/grad_weight_v', grads['last_layer.weight_v'],
              ctx.arrays['student_head/grad_weight_v'], GRAD_TOL),
      compare('student_head/grad_weight_g', grads['last_layer.weight_g'],
              ctx.arrays['student_head/grad_weight_g'], GRAD_TOL)]


def reference_schedule(settings: Mapping[str, Any], length: int) -> np.ndarray:
  """The release's WarmupThenCosine indexed at 0 .. length-1 (final value from total_iters on)."""
  try:
    from capi_jax.core import schedules  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise Skipped(f'capi_jax.core.schedules is not importable: {e}') from e
  settings = dict(settings)
  total = int(settings.pop('total_iters'))
  values = schedules.warmup_cosine(total_iters=total, **settings)
  tail = np.full(max(length - total, 0), settings['final_value'], np.float64)
  return np.concatenate([values, tail])[:length]


@register('schedules', requires=('schedule/lr', 'schedule/momentum'))
def _schedules(ctx: Context) -> list[Result]:
  results = []
  for name in ('lr', 'momentum'):
    ref = ctx.arrays[f'schedule/{name}']
    ours = reference_schedule(ctx.meta[f'schedule_{name}'], len(ref))
    results.append(compare(f'schedule/{name}', ours, ref, SCHEDULE_TOL))
  return results


# ---------------------------------------------------------------------------- training
TRAIN_TOL = 1e-4
# An AdamW step moves a weight by up to ~lr whatever its gradient's size; where the gradient is
# at float32 noise level (|g| ~ eps = 1e-8; e.g. 2e-8 against a median of 5e-3 in this fixture)
# its direction is not determined by float32 arithmetic, so a few weights may differ by a
# fraction of lr (2e-3 here) after two steps while all the others agree to ~1e-6.
PARAMS_TOL = 2e-4
_STEP_PARTS = ('student/backbone', 'student/head', 'ema/backbone', 'ema/head', 'teacher_head')


def _step_parts(ctx: Context, prefix: str) -> dict[str, Any]:
  """The official parameters under `prefix` ('step/init' or 'step/final') as capi_jax trees."""
  dim, k = ctx.config.model.embed_dim, ctx.config.capi.num_clusters
  use_bias = ctx.config.capi.clustering_kwargs.bias
  parts = {}
  for part in _STEP_PARTS:
    sd = ctx.group(f'{prefix}/{part}')
    if not sd:
      continue
    if part.endswith('backbone'):
      parts[part] = convert.backbone_to_flax(sd, ctx.config)
    elif part.endswith('head') and part != 'teacher_head':
      parts[part] = convert.student_head_to_flax(sd, dim, k)
    else:
      parts[part] = convert.clustering_head_to_flax(sd, dim, k, use_bias)
  return parts


def _official(part: str, params: Any) -> dict[str, np.ndarray]:
  if part.endswith('backbone'):
    return convert.backbone_to_official(params)
  if part == 'teacher_head':
    return convert.clustering_head_to_official(params)
  return convert.student_head_to_official(params)


@register('two training iterations', requires=(
    'step/init/student/backbone/patch_embed.weight', 'step/init/teacher_head/layer.weight',
    'step/0/images', 'step/0/visible_indices', 'step/0/predict_indices', 'step/0/capi_loss',
    'step/1/images', 'step/1/capi_loss'))
def _two_training_iterations(ctx: Context) -> list[Result]:
  """capi_jax's train step from the fixture's initial weights on its two batches."""
  try:
    from capi_jax.core import optim  # pylint: disable=g-import-not-at-top
    from capi_jax.core import train_step  # pylint: disable=g-import-not-at-top
    from capi_jax.methods.capi import method as capi  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise Skipped(f'the training engine is not importable: {e}') from e
  opt = ctx.meta['opt']
  config = ctx.config.copy_and_resolve_references()
  config.capi.num_clusters = ctx.arrays['step/init/teacher_head/layer.weight'].shape[0]
  method = capi.Capi(config)
  init = _step_parts(ctx, 'step/init')
  student = {'backbone': init['student/backbone'], 'head': init['student/head']}
  teacher_head = init['teacher_head']
  optim_cfg = ml_collections.ConfigDict(dict(
      patch_embed_lr_mult=opt['patch_embed_lr_mult'], rope_lr_mult=opt['rope_lr_mult'],
      layernorm_wd_mult=opt['layernorm_wd_mult']))
  lr_mults, wd_mults = optim.param_group_trees(student, optim_cfg)
  constant = lambda value: (lambda step: jnp.asarray(value, jnp.float32))
  # The fixture's run: constant lr and momentum; PyTorch's AdamW defaults (eps 1e-8, and
  # weight decay 0.01 for the clustering head).
  optimizers = train_step.Optimizers(
      student=optim.adamw(constant(opt['lr']), betas=tuple(opt['betas']),
                          eps=opt.get('eps', 1e-8), weight_decay=opt['wd'],
                          lr_mults=lr_mults, wd_mults=wd_mults),
      teacher_head=optim.adamw(constant(opt['clustering_lr']), betas=tuple(opt['betas']),
                               eps=opt.get('eps', 1e-8),
                               weight_decay=opt.get('clustering_wd', 0.01)),
      lr_fn=constant(opt['lr']), momentum_fn=constant(opt['momentum']))
  state = train_step.TrainState(
      step=jnp.zeros([], jnp.int32), rng=jax.random.PRNGKey(0), params=student,
      ema_params=jax.tree.map(jnp.copy, student), teacher_head_params=teacher_head,
      opt_state=optimizers.student.init(student),
      teacher_head_opt_state=optimizers.teacher_head.init(teacher_head))
  step_fn = jax.jit(train_step.make_train_step(method, optimizers))

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
  ours = {'student/backbone': state.params['backbone'], 'student/head': state.params['head'],
          'ema/backbone': state.ema_params['backbone'], 'ema/head': state.ema_params['head'],
          'teacher_head': state.teacher_head_params}
  for part in _STEP_PARTS:
    ref = ctx.group(f'step/final/{part}')
    if not ref:
      continue
    ours_sd = _official(part, jax.device_get(ours[part]))
    worst = max((compare(f'step/final/{part}/{name}', ours_sd[name], value, PARAMS_TOL)
                 for name, value in ref.items()), key=lambda r: r.max_abs / max(1.0, r.scale))
    results.append(dataclasses.replace(worst, quantity=f'step/final/{part} (worst: '
                                       f'{worst.quantity.rsplit("/", 1)[-1]})'))
  return results


# ---------------------------------------------------------------------------- driver
@dataclasses.dataclass
class Report:
  results: list[Result]
  skipped: list[tuple[str, str]]

  @property
  def ok(self) -> bool:
    return all(r.ok for r in self.results)

  def table(self) -> str:
    header = ('quantity', 'max abs err', 'max rel err', 'tolerance', 'ok')
    rows = [(r.quantity, f'{r.max_abs:.3g}', f'{r.max_rel:.3g}', f'{r.tolerance:.0e}',
             'ok' if r.ok else 'FAIL') for r in self.results]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = [' | '.join(c.ljust(w) for c, w in zip(row, widths)) for row in [header, *rows]]
    lines.insert(1, '-+-'.join('-' * w for w in widths))
    lines += [f'skipped: {name}: {reason}' for name, reason in self.skipped]
    return '\n'.join(lines)


def run(arrays: Mapping[str, np.ndarray],
        comparisons: Sequence[Comparison] | None = None) -> Report:
  """Runs every comparison the fixture allows; float32, 'highest' matmul precision."""
  ctx = Context(arrays)
  report = Report([], [])
  with jax.default_matmul_precision('highest'):
    for comparison in COMPARISONS if comparisons is None else comparisons:
      missing = [k for k in comparison.requires if k not in arrays]
      if missing:
        report.skipped.append((comparison.name, f'the fixture has no {", ".join(missing)}'))
        continue
      try:
        report.results.extend(comparison.fn(ctx))
      except Skipped as e:
        report.skipped.append((comparison.name, str(e)))
  return report


def load_fixture(path: str) -> dict[str, np.ndarray]:
  with np.load(path) as f:
    return {k: f[k] for k in f.files}


def main(argv: Sequence[str]) -> int:
  if len(argv) != 2:
    print('usage: python -m capi_jax.check_reference FIXTURE.npz', file=sys.stderr)
    return 2
  report = run(load_fixture(argv[1]))
  print(report.table())
  print('PASS' if report.ok else 'FAIL: some quantities are out of tolerance')
  return 0 if report.ok else 1


if __name__ == '__main__':
  sys.exit(main(sys.argv))
