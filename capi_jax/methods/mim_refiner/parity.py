r"""MIM-Refiner's parity suite: `python -m capi_jax.check_reference` on a MIM-Refiner fixture.

The fixture format is `tests/fixtures/mim_refiner_reference/README.md`. Every size comes from
the fixture: head widths and depths from the state_dict shapes, batch from the sample ids, the
number of views from the feature rows, k from `topk_index`, the number of global views,
temperatures, lrs and schedules from `meta_json`. Comparisons:
  - part A (`head/...`): every head's layer outputs, anchors, top-k and chosen neighbours,
    predictions, losses, alignments, nn-metrics, gradients of the summed loss w.r.t. its
    parameters and input, BatchNorm statistics and queue after the call; losses and gradients
    also against the float64 re-run (`head_f64/...`);
  - the schedules (`schedule/*`), the parameter groups (`meta.param_groups_stage3`,
    `meta.freezer_demo`) and every learning rate of part B (`stage*/step*/lr/*`);
  - part B's heads at update 0, fed the recorded pooled features (`stage*/step0/pooled/*`);
  - part B's refinement updates, which need the ViT encoder: reported as skipped.
Tolerances: forward values 1e-5 relative to max(1, |reference|); losses 2e-6; gradients 1e-5
of the head's largest gradient (the official float32 run is ~1e-6, <= 2.4e-7 and ~1e-6 from
float64 on the shipped fixture); indices and integer buffers exactly.
"""

from collections.abc import Mapping
import dataclasses
import functools
import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from capi_jax import check_reference
from capi_jax.check_reference import compare, Result, Skipped
from capi_jax.core import schedules
from capi_jax.methods.mim_refiner import heads
from capi_jax.methods.mim_refiner import objective
from capi_jax.methods.mim_refiner import optim
from capi_jax.methods.mim_refiner import queue

FORWARD_TOL = 1e-5
LOSS_TOL = 2e-6
GRAD_TOL = 1e-5  # times the head's largest gradient.
SCHEDULE_TOL = 1e-6  # times the peak lr (schedules are evaluated in float32, as in training).
# The official schedule template's end value (`zztemplates/schedules/wupcos_epoch.yaml`).
DEFAULT_END_LR = 1e-6

StateDict = dict[str, np.ndarray]
_LOSS_PARTS = ('total', 'global_loss', 'local_loss')
_INFOS = ('global_alignment', 'local_alignment')
_METRICS = ('nn-similarity', 'nn-age', 'nn-accuracy')


@dataclasses.dataclass(frozen=True)
class HeadState:
  """One head's module and variables, from an official NnclrHead state_dict."""
  head: heads.IdHead
  params: Any
  batch_stats: Any
  queue: queue.Queue

  @classmethod
  def from_official(cls, state_dict: Mapping[str, np.ndarray], in_dim: int) -> 'HeadState':
    head = heads.config_from_official(state_dict)
    params, batch_stats = heads.from_official(state_dict, head, in_dim)
    return cls(head, params, batch_stats, queue.from_official(state_dict))


@dataclasses.dataclass(frozen=True)
class Lookup:
  """How a head picks its neighbours in a recorded step: k and the recorded pick per row."""
  topk: int
  choice: np.ndarray  # (n_global * batch,)


@dataclasses.dataclass(frozen=True)
class HeadsRun:
  """What `run_heads` computed, with official names where the fixture has them."""
  loss_total: float
  losses: dict[str, dict[str, float]]  # head -> 'total' and nna_loss's parts
  outputs: dict[str, objective.HeadOutputs]
  param_grads: dict[str, StateDict]
  input_grads: dict[str, np.ndarray]
  stats_after: dict[str, StateDict]
  queue_after: dict[str, StateDict]


@functools.partial(jax.jit, static_argnames='head')
def _captured_layers(head: heads.IdHead, variables: Any, features: jax.Array) -> Any:
  is_layer = lambda module, _: isinstance(module, heads.LinearNorm)
  _, captured = head.apply(variables, features, mutable=['batch_stats', 'intermediates'],
                           capture_intermediates=is_layer)
  return captured['intermediates']


def layer_outputs(state: HeadState, features: np.ndarray) -> StateDict:
  """Every layer's output (after BatchNorm, and GELU where there is one) by official module
  name: 'projector.{i}', 'predictor.{i}'."""
  captured = _captured_layers(state.head, {'params': state.params,
                                           'batch_stats': state.batch_stats},
                              jnp.asarray(features, jnp.float32))
  return {f'{mlp}.{layer[len("layer"):]}': np.asarray(out['__call__'][0])
          for mlp in ('projector', 'predictor') for layer, out in captured[mlp].items()}


@functools.partial(jax.jit, static_argnames=('head', 'topk', 'n_global', 'temperature'))
def _head_step(head, params, batch_stats, queue_state, features, idx, labels, choice, *,
               topk, n_global, temperature):
  """One head's loss, outputs, gradients (params and features) and queue after the update."""
  def loss_fn(p, x):
    return objective.head_objective(head, p, batch_stats, queue_state, x, idx, labels, choice,
                                    n_global=n_global, topk=topk, temperature=temperature)

  (loss, out), (param_grads, input_grads) = jax.value_and_grad(
      loss_fn, argnums=(0, 1), has_aux=True)(params, features)
  new_queue = queue.enqueue(queue_state, out.enqueue_rows(idx.shape[0]), idx, labels)
  return loss, out, param_grads, input_grads, new_queue


def run_heads(states: Mapping[str, HeadState], features: Mapping[str, np.ndarray],
              idx: np.ndarray, labels: np.ndarray, lookups: Mapping[str, Lookup],
              n_global: int, temperature: float) -> HeadsRun:
  """The heads' part of one official step: losses summed over heads, the gradient of the sum
  w.r.t. every head's params and input features (heads share nothing, so each head's share is
  its own loss's gradient), then the buffers' post-update (BatchNorm statistics, queue)."""
  idx, labels = jnp.asarray(idx, jnp.int32), jnp.asarray(labels, jnp.int32)
  steps = {h: _head_step(s.head, s.params, s.batch_stats, s.queue,
                         jnp.asarray(features[h], jnp.float32), idx, labels,
                         jnp.asarray(lookups[h].choice, jnp.int32), topk=lookups[h].topk,
                         n_global=n_global, temperature=temperature)
           for h, s in states.items()}
  return HeadsRun(
      # Summed in float32 in head order, as the official trainer does.
      loss_total=float(sum(s[0] for s in steps.values())),
      losses={h: {'total': float(s[0]), **{k: float(v) for k, v in s[1].parts.items()}}
              for h, s in steps.items()},
      outputs={h: s[1] for h, s in steps.items()},
      param_grads={h: heads.to_official(s[2]) for h, s in steps.items()},
      input_grads={h: np.asarray(s[3]) for h, s in steps.items()},
      stats_after={h: heads.to_official({}, s[1].batch_stats) for h, s in steps.items()},
      queue_after={h: queue.to_official(s[4]) for h, s in steps.items()})


class Context:
  """The fixture's arrays and meta, and the runs every comparison reads (computed once)."""

  def __init__(self, arrays: Mapping[str, np.ndarray]):
    self.arrays = arrays
    self.meta = json.loads(str(arrays['meta_json'])) if 'meta_json' in arrays else {}

  def has(self, *keys: str) -> bool:
    return all(k in self.arrays for k in keys)

  def state_dict(self, prefix: str) -> StateDict:
    """Arrays whose key starts with `prefix` (ending in '/' or '.'), the prefix stripped."""
    return {k[len(prefix):]: v for k, v in self.arrays.items() if k.startswith(prefix)}

  def meta_section(self, *path: str) -> Any:
    """meta[path[0]][path[1]]...; `Skipped` naming the missing key."""
    node = self.meta
    for i, key in enumerate(path):
      if not isinstance(node, Mapping) or key not in node:
        raise Skipped(f'meta_json has no {".".join(path[:i + 1])}')
      node = node[key]
    return node

  def lookup(self, prefix: str) -> Lookup:
    """k and the recorded pick from `<prefix>/topk_index` and `<prefix>/choice` (absent: k=1)."""
    topk_index = self.arrays[f'{prefix}/topk_index']
    choice = self.arrays.get(f'{prefix}/choice', np.zeros(topk_index.shape[0], np.int64))
    return Lookup(topk=int(topk_index.shape[1]), choice=np.asarray(choice))

  @functools.cached_property
  def part_a_heads(self) -> list[str]:
    names = self.meta.get('head', {}).get('heads')
    if names is None:
      names = sorted(k.split('/')[1] for k in self.arrays
                     if k.startswith('head/') and k.endswith('/input'))
    return list(names)

  @functools.cached_property
  def part_a_states(self) -> dict[str, HeadState]:
    return {h: HeadState.from_official(self.state_dict(f'head/{h}/init/'),
                                       self.arrays[f'head/{h}/input'].shape[1])
            for h in self.part_a_heads}

  @functools.cached_property
  def part_a(self) -> HeadsRun:
    states = self.part_a_states
    return run_heads(
        states, {h: self.arrays[f'head/{h}/input'] for h in states}, self.arrays['head/idx'],
        self.arrays['head/cls'], {h: self.lookup(f'head/{h}/queue') for h in states},
        n_global=int(self.meta_section('head', 'n_global')),
        temperature=float(self.meta_section('head', 'temperature')))

  @functools.cached_property
  def refine_heads(self) -> list[str]:
    return list(self.meta_section('refine', 'heads'))

  def part_b_step0(self, stage: str) -> HeadsRun:
    """`stage`'s heads at update 0 on the recorded pooled features; both stages start from
    `stage3/init` (the README)."""
    states = {}
    for h in self.refine_heads:
      features = self.arrays[f'{stage}/step0/pooled/{h}']
      states[h] = HeadState.from_official(self.state_dict(f'stage3/init/heads.{h}.'),
                                          features.shape[1])
    return run_heads(
        states, {h: self.arrays[f'{stage}/step0/pooled/{h}'] for h in states},
        self.arrays['batch0/idx'], self.arrays['batch0/cls'],
        {h: self.lookup(f'{stage}/step0/queue/{h}') for h in states},
        n_global=int(self.meta_section('refine', 'n_global')),
        temperature=float(self.meta_section('refine', 'temperature')))


def _matches(arrays: Mapping[str, np.ndarray]) -> bool:
  """MIM-Refiner fixtures hold NnclrHead calls (part A) or ContrastiveModel states (part B)."""
  return 'head/idx' in arrays or any(k.startswith('stage3/init/heads.') for k in arrays)


SUITE = check_reference.Suite('mim_refiner', _matches, Context)


# ---------------------------------------------------------------------------- helpers
def _relative(quantity: str, ours: Any, ref: Any, tolerance: float, scale: float) -> Result:
  """`ours` vs `ref` within tolerance x scale (absolute)."""
  result = compare(quantity, ours, ref, tolerance * scale, absolute=True)
  return dataclasses.replace(result, scale=scale)


def _worst(quantity: str, ours: StateDict, refs: StateDict, tolerance: float,
           scale: float) -> Result:
  """One row for several named arrays: the worst error (naming its array) within
  tolerance x scale, absolute."""
  if set(ours) != set(refs):
    raise ValueError(f'{quantity}: names {sorted(ours)} differ from the reference '
                     f'{sorted(refs)}.')
  errors = {n: float(np.max(np.abs(np.asarray(ours[n], np.float64) - refs[n])))
            for n in refs}
  name = max(errors, key=errors.get)
  return Result(f'{quantity} (worst: {name})', errors[name], scale, tolerance * scale,
                absolute=True)


def _head_losses(run: HeadsRun, h: str, loss_ref: StateDict, info_ref: StateDict,
                 prefix: str) -> list[Result]:
  results = [compare(f'{prefix}/loss/{k}', run.losses[h][k], loss_ref[k], LOSS_TOL)
             for k in _LOSS_PARTS if k in loss_ref]
  results += [compare(f'{prefix}/info/{k}', run.losses[h][k], info_ref[k], LOSS_TOL)
              for k in _INFOS if k in info_ref]
  return results


# ---------------------------------------------------------------------------- part A
@SUITE.register('part A: head forward', requires=('head/idx', 'head/cls'))
def _part_a_forward(ctx: Context) -> list[Result]:
  run, results = ctx.part_a, []
  for h in ctx.part_a_heads:
    acts = ctx.state_dict(f'head/{h}/act/')
    ours = layer_outputs(ctx.part_a_states[h], ctx.arrays[f'head/{h}/input'])
    results += [compare(f'head/{h}/act/{n}', ours[n], acts[n], FORWARD_TOL)
                for n in sorted(acts)]
    out = run.outputs[h]
    results += [
        compare(f'head/{h}/projected_preswap', out.anchors,
                ctx.arrays[f'head/{h}/projected_preswap'], FORWARD_TOL),
        compare(f'head/{h}/predicted', out.predicted, ctx.arrays[f'head/{h}/predicted'],
                FORWARD_TOL)]
  return results


@SUITE.register('part A: queue lookup and update', requires=('head/idx', 'head/cls'))
def _part_a_queue(ctx: Context) -> list[Result]:
  run, results = ctx.part_a, []
  for h in ctx.part_a_heads:
    found = run.outputs[h].lookup
    results += [
        compare(f'head/{h}/queue/topk_index', found.topk_index,
                ctx.arrays[f'head/{h}/queue/topk_index'], 0.0, absolute=True),
        compare(f'head/{h}/queue/nn_index', found.nn_index,
                ctx.arrays[f'head/{h}/queue/nn_index'], 0.0, absolute=True),
        compare(f'head/{h}/projected_postswap', found.neighbours,
                ctx.arrays[f'head/{h}/projected_postswap'], FORWARD_TOL)]
    results += [compare(f'head/{h}/metric/{m}', found.metrics[m],
                        ctx.arrays[f'head/{h}/metric/{m}'], FORWARD_TOL) for m in _METRICS]
    after = ctx.state_dict(f'head/{h}/after/')
    for name, ours in run.queue_after[h].items():
      exact = name != 'queue.x'
      results.append(compare(f'head/{h}/after/{name}', ours, after[name],
                             0.0 if exact else FORWARD_TOL, absolute=exact))
  return results


@SUITE.register('part A: losses', requires=('head/idx', 'head/cls', 'head/loss_total'))
def _part_a_losses(ctx: Context) -> list[Result]:
  run, results = ctx.part_a, []
  for h in ctx.part_a_heads:
    results += _head_losses(run, h, ctx.state_dict(f'head/{h}/loss/'),
                            ctx.state_dict(f'head/{h}/info/'), f'head/{h}')
  results.append(compare('head/loss_total', run.loss_total, ctx.arrays['head/loss_total'],
                         LOSS_TOL))
  return results


def _gradients(ctx: Context, run: HeadsRun, h: str, prefix: str) -> list[Result]:
  """`<prefix>/<h>/grad/*` and `input_grad` within GRAD_TOL of the largest gradient."""
  ref = ctx.state_dict(f'{prefix}/{h}/grad/')
  if not ref:
    raise Skipped(f'the fixture has no {prefix}/{h}/grad/*')
  largest = max(float(np.max(np.abs(g))) for g in ref.values())
  return [_worst(f'{prefix}/{h}/grad/*', run.param_grads[h], ref, GRAD_TOL, largest),
          _relative(f'{prefix}/{h}/input_grad', run.input_grads[h],
                    ctx.arrays[f'{prefix}/{h}/input_grad'], GRAD_TOL, largest)]


@SUITE.register('part A: gradients', requires=('head/idx', 'head/cls'))
def _part_a_gradients(ctx: Context) -> list[Result]:
  return [r for h in ctx.part_a_heads for r in _gradients(ctx, ctx.part_a, h, 'head')]


@SUITE.register('part A: BatchNorm statistics after the call', requires=('head/idx', 'head/cls'))
def _part_a_statistics(ctx: Context) -> list[Result]:
  run, results = ctx.part_a, []
  for h in ctx.part_a_heads:
    after = ctx.state_dict(f'head/{h}/after/')
    ref = {n: after[n] for n in run.stats_after[h]}
    results.append(_worst(f'head/{h}/after/running_*', run.stats_after[h], ref, FORWARD_TOL,
                          max(1.0, max(float(np.max(np.abs(r))) for r in ref.values()))))
  return results


@SUITE.register('part A: against the float64 re-run',
                requires=('head/idx', 'head/cls', 'head_f64/loss_total'))
def _part_a_float64(ctx: Context) -> list[Result]:
  run, results = ctx.part_a, []
  for h in ctx.part_a_heads:
    results += _head_losses(run, h, ctx.state_dict(f'head_f64/{h}/loss/'),
                            ctx.state_dict(f'head_f64/{h}/info/'), f'head_f64/{h}')
    results += _gradients(ctx, run, h, 'head_f64')
  results.append(compare('head_f64/loss_total', run.loss_total,
                         ctx.arrays['head_f64/loss_total'], LOSS_TOL))
  return results


# ---------------------------------------------------------------------------- optimisation
def _schedule(peak: float, settings: Mapping[str, Any], epochs_key: str
              ) -> schedules.ScheduleFn:
  upe = int(settings['updates_per_epoch'])
  return optim.warmup_cosine(
      peak, warmup_updates=int(settings['warmup_epochs']) * upe,
      total_updates=int(settings[epochs_key]) * upe,
      end_value=float(settings.get('end_value', DEFAULT_END_LR)))


@SUITE.register('schedules')
def _schedules(ctx: Context) -> list[Result]:
  results = []
  for name, settings in ctx.meta_section('schedule').items():
    key = f'schedule/{name}'
    if key not in ctx.arrays:
      raise Skipped(f'the fixture has no {key}')
    ref = ctx.arrays[key]
    fn = jax.jit(jax.vmap(_schedule(float(settings['peak_lr']), settings, 'epochs')))
    ours = fn(jnp.arange(len(ref)))
    results.append(_relative(key, ours, ref, SCHEDULE_TOL, float(settings['peak_lr'])))
  return results


def _freeze_end_percent(ctx: Context) -> float | None:
  """`meta.refine.freezer` as the block freezer's end_percent (None: no freezer)."""
  freezer = ctx.meta_section('refine').get('freezer')
  if freezer is None or isinstance(freezer, (int, float)):
    return freezer
  if isinstance(freezer, Mapping) and 'end_percent' in freezer and not (
      {'start_index', 'start_percent', 'end_index', 'indices'} & set(freezer)):
    return float(freezer['end_percent'])
  raise Skipped(f'meta.refine.freezer {freezer} is not a block freezer by end_percent')


def _group_rule(ctx: Context, submodel: str):
  """(name, ndim) -> ParamGroup for a stage-3 submodel, settings from meta.refine."""
  refine = ctx.meta_section('refine')
  if submodel == 'encoder':
    return functools.partial(
        optim.encoder_group, depth=int(refine['vit']['depth']),
        weight_decay=float(refine['wd_encoder']), layer_decay=float(refine['llrd']),
        freeze_end_percent=_freeze_end_percent(ctx))
  return functools.partial(optim.head_group, weight_decay=float(refine['wd_heads']))


def _ndim(ctx: Context, submodel: str, name: str) -> int:
  return ctx.arrays[f'stage3/init/{submodel}.{name}'].ndim


@SUITE.register('parameter groups (stage 3)')
def _param_groups(ctx: Context) -> list[Result]:
  results = []
  for submodel, section in ctx.meta_section('param_groups_stage3').items():
    rule = _group_rule(ctx, submodel)
    ours = {n: rule(n, _ndim(ctx, submodel, n)) for n in section['params']}
    for field, official in (('lr_scale', 'lr_scale'), ('weight_decay', 'weight_decay'),
                            ('trainable', 'requires_grad')):
      results.append(_worst(
          f'param_groups_stage3/{submodel}/{official}',
          {n: float(getattr(g, field)) for n, g in ours.items()},
          {n: float(p[official]) for n, p in section['params'].items()}, 1e-12, 1.0))
  return results


@SUITE.register('block freezer')
def _freezer(ctx: Context) -> list[Result]:
  demo = ctx.meta_section('freezer_demo')
  names = list(ctx.meta_section('param_groups_stage3', 'encoder', 'params'))
  depth = int(ctx.meta_section('refine', 'vit', 'depth'))
  ours = {n for n in names if optim.frozen_by_block_freezer(n, depth, float(demo['end_percent']))}
  wrong = ours.symmetric_difference(demo['frozen'])
  return [Result(f'freezer_demo (end_percent {demo["end_percent"]}): names frozen differently'
                 f'{": " + ", ".join(sorted(wrong)) if wrong else ""}', len(wrong), 0.0, 0.0,
                 absolute=True)]


@SUITE.register('learning rates (part B)')
def _learning_rates(ctx: Context) -> list[Result]:
  refine = ctx.meta_section('refine')
  groups = ctx.meta_section('param_groups_stage3')
  results = []
  for stage in ('stage3', 'stage2'):
    peak = optim.scaled_lr(float(refine[f'lr_{stage}']), int(refine['batch']))
    schedule = _schedule(peak, refine['schedule'], 'max_epochs')
    t = 0
    while any(k.startswith(f'{stage}/step{t}/lr/') for k in ctx.arrays):
      lr = float(schedule(t))
      for submodel, section in groups.items():
        key = f'{stage}/step{t}/lr/{submodel}'
        if key not in ctx.arrays:
          continue
        rule = _group_rule(ctx, submodel)
        ours = [(rule(n, _ndim(ctx, submodel, n)), p['requires_grad'])
                for n, p in section['params'].items()]
        ref = ctx.arrays[key]
        if len(ref) != len(ours):  # The optimiser may list only trainable parameters.
          ours = [o for o in ours if o[1]]
        if len(ref) != len(ours):
          raise Skipped(f'{key} has {len(ref)} entries; meta.param_groups_stage3.{submodel} '
                        f'names {len(section["params"])} parameters')
        results.append(_relative(key, [g.lr_scale * lr for g, _ in ours], ref, SCHEDULE_TOL,
                                 peak))
      t += 1
  if not results:
    raise Skipped('the fixture has no stage*/step*/lr/*')
  return results


# ---------------------------------------------------------------------------- part B
def _part_b_heads(ctx: Context, stage: str) -> list[Result]:
  if not all(ctx.has(f'{stage}/step0/pooled/{h}') for h in ctx.refine_heads):
    raise Skipped(f'the fixture has no {stage}/step0/pooled/<head>')
  run, results = ctx.part_b_step0(stage), []
  for h in ctx.refine_heads:
    out, prefix = run.outputs[h], f'{stage}/step0'
    results += [
        compare(f'{prefix}/head/{h}/projected_preswap', out.anchors,
                ctx.arrays[f'{prefix}/head/{h}/projected_preswap'], FORWARD_TOL),
        compare(f'{prefix}/queue/{h}/topk_index', out.lookup.topk_index,
                ctx.arrays[f'{prefix}/queue/{h}/topk_index'], 0.0, absolute=True),
        compare(f'{prefix}/queue/{h}/nn_index', out.lookup.nn_index,
                ctx.arrays[f'{prefix}/queue/{h}/nn_index'], 0.0, absolute=True),
        compare(f'{prefix}/head/{h}/projected_postswap', out.lookup.neighbours,
                ctx.arrays[f'{prefix}/head/{h}/projected_postswap'], FORWARD_TOL),
        compare(f'{prefix}/head/{h}/predicted', out.predicted,
                ctx.arrays[f'{prefix}/head/{h}/predicted'], FORWARD_TOL)]
    for run_prefix in (prefix, f'{stage}_f64/step0'):
      losses = ctx.state_dict(f'{run_prefix}/loss/heads.{h}.')
      infos = {k: ctx.arrays[f'{run_prefix}/info/{k}/{h}'] for k in _INFOS
               if ctx.has(f'{run_prefix}/info/{k}/{h}')}
      results += _head_losses(run, h, losses, infos, f'{run_prefix}/{h}')
    results += [compare(f'{prefix}/info/{m}/{h}', out.lookup.metrics[m],
                        ctx.arrays[f'{prefix}/info/{m}/{h}'], FORWARD_TOL)
                for m in _METRICS if ctx.has(f'{prefix}/info/{m}/{h}')]
  for run_prefix in (f'{stage}/step0', f'{stage}_f64/step0'):
    if ctx.has(f'{run_prefix}/loss/total'):
      results.append(compare(f'{run_prefix}/loss/total', run.loss_total,
                             ctx.arrays[f'{run_prefix}/loss/total'], LOSS_TOL))
  return results


@SUITE.register('part B: stage-3 heads at update 0', requires=('batch0/idx', 'batch0/cls'))
def _stage3_heads(ctx: Context) -> list[Result]:
  return _part_b_heads(ctx, 'stage3')


@SUITE.register('part B: stage-2 heads at update 0', requires=('batch0/idx', 'batch0/cls'))
def _stage2_heads(ctx: Context) -> list[Result]:
  return _part_b_heads(ctx, 'stage2')


@SUITE.register('part B: refinement updates (encoder, heads, EMA)',
                requires=('stage3/init/encoder.patch_embed.proj.weight',))
def _refinement_updates(ctx: Context) -> list[Result]:
  del ctx
  raise Skipped('needs the standard ViT encoder (pre-norm, sin-cos position embedding), '
                'which capi_jax.models does not have yet')
