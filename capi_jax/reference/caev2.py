r"""CAE v2's parity suite: `python -m capi_jax.check_reference` on a CAE v2 fixture.

The fixture format is `tests/fixtures/caev2_reference/README.md`. Sizes come from the arrays
(grids from the masks and images, widths, depths and MLP ratios from the official tensors)
and, where no array says it, from `meta_json` (heads, LayerNorm epsilons, layer scale, schedule
and optimiser settings); nothing depends on the shipped fixture's numbers.

Localised comparisons (the regressor and decoder alone, from the fixture's encoder output):
  - the regressor's fixed sin-cos table against `rd_pos_embed`;
  - the labels from `fwd/teacher_features`;
  - regressor and decoder forward (`fwd/encoder_to_regresser_out`, `fwd/regressor_out`,
    `fwd/latent_predict`, `fwd/outputs`), per-token losses and the loss;
  - the gradients of the parameters after the encoder (they do not act on the encoder's
    output, so the loss's gradient with respect to them is the same with it held fixed);
  - the lr and weight-decay schedules, the parameter groups of the whole student;
  - torch's clip and AdamW over two iterations fed with the fixture's own float32 gradients;
  - the block mask generator's per-position frequencies (public fixture only), statistically.
The method end to end (`CaeV2` built from the fixture's settings, its official student
weights read by `caev2.convert`, its teacher loaded by the method from the official CLIP
tensors, fp16 included):
  - teacher features, encoder output on the visible patches, labels, the full student forward
    and the loss;
  - every gradient (against the float64 re-run) and the gradient norm;
  - two training iterations through the engine's own step (`engine.step.make_train_step` with
    the method's optimiser) on the fixture's batches, masks and schedule position, parameters
    judged against `f64/student/final` (atol 1e-5; `norm1_k.bias`, whose gradient is zero,
    with atol = the sum of the steps' learning rates, as the README says).
"""

from collections.abc import Callable, Mapping
import functools
import json
import math
import re
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from capi_jax.base import interface
from capi_jax.base import optim as core_optim
from capi_jax.base import schedules
from capi_jax.data import masking
from capi_jax.engine import state as state_lib
from capi_jax.engine import step as step_lib
from capi_jax.methods.caev2 import convert as caev2_convert
from capi_jax.methods.caev2 import loss as caev2_loss
from capi_jax.methods.caev2 import method as caev2_method
from capi_jax.methods.caev2 import optim as caev2_optim
from capi_jax.methods.caev2 import regressor
from capi_jax.models import vit
from capi_jax.reference import harness
from capi_jax.reference.harness import compare, Result, Skipped

FORWARD_TOL = 2e-5  # README: activations `fwd/*` atol 2e-5.
LOSS_TOL = 1e-6
TABLE_TOL = 1e-6  # the sin-cos table is within an ulp of the release's
SCHEDULE_TOL = 1e-10  # float64 arrays against float64 arrays
STEP_SCHEDULE_TOL = 1e-9  # our jitted float32 schedule at the fixture's iterations
GRAD_REL_TOL, GRAD_ABS_TOL = 1e-5, 1e-8  # README: |g - g_f64| <= 1e-5 max|g_f64| + 1e-8
NORM_TOL = 1e-6
# Same float32 gradients in, so only the two updates' float32 rounding separates the results.
ADAMW_TOL = 1e-6
PARAM_TOL = 1e-5  # README: parameters after the two steps, atol against f64/student/final.
# Per-position mask frequencies: the chi-square statistic per position of (ours - fixture)
# against the two binomial variances. Same generator: 0.5-1.05 over seeds (positions of one mask
# are not independent); a generator with another block size or aspect range: 2.5-3.3.
MASKGEN_CHI2_PER_POSITION = 1.5
MASKGEN_SEED = 0

# Official names of the tensors after the encoder (the rest are the encoder's).
_HEAD_NAME = re.compile(r'^(mask_token|encoder_to_regresser.*|regresser\..*|decoder\..*)$')
# The tensor whose gradient is identically zero (README, Tolerances).
_ZERO_GRADIENT = re.compile(r'^regresser\.regressor_blocks\.\d+\.norm1_k\.bias$')
_TEACHER = 'teacher'  # The fixture's teacher tensors are `teacher/visual.*`.


def _is_head_param(name: str) -> bool:
  return bool(_HEAD_NAME.match(name)) and not caev2_convert.NOT_PARAMETERS.match(name)


def _n_blocks(names: Any, prefix: str) -> int:
  """How many blocks `prefix<i>.` the official names hold."""
  return len({n[len(prefix):].split('.')[0] for n in names if n.startswith(prefix)})


def _mlp_ratio(fc1: np.ndarray, width: int, what: str) -> float:
  """hidden / width of an MLP's first official linear (hidden, width), as a ViT field."""
  if fc1.shape[0] % width:
    raise ValueError(f'The {what} MLP is {fc1.shape[0]} wide for width {width}: capi_jax needs '
                     'an integer mlp_ratio.')
  return float(fc1.shape[0] // width)


def _nhwc(images: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(np.transpose(images, (0, 2, 3, 1)))


class HeadRun(NamedTuple):
  """What `RegressorDecoder` and the loss compute from the fixture's encoder output."""
  outputs: jax.Array  # (B, 1 + N, C) unit rows
  latent_predict: jax.Array  # (B, N_m, D_r)
  loss: jax.Array  # ()
  sown: dict[str, jax.Array]  # 'regressor_out', and 'encoder_to_regresser_out' when D_r != D
  grads: dict[str, np.ndarray]  # d loss / d params, official names and layouts


class MethodRun(NamedTuple):
  """What the method computes on batch 0 from the official initial weights."""
  teacher_features: jax.Array  # (B, 1 + N, C)
  labels: jax.Array  # (B, 1 + N, C) unit rows, [class, visible, masked]
  encoder_out: jax.Array  # (B, 1 + N_v, D)
  outputs: jax.Array  # (B, 1 + N, C) unit rows, [class, visible, masked]
  metrics: dict[str, jax.Array]  # `loss_and_grads`'s: loss, grad_norm, ...
  grads: dict[str, np.ndarray]  # every gradient, official names and layouts


class _Prenormalised(caev2_method.CaeV2):
  """CAE v2 on the fixture's views, which the official run normalised already (float32)."""

  def normalize(self, images, teacher_images):
    return images, teacher_images


class Context:
  """The fixture's arrays and what the comparisons derive from them (computed once)."""

  def __init__(self, arrays: Mapping[str, np.ndarray], scan_layers: bool = False):
    self.arrays = arrays
    self.meta = json.loads(str(arrays['meta_json']))
    self.scan_layers = scan_layers

  def has(self, *keys: str) -> bool:
    return all(k in self.arrays for k in keys)

  def group(self, prefix: str) -> dict[str, np.ndarray]:
    """Arrays under `prefix/`, prefix stripped (official parameter names)."""
    return {k[len(prefix) + 1:]: v for k, v in self.arrays.items() if k.startswith(prefix + '/')}

  # ------------------------------------------------------------------ masks
  @functools.cached_property
  def grid(self) -> tuple[int, int]:
    _, h, w = self.arrays['batch/0/bool_masked_pos'].shape
    return h, w

  def indices(self, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Batch k's (visible, masked) patch indices, (B, N_v) and (B, N_m), each ascending."""
    masks = self.arrays[f'batch/{k}/bool_masked_pos']
    masked = masks.reshape(masks.shape[0], -1)
    counts = masked.sum(axis=1)
    if not np.all(counts == counts[0]):
      raise ValueError(f'batch/{k}/bool_masked_pos masks {counts.tolist()} patches per image; the '
                       'release needs the same count in every image.')
    visible, masked_idx = regressor.split_by_mask(masked, int(counts[0]))
    return np.asarray(visible), np.asarray(masked_idx)

  def batch(self, k: int) -> dict[str, np.ndarray]:
    """Batch k as `CaeV2Transform` makes it (NHWC views, index sets)."""
    visible, masked = self.indices(k)
    return {'images': _nhwc(self.arrays[f'batch/{k}/samples']),
            'teacher_images': _nhwc(self.arrays[f'batch/{k}/images']),
            'visible_indices': visible, 'masked_indices': masked}

  # ------------------------------------------------------------------ regressor + decoder
  @functools.cached_property
  def head_init(self) -> dict[str, np.ndarray]:
    """The official initial tensors after the encoder, parameters only."""
    return {k: v for k, v in self.group('student/init').items() if _is_head_param(k)}

  @functools.cached_property
  def regressor_sizes(self) -> dict[str, Any]:
    """RegressorDecoder's sizes: embed_dim, depth, num_heads, mlp_ratio."""
    sd = self.head_init
    width = sd['mask_token'].shape[-1]
    return {'embed_dim': width, 'depth': _n_blocks(sd, 'regresser.regressor_blocks.'),
            'num_heads': self.meta['student']['decoder_num_heads'],
            'mlp_ratio': _mlp_ratio(sd['regresser.regressor_blocks.0.mlp_cross.fc1.weight'],
                                    width, 'regressor')}

  @functools.cached_property
  def module(self) -> regressor.RegressorDecoder:
    return regressor.RegressorDecoder(
        grid=self.grid, out_dim=self.head_init['decoder.head.weight'].shape[0],
        norm_eps=self.meta['student']['norm_eps'], scan_layers=self.scan_layers,
        **self.regressor_sizes)

  @functools.cached_property
  def init_params(self) -> Any:
    """`head_init` as `RegressorDecoder` params (every name and shape checked)."""
    latents = self.arrays['fwd/encoder_out']
    visible, masked = self.indices(0)
    expected = jax.eval_shape(self.module.init, jax.random.key(0), latents, visible, masked)
    return caev2_convert.regressor_to_flax(self.head_init, expected['params'])

  @functools.cached_property
  def head_run(self) -> 'HeadRun':
    """The module from `init_params` on the fixture's encoder output, in one jitted call."""
    visible, masked = self.indices(0)
    latents = jnp.asarray(self.arrays['fwd/encoder_out'])

    def loss_fn(params):
      (outputs, latent_predict), state = self.module.apply(
          {'params': params}, latents, visible, masked, mutable=['intermediates'])
      loss = caev2_loss.alignment_loss(outputs, self.labels, self.loss_weight)
      sown = {k: v[0] for k, v in state['intermediates'].items()}
      return loss, (outputs, latent_predict, sown)

    (loss, (outputs, latent_predict, sown)), grads = jax.jit(
        jax.value_and_grad(loss_fn, has_aux=True))(self.init_params)
    return HeadRun(outputs, latent_predict, loss, sown,
                   caev2_convert.regressor_to_official(jax.device_get(grads)))

  @functools.cached_property
  def labels(self) -> jax.Array:
    visible, masked = self.indices(0)
    return caev2_loss.labels(jnp.asarray(self.arrays['fwd/teacher_features']), visible, masked)

  @property
  def loss_weight(self) -> float:
    return float(self.meta['args']['latent_alignment_loss_weight'])

  # ------------------------------------------------------------------ schedules
  def schedule_settings(self) -> dict[str, tuple[float, float, int, int]]:
    """{'lr', 'weight_decay'}: (base, final, total_iters, warmup_iters), as the release builds
    them (`cosine_scheduler`)."""
    args, sched = self.meta['args'], self.meta['schedule']
    total = int(args['epochs']) * int(sched['iters_per_epoch'])
    warmup = int(args['warmup_epochs']) * int(sched['iters_per_epoch'])
    if args.get('warmup_steps', -1) > 0:
      warmup = int(args['warmup_steps'])
    wd_end = args.get('weight_decay_end')
    return {'lr': (args['lr'], args['min_lr'], total, warmup),
            'weight_decay': (args['weight_decay'],
                             args['weight_decay'] if wd_end is None else wd_end, total, 0)}

  # ------------------------------------------------------------------ the method
  @functools.cached_property
  def config(self) -> ml_collections.ConfigDict:
    return fixture_config(self)

  @functools.cached_property
  def method(self) -> caev2_method.CaeV2:
    return _Prenormalised(self.config)

  @functools.cached_property
  def variables(self) -> interface.Variables:
    """The official initial student and teacher as the method's variables: the student read
    by `caev2.convert`, the teacher by the method's own loader (official CLIP names, fp16)."""
    expected = jax.eval_shape(self.method.init, jax.random.key(0))
    params = caev2_convert.student_to_flax(self.group('student/init'), self.method.encoder,
                                           expected.params['regressor'])
    teacher = interface.Pretrained(state_dict=self.group(_TEACHER))
    return self.method.from_pretrained(interface.Variables(params, expected.frozen, {}),
                                       {'teacher': teacher})

  @functools.cached_property
  def method_run(self) -> MethodRun:
    """The method's forward pieces and `loss_and_grads` on batch 0, in one jitted call."""
    method = self.method

    def run(variables, batch):
      visible, masked = batch['visible_indices'], batch['masked_indices']
      teacher = method.teacher_features(variables.frozen['teacher'], batch['teacher_images'])
      encoder_out = method.encoder.apply(
          {'params': variables.params['encoder']}, batch['images'], visible_indices=visible,
          method='encode').tokens
      outputs = method.student_outputs(variables.params, batch['images'], visible, masked)
      # No stochastic depth in the fixture, so the key changes nothing.
      grads, _, metrics = method.loss_and_grads(variables, batch, jax.random.key(0))
      return (teacher, caev2_loss.labels(teacher, visible, masked), encoder_out, outputs,
              metrics, grads)

    *forward, grads = jax.jit(run)(self.variables, self.batch(0))
    return MethodRun(*forward, caev2_convert.student_to_official(jax.device_get(grads)))


def fixture_config(ctx: Context) -> ml_collections.ConfigDict:
  """The fixture run's settings as a capi_jax CAE v2 config (float32, no remat).

  Raises:
    ValueError: the fixture uses something the method cannot reproduce (stochastic depth,
      a regressor MLP ratio other than the encoder's), or its settings are invalid.
  """
  init, teacher = ctx.group('student/init'), ctx.group(_TEACHER)
  meta, args = ctx.meta, ctx.meta['args']
  s, t = meta['student'], meta['teacher']
  if s['drop_path_rate']:
    raise ValueError(f'The fixture trains with stochastic depth ({s["drop_path_rate"]}): its '
                     'random draws cannot be reproduced.')
  batch, _, size, _ = ctx.arrays['batch/0/samples'].shape
  dim = init['encoder.cls_token'].shape[-1]
  mlp_ratio = _mlp_ratio(init['encoder.blocks.0.mlp.fc1.weight'], dim, 'encoder')
  reg = ctx.regressor_sizes
  if reg['mlp_ratio'] != mlp_ratio:
    raise ValueError(f'The fixture\'s regressor MLP ratio {reg["mlp_ratio"]} differs from the '
                     f'encoder\'s {mlp_ratio}; CAE v2 (and capi_jax) use one for both.')
  width = teacher['visual.class_embedding'].shape[0]
  teacher_patch = teacher['visual.conv1.weight'].shape[-1]
  teacher_side = math.isqrt(teacher['visual.positional_embedding'].shape[0] - 1)
  lr, min_lr, total, warmup = ctx.schedule_settings()['lr']
  opt, masks = meta['optimizer'], meta['mask_generator']
  config = ml_collections.ConfigDict({
      'method': caev2_method.CaeV2.name,
      'train': dict(total_iters=total, global_batch_size=batch),
      'caev2': dict(
          model=dict(
              vit.FAMILIES['caev2'], norm_eps=s['norm_eps'],
              layer_scale_init=s['layer_scale_init_value'],
              patch_size=init['encoder.patch_embed.proj.weight'].shape[-1], image_size=size,
              embed_dim=dim, depth=_n_blocks(init, 'encoder.blocks.'), num_heads=s['num_heads'],
              mlp_ratio=mlp_ratio, drop_path_rate=0.0),
          optim=dict(
              betas=tuple(opt['betas']), eps=opt['eps'], weight_decay=args['weight_decay'],
              clip_grad=opt['clip_grad'],
              lr_schedule=dict(base_value=lr, final_value=min_lr, warmup_iters=warmup)),
          data=dict(do_hflip=True, crop_scale=(args['crop_min_size'], args['crop_max_size']),
                    color_jitter=args['color_jitter']),
          num_mask_patches=ctx.indices(0)[1].shape[1],
          min_mask_patches_per_block=masks['min_num_patches'],
          max_mask_patches_per_block=masks['max_num_patches'] or 0,
          mask_min_aspect=masks['min_aspect'], loss_weight=ctx.loss_weight,
          regressor=dict(embed_dim=reg['embed_dim'], depth=reg['depth'],
                         num_heads=reg['num_heads'],
                         layer_scale_init=s['decoder_layer_scale_init_value']),
          teacher=dict(
              backbone='clip', checkpoint=f'the fixture\'s {_TEACHER}/*',
              image_size=ctx.arrays['batch/0/images'].shape[2], normalization='clip',
              model=dict(
                  vit.FAMILIES['clip'], norm_eps=t['norm_eps'], patch_size=teacher_patch,
                  image_size=teacher_side * teacher_patch, embed_dim=width,
                  depth=_n_blocks(teacher, 'visual.transformer.resblocks.'),
                  num_heads=t['heads'], out_dim=teacher['visual.proj'].shape[1],
                  mlp_ratio=_mlp_ratio(teacher['visual.transformer.resblocks.0.mlp.c_fc.weight'],
                                       width, 'teacher')))),
      'data': dict(dataset='synthetic', image_size=size),
      'efficiency': dict(compute_dtype='float32', param_dtype='float32',
                         reduce_dtype='float32', remat_policy='none',
                         scan_layers=ctx.scan_layers),
  })
  problems = caev2_method.CaeV2.config_problems(config)
  if problems:
    raise ValueError('The fixture\'s settings make an invalid CAE v2 config:\n  '
                     + '\n  '.join(problems))
  return config


def _matches(arrays: Mapping[str, np.ndarray]) -> bool:
  """CAE v2 fixtures hold the official regressor (`regresser.*`, `rd_pos_embed`)."""
  return any('regresser.' in k or k.endswith('/rd_pos_embed') for k in arrays)


SUITE = harness.Suite('caev2', _matches, Context)


@SUITE.register('regressor position table', requires=('student/init/rd_pos_embed',
                                                        'batch/0/bool_masked_pos'))
def _position_table(ctx: Context) -> list[Result]:
  ref = ctx.arrays['student/init/rd_pos_embed']
  table = regressor.sincos_table(ctx.grid, ref.shape[-1])
  ours = np.concatenate([np.zeros((1, ref.shape[-1]), np.float32), table])[None]
  return [compare('rd_pos_embed', ours, ref, TABLE_TOL)]


@SUITE.register('labels', requires=('fwd/teacher_features', 'fwd/labels',
                                    'batch/0/bool_masked_pos'))
def _labels(ctx: Context) -> list[Result]:
  return [compare('fwd/labels', ctx.labels, ctx.arrays['fwd/labels'], FORWARD_TOL)]


_HEAD_KEYS = ('student/init/mask_token', 'student/init/decoder.head.weight', 'fwd/encoder_out',
              'batch/0/bool_masked_pos')
_HEAD_FORWARD_KEYS = _HEAD_KEYS + ('fwd/teacher_features',)


@SUITE.register('regressor and decoder forward', requires=_HEAD_FORWARD_KEYS + (
    'fwd/regressor_out', 'fwd/latent_predict', 'fwd/outputs'))
def _head_forward(ctx: Context) -> list[Result]:
  run = ctx.head_run
  results = []
  if 'encoder_to_regresser_out' in run.sown or ctx.has('fwd/encoder_to_regresser_out'):
    results.append(compare('fwd/encoder_to_regresser_out', run.sown['encoder_to_regresser_out'],
                           ctx.arrays['fwd/encoder_to_regresser_out'], FORWARD_TOL))
  return results + [
      compare('fwd/regressor_out', run.sown['regressor_out'], ctx.arrays['fwd/regressor_out'],
              FORWARD_TOL),
      compare('fwd/latent_predict', run.latent_predict, ctx.arrays['fwd/latent_predict'],
              FORWARD_TOL),
      compare('fwd/outputs', run.outputs, ctx.arrays['fwd/outputs'], FORWARD_TOL)]


@SUITE.register('loss', requires=_HEAD_FORWARD_KEYS + ('fwd/token_loss', 'step/0/loss'))
def _loss(ctx: Context) -> list[Result]:
  return [
      compare('fwd/token_loss', caev2_loss.token_losses(ctx.head_run.outputs, ctx.labels),
              ctx.arrays['fwd/token_loss'], FORWARD_TOL),
      compare('step/0/loss', ctx.head_run.loss, ctx.arrays['step/0/loss'], LOSS_TOL)]


def _worst_per_part(ours: Mapping[str, np.ndarray], truth: Mapping[str, np.ndarray],
                    label: str) -> list[Result]:
  """Per official top-level part, the tensor furthest from the README's gradient criterion."""
  worst: dict[str, tuple[float, Result]] = {}
  for name, ref in truth.items():
    ref = np.asarray(ref, np.float64)
    err = float(np.max(np.abs(np.asarray(ours[name], np.float64) - ref)))
    scale = float(np.max(np.abs(ref)))
    bound = GRAD_REL_TOL * scale + GRAD_ABS_TOL
    part = name.split('.')[0]
    if part not in worst or err / bound > worst[part][0]:
      worst[part] = (err / bound, Result(f'{label}/{name} (worst of {part}*)', err, scale, bound,
                                         absolute=True))
  return [result for _, result in worst.values()]


@SUITE.register('regressor and decoder gradients',
                requires=_HEAD_FORWARD_KEYS + ('f64/step/0/grads/mask_token',))
def _head_gradients(ctx: Context) -> list[Result]:
  ours = ctx.head_run.grads
  truth = {k: v for k, v in ctx.group('f64/step/0/grads').items() if _is_head_param(k)}
  missing = sorted(set(truth) - set(ours))
  if missing:
    raise ValueError(f'The fixture has gradients of {missing}, which RegressorDecoder lacks.')
  return _worst_per_part(ours, truth, 'f64/step/0/grads')


@SUITE.register('schedules', requires=('step/0/lr', 'step/0/weight_decay'))
def _schedules(ctx: Context) -> list[Result]:
  sched = ctx.meta['schedule']
  results = []
  for name, (peak, final, total, warmup) in ctx.schedule_settings().items():
    ours = schedules.warmup_cosine(peak, final, total, warmup)
    results.append(compare(f'schedule/{name}', ours, sched[name], SCHEDULE_TOL))
  peak, final, total, warmup = ctx.schedule_settings()['lr']
  lr_fn = jax.jit(schedules.warmup_cosine_fn(peak, final, total, warmup))
  for k, it in enumerate(sched['iterations']):
    results.append(compare(f'step/{k}/lr', lr_fn(it), ctx.arrays[f'step/{k}/lr'],
                           STEP_SCHEDULE_TOL))
    # The optimiser applies the constant `--weight_decay` (see caev2.optim).
    results.append(compare(f'step/{k}/weight_decay', ctx.meta['args']['weight_decay'],
                           ctx.arrays[f'step/{k}/weight_decay'], SCHEDULE_TOL))
  return results


_METHOD_KEYS = ('student/init/encoder.cls_token', 'student/init/mask_token',
                'student/init/decoder.head.weight', 'teacher/visual.proj', 'batch/0/samples',
                'batch/0/images', 'batch/0/bool_masked_pos')


@SUITE.register('parameter groups', requires=_METHOD_KEYS)
def _parameter_groups(ctx: Context) -> list[Result]:
  """The method's groups of every student tensor against the release's (decay, frozen)."""
  opt = ctx.meta['optimizer']
  official = {name: group['weight_decay'] for group in opt['groups'] for name in group['params']}
  params = ctx.variables.params
  wd = ctx.meta['args']['weight_decay']
  # Official names of our leaves, each carrying its weight decay (NaN: frozen).
  marked = jax.tree.map(
      lambda p, g: np.full(p.shape, np.nan if g.frozen else g.wd_mult * wd),
      params, ctx.method.param_groups(params))
  ours = {name: float(np.max(v)) for name, v in caev2_convert.student_to_official(marked).items()}
  ours_frozen = {n for n, v in ours.items() if np.isnan(v)}
  wrong = [n for n, v in ours.items() if n not in ours_frozen and official.get(n) != v]
  absent = [n for n in official if not caev2_convert.NOT_PARAMETERS.match(n) and n not in ours]
  frozen = set(ctx.meta['frozen_params']) & set(ours)
  lr_scales = {group['lr_scale'] for group in opt['groups']}
  return [
      Result(f'groups of {len(ours)} student tensors: misassigned {wrong}', len(wrong), 0.0, 0.0,
             absolute=True),
      Result(f'official student tensors we lack: {absent}', len(absent), 0.0, 0.0,
             absolute=True),
      Result(f'frozen {sorted(ours_frozen)} vs official frozen {sorted(frozen)}',
             len(ours_frozen ^ frozen), 0.0, 0.0, absolute=True),
      compare('lr_scale of every group (capi_jax: 1)', np.ones(len(lr_scales)),
              sorted(lr_scales), 0.0, absolute=True)]


@SUITE.register('AdamW from the official gradients', requires=(
    'student/init/mask_token', 'step/0/grads/mask_token', 'step/1/grads/mask_token',
    'student/final/mask_token', 'step/0/grad_norm', 'step/1/grad_norm'))
def _adamw_from_official_gradients(ctx: Context) -> list[Result]:
  """Clip + AdamW on the fixture's float32 gradients, as flat trees of official tensors."""
  iterations = ctx.meta['schedule']['iterations']
  if list(iterations) != list(range(iterations[0], iterations[0] + len(iterations))):
    raise Skipped(f'the fixture\'s iterations {iterations} are not consecutive')
  init = ctx.group('student/init')
  grads = [ctx.group(f'step/{k}/grads') for k in range(len(iterations))]
  params = {name: jnp.asarray(init[name]) for name in grads[0]}
  peak, final, total, warmup = ctx.schedule_settings()['lr']
  lr_fn = schedules.warmup_cosine_fn(peak, final, total, warmup)
  opt = ctx.meta['optimizer']
  tx = caev2_optim.optimizer(
      core_optim.group_tree(params, caev2_optim.decay_group),
      lambda count: lr_fn(count + iterations[0]), weight_decay=ctx.meta['args']['weight_decay'],
      clip_grad=opt['clip_grad'], betas=tuple(opt['betas']), eps=opt['eps'])

  @jax.jit
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, optax.tree.norm(grads)

  state = tx.init(params)
  results = []
  for k, g in enumerate(grads):
    params, state, norm = step(params, state, {n: jnp.asarray(v) for n, v in g.items()})
    results.append(compare(f'step/{k}/grad_norm', norm, ctx.arrays[f'step/{k}/grad_norm'],
                           NORM_TOL))
  final_sd = ctx.group('student/final')
  err = {n: float(np.max(np.abs(np.asarray(p, np.float64) - final_sd[n])))
         for n, p in params.items()}
  worst = max(err, key=err.get)
  scale = max(float(np.max(np.abs(final_sd[n]))) for n in params)
  results.append(Result(f'student/final after {len(grads)} steps (worst: {worst})', err[worst],
                        scale, ADAMW_TOL))
  return results


def position_freq_chi2(generate: masking.MaskGenerator, n_masked: int, draws: int,
                       ref: np.ndarray, ref_draws: int, seed: int = MASKGEN_SEED) -> float:
  """Chi-square per position of `generate`'s mask frequencies against `ref` (h, w).

  Each position's difference is scaled by the binomial variances of both estimates.
  """
  rng = np.random.default_rng(seed)
  freq = sum(generate(n_masked, rng).astype(np.int64) for _ in range(draws)) / draws
  pooled = (freq * draws + ref * ref_draws) / (draws + ref_draws)
  var = pooled * (1 - pooled) * (1 / draws + 1 / ref_draws)
  # A position neither side ever masks (or always masks) agrees exactly.
  z2 = np.where(var > 0, np.square(freq - ref) / np.where(var > 0, var, 1.0), 0.0)
  return float(z2.mean())


def _maskgen_comparison(size: str) -> Callable[[Context], list[Result]]:
  def run(ctx: Context) -> list[Result]:
    cfg = ctx.meta['maskgen'][size]
    generate = masking.make_mask_generator(
        'BeitBlock', grid=tuple(cfg['grid']), min_aspect=cfg['min_aspect'],
        min_block_patches=cfg['min_num_patches'], max_block_patches=cfg['max_num_patches'])
    chi2 = position_freq_chi2(generate, cfg['num_mask_patches'], cfg['samples'],
                              ctx.arrays[f'maskgen/{size}/position_freq'], cfg['samples'])
    # A statistic, not an error: its scale is 1, its value for two samples of one distribution.
    return [Result(f'maskgen/{size}/position_freq: chi-square per position', chi2, 1.0,
                   MASKGEN_CHI2_PER_POSITION, absolute=True)]
  return run


for _size in ('tiny', 'small', 'base'):
  SUITE.register(f'block mask generator ({_size})',
                 requires=(f'maskgen/{_size}/position_freq',))(_maskgen_comparison(_size))


@SUITE.register('method: teacher features', requires=_METHOD_KEYS + ('fwd/teacher_features',))
def _method_teacher(ctx: Context) -> list[Result]:
  return [compare('fwd/teacher_features (method)', ctx.method_run.teacher_features,
                  ctx.arrays['fwd/teacher_features'], FORWARD_TOL)]


@SUITE.register('method: encoder on the visible patches',
                requires=_METHOD_KEYS + ('fwd/encoder_out',))
def _method_encoder(ctx: Context) -> list[Result]:
  return [compare('fwd/encoder_out (method)', ctx.method_run.encoder_out,
                  ctx.arrays['fwd/encoder_out'], FORWARD_TOL)]


@SUITE.register('method: student forward and loss', requires=_METHOD_KEYS + (
    'fwd/labels', 'fwd/outputs', 'step/0/loss'))
def _method_forward(ctx: Context) -> list[Result]:
  run = ctx.method_run
  return [compare('fwd/labels (method)', run.labels, ctx.arrays['fwd/labels'], FORWARD_TOL),
          compare('fwd/outputs (method)', run.outputs, ctx.arrays['fwd/outputs'], FORWARD_TOL),
          compare('step/0/loss (method)', run.metrics['loss'], ctx.arrays['step/0/loss'],
                  LOSS_TOL)]


@SUITE.register('method: gradients', requires=_METHOD_KEYS + (
    'f64/step/0/grads/encoder.cls_token', 'f64/step/0/grad_norm'))
def _method_gradients(ctx: Context) -> list[Result]:
  ours, truth = ctx.method_run.grads, ctx.group('f64/step/0/grads')
  missing = sorted(set(truth) - set(ours))
  if missing:
    raise ValueError(f'The fixture has gradients of {missing}, which the method lacks.')
  return [compare('f64/step/0/grad_norm (method)', ctx.method_run.metrics['grad_norm'],
                  ctx.arrays['f64/step/0/grad_norm'], NORM_TOL),
          *_worst_per_part(ours, truth, 'f64/step/0/grads (method)')]


def _at_schedule_step(opt_state: optax.OptState, step: int) -> optax.OptState:
  """`opt_state` with its schedule position at `step` and Adam's moments and count fresh: the
  release's optimiser when a run starts at iteration `step` (the fixture's `start_steps`)."""
  is_groups = lambda x: isinstance(x, core_optim.ScaleByGroupsState)
  return jax.tree.map(
      lambda x: x._replace(count=jnp.asarray(step, jnp.int32)) if is_groups(x) else x,
      opt_state, is_leaf=is_groups)


@SUITE.register('two training iterations (engine step)', requires=_METHOD_KEYS + (
    'batch/1/samples', 'batch/1/images', 'batch/1/bool_masked_pos', 'step/0/lr', 'step/1/lr',
    'f64/step/0/loss', 'f64/step/1/loss', 'f64/step/1/grad_norm',
    'f64/student/final/mask_token'))
def _two_training_iterations(ctx: Context) -> list[Result]:
  """The engine's train step with the method's optimiser, from the official initial weights on
  the fixture's batches, judged against the float64 re-run."""
  iterations = list(ctx.meta['schedule']['iterations'])
  if iterations != list(range(iterations[0], iterations[0] + len(iterations))):
    raise Skipped(f'the fixture\'s iterations {iterations} are not consecutive')
  method, variables = ctx.method, ctx.variables
  optimizer = method.optimizer(variables.params)
  state = state_lib.TrainState(
      step=jnp.asarray(iterations[0], jnp.int32), rng=jax.random.key(0),
      params=variables.params, frozen=variables.frozen, buffers=variables.buffers,
      opt_state=_at_schedule_step(optimizer.init(variables.params), iterations[0]))
  step_fn = jax.jit(step_lib.make_train_step(method, optimizer))
  results = []
  for k in range(len(iterations)):
    state, metrics = step_fn(state, ctx.batch(k))
    results += [
        compare(f'step/{k}/lr (engine)', metrics['lr'], ctx.arrays[f'step/{k}/lr'],
                STEP_SCHEDULE_TOL),
        compare(f'f64/step/{k}/loss (engine)', metrics['loss'], ctx.arrays[f'f64/step/{k}/loss'],
                LOSS_TOL),
        # From the second step on, the gradients carry the float32 differences of the updated
        # parameters, so the README's gradient criterion applies. (The largest part here:
        # `base.optim.adamw` takes optax's bias correction 1 - b2**t in float32, 1.3e-5 off at
        # t = 1, so the first update is 6e-6 shorter than torch's; the norm is then ~4e-6
        # off, where an exact correction, -expm1(t log b2), gives ~1e-7.)
        compare(f'f64/step/{k}/grad_norm (engine)', metrics['grad_norm'],
                ctx.arrays[f'f64/step/{k}/grad_norm'], NORM_TOL if k == 0 else GRAD_REL_TOL)]
  ours = caev2_convert.student_to_official(jax.device_get(state.params))
  truth = {n: v for n, v in ctx.group('f64/student/final').items()
           if not caev2_convert.NOT_PARAMETERS.match(n)}
  missing = sorted(set(truth) - set(ours))
  if missing:
    raise ValueError(f'The fixture has final values of {missing}, which the method lacks.')
  sum_lrs = float(sum(ctx.arrays[f'step/{k}/lr'] for k in range(len(iterations))))
  for label, names, tol in (
      ('', [n for n in truth if not _ZERO_GRADIENT.match(n)], PARAM_TOL),
      (', norm1_k.bias (zero gradient; atol = sum of lrs)',
       [n for n in truth if _ZERO_GRADIENT.match(n)], sum_lrs)):
    if not names:
      continue
    err = {n: float(np.max(np.abs(np.asarray(ours[n], np.float64) - truth[n]))) for n in names}
    worst = max(err, key=err.get)
    scale = max(float(np.max(np.abs(truth[n]))) for n in names)
    results.append(Result(f'f64/student/final after {len(iterations)} engine steps{label} '
                          f'(worst: {worst})', err[worst], scale, tol, absolute=True))
  return results
