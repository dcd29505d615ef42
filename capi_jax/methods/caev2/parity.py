r"""CAE v2's parity suite: `python -m capi_jax.check_reference` on a CAE v2 fixture.

The fixture format is `tests/fixtures/caev2_reference/README.md`. Sizes come from the arrays
(grid from the masks, widths and depth from the official tensors) and, where no array says it,
from `meta_json` (regressor heads, LayerNorm epsilon, schedule and optimiser settings).

Compared without the encoder and the teacher:
  - the regressor's fixed sin-cos table against `rd_pos_embed`;
  - the labels from `fwd/teacher_features`;
  - regressor and decoder from `fwd/encoder_out` (`fwd/encoder_to_regresser_out`,
    `fwd/regressor_out`, `fwd/latent_predict`, `fwd/outputs`), per-token losses and the loss;
  - the gradients of the parameters after the encoder (mask token, projection, regressor,
    decoder): they do not act on the encoder's output, so the loss's gradient with respect to
    them is the same with that output held fixed, and comparable with the fixture's;
  - the lr and weight-decay schedules, the parameter groups;
  - torch's clip and AdamW over two iterations fed with the fixture's own float32 gradients,
    against the official float32 parameters after them;
  - the block mask generator's per-position frequencies (public fixture only), statistically.
The encoder and teacher forwards and the full training iterations (own gradients, judged
against `f64/student/final`) need the ViT family and are listed as skipped.
"""

from collections.abc import Callable, Mapping
import functools
import json
import re
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from capi_jax import check_reference
from capi_jax import convert
from capi_jax.check_reference import compare, Result, Skipped
from capi_jax.core import schedules
from capi_jax.data import masking
from capi_jax.methods.caev2 import loss as caev2_loss
from capi_jax.methods.caev2 import optim as caev2_optim
from capi_jax.methods.caev2 import regressor

FORWARD_TOL = 2e-5  # README: activations `fwd/*` atol 2e-5.
LOSS_TOL = 1e-6
TABLE_TOL = 1e-6  # the sin-cos table is within an ulp of the release's
SCHEDULE_TOL = 1e-10  # float64 arrays against float64 arrays
STEP_SCHEDULE_TOL = 1e-9  # our jitted float32 schedule at the fixture's iterations
GRAD_REL_TOL, GRAD_ABS_TOL = 1e-5, 1e-8  # README: |g - g_f64| <= 1e-5 max|g_f64| + 1e-8
NORM_TOL = 1e-6
# Same float32 gradients in, so only the two updates' float32 rounding separates the results.
ADAMW_TOL = 1e-6
# Per-position mask frequencies: the chi-square statistic per position of (ours - fixture)
# against the two binomial variances. Same generator: 0.5-1.05 over seeds (positions of one mask
# are not independent); a generator with another block size or aspect range: 2.5-3.3.
MASKGEN_CHI2_PER_POSITION = 1.5
MASKGEN_SEED = 0

# Official names of the tensors after the encoder (the rest are the encoder's).
_HEAD_NAME = re.compile(r'^(mask_token|encoder_to_regresser.*|regresser\..*|decoder\..*)$')
# Official tensors that are not parameters of `RegressorDecoder`: the frozen table (a constant
# here) and `regresser.norm`, which CAE v2 never applies.
_NOT_PARAMS = re.compile(r'^(rd_pos_embed|regresser\.norm\..*)$')


def _is_head_param(name: str) -> bool:
  return bool(_HEAD_NAME.match(name)) and not _NOT_PARAMS.match(name)


class HeadRun(NamedTuple):
  """What `RegressorDecoder` and the loss compute from the fixture's encoder output."""
  outputs: jax.Array  # (B, 1 + N, C) unit rows
  latent_predict: jax.Array  # (B, N_m, D_r)
  loss: jax.Array  # ()
  sown: dict[str, jax.Array]  # 'regressor_out', and 'encoder_to_regresser_out' when D_r != D
  grads: dict[str, np.ndarray]  # d loss / d params, official names and layouts


class Context:
  """The fixture's arrays and what the comparisons derive from them (computed once)."""

  def __init__(self, arrays: Mapping[str, np.ndarray]):
    self.arrays = arrays
    self.meta = json.loads(str(arrays['meta_json']))

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

  @functools.cached_property
  def indices(self) -> tuple[np.ndarray, np.ndarray]:
    """Batch 0's (visible, masked) patch indices, (B, N_v) and (B, N_m), each ascending."""
    masks = self.arrays['batch/0/bool_masked_pos']
    masked = masks.reshape(masks.shape[0], -1)
    counts = masked.sum(axis=1)
    if not np.all(counts == counts[0]):
      raise ValueError(f'batch/0/bool_masked_pos masks {counts.tolist()} patches per image; the '
                       'release needs the same count in every image.')
    visible, masked_idx = regressor.split_by_mask(masked, int(counts[0]))
    return np.asarray(visible), np.asarray(masked_idx)

  # ------------------------------------------------------------------ regressor + decoder
  @functools.cached_property
  def head_init(self) -> dict[str, np.ndarray]:
    """The official initial tensors after the encoder, parameters only."""
    return {k: v for k, v in self.group('student/init').items() if _is_head_param(k)}

  @functools.cached_property
  def module(self) -> regressor.RegressorDecoder:
    sd = self.head_init
    width = sd['mask_token'].shape[-1]
    hidden = sd['regresser.regressor_blocks.0.mlp_cross.fc1.weight'].shape[0]
    if hidden % width:
      raise ValueError(f'The regressor MLP is {hidden} wide for width {width}: capi_jax needs an '
                       'integer mlp_ratio.')
    depth = len({k.split('.')[2] for k in sd if k.startswith('regresser.regressor_blocks.')})
    student = self.meta['student']
    return regressor.RegressorDecoder(
        grid=self.grid, embed_dim=width, depth=depth, num_heads=student['decoder_num_heads'],
        out_dim=sd['decoder.head.weight'].shape[0], mlp_ratio=hidden // width,
        norm_eps=student['norm_eps'])

  @functools.cached_property
  def init_params(self) -> Any:
    """`head_init` as `RegressorDecoder` params (every name and shape checked)."""
    latents = self.arrays['fwd/encoder_out']
    visible, masked = self.indices
    expected = jax.eval_shape(self.module.init, jax.random.key(0), latents, visible, masked)
    return convert.caev2_regressor_to_flax(self.head_init, expected['params'])

  @functools.cached_property
  def head_run(self) -> 'HeadRun':
    """The module from `init_params` on the fixture's encoder output, in one jitted call."""
    visible, masked = self.indices
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
                   convert.caev2_regressor_to_official(jax.device_get(grads)))

  @functools.cached_property
  def labels(self) -> jax.Array:
    visible, masked = self.indices
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


def _matches(arrays: Mapping[str, np.ndarray]) -> bool:
  """CAE v2 fixtures hold the official regressor (`regresser.*`, `rd_pos_embed`)."""
  return any('regresser.' in k or k.endswith('/rd_pos_embed') for k in arrays)


SUITE = check_reference.Suite('caev2', _matches, Context)


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
  for name, (base, final, total, warmup) in ctx.schedule_settings().items():
    ours = schedules.warmup_cosine(base, final, total, warmup)
    results.append(compare(f'schedule/{name}', ours, sched[name], SCHEDULE_TOL))
  base, final, total, warmup = ctx.schedule_settings()['lr']
  lr_fn = jax.jit(schedules.warmup_cosine_fn(base, final, total, warmup))
  for k, it in enumerate(sched['iterations']):
    results.append(compare(f'step/{k}/lr', lr_fn(it), ctx.arrays[f'step/{k}/lr'],
                           STEP_SCHEDULE_TOL))
    # The optimiser applies the constant `--weight_decay` (see caev2.optim).
    results.append(compare(f'step/{k}/weight_decay', ctx.meta['args']['weight_decay'],
                           ctx.arrays[f'step/{k}/weight_decay'], SCHEDULE_TOL))
  return results


@SUITE.register('parameter groups', requires=_HEAD_KEYS)
def _parameter_groups(ctx: Context) -> list[Result]:
  """Our groups of the parameters after the encoder against the release's (names, decay)."""
  opt = ctx.meta['optimizer']
  official = {name: group['weight_decay'] for group in opt['groups'] for name in group['params']}
  params = ctx.init_params
  mults = caev2_optim.weight_decay_mults(params)
  # Official names of our leaves, each carrying its decay multiplier.
  ours = {name: float(np.max(v)) for name, v in convert.caev2_regressor_to_official(
      jax.tree.map(lambda p, m: np.full(p.shape, m), params, mults)).items()}
  wd = ctx.meta['args']['weight_decay']
  wrong = [n for n, m in ours.items() if official.get(n) != m * wd]
  absent = [n for n in official if _is_head_param(n) and n not in ours]
  frozen = [n for n in ctx.meta['frozen_params'] if n in ours]
  lr_scales = {group['lr_scale'] for group in opt['groups']}
  return [
      Result(f'groups of {len(ours)} tensors after the encoder: misassigned {wrong}', len(wrong),
             0.0, 0.0, absolute=True),
      Result(f'official tensors after the encoder we lack: {absent}', len(absent), 0.0, 0.0,
             absolute=True),
      Result(f'frozen tensors we would optimise: {frozen}', len(frozen), 0.0, 0.0,
             absolute=True),
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
  base, final, total, warmup = ctx.schedule_settings()['lr']
  lr_fn = schedules.warmup_cosine_fn(base, final, total, warmup)
  opt = ctx.meta['optimizer']
  tx = caev2_optim.optimizer(
      params, lambda count: lr_fn(count + iterations[0]), weight_decay=ctx.meta['args'][
          'weight_decay'], clip_grad=opt['clip_grad'], betas=tuple(opt['betas']), eps=opt['eps'])

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


@SUITE.register('teacher, encoder and two training iterations',
                requires=('teacher/visual.proj', 'f64/student/final/mask_token'))
def _needs_the_vit(ctx: Context) -> list[Result]:
  del ctx
  raise Skipped('needs the ViT encoder and the CLIP teacher (capi_jax.models.vit), which CAE v2 '
                'part 2 assembles: teacher_features, encoder_out, the full gradients and the '
                'two AdamW steps against f64/student/final')
