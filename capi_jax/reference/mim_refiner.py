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
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import ml_collections

from capi_jax.base import interface
from capi_jax.base import schedules
from capi_jax.engine import state as state_lib
from capi_jax.engine import step as step_lib
from capi_jax.methods.mim_refiner import heads
from capi_jax.methods.mim_refiner import method as mim_method
from capi_jax.methods.mim_refiner import objective
from capi_jax.methods.mim_refiner import optim
from capi_jax.methods.mim_refiner import queue
from capi_jax.models import vit
from capi_jax.reference import harness
from capi_jax.reference.harness import compare, Result, Skipped
from capi_jax.weights import vit as vit_weights

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

  def __init__(self, arrays: Mapping[str, np.ndarray], scan_layers: bool = False):
    self.arrays = arrays
    self.meta = json.loads(str(arrays['meta_json'])) if 'meta_json' in arrays else {}
    self.scan_layers = scan_layers

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


SUITE = harness.Suite('mim_refiner', _matches, Context)


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
  return schedules.wupcos_fn(
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
  """(name, ndim) -> Group for a stage-3 submodel, settings from meta.refine."""
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
    for official, value in (('lr_scale', lambda g: g.lr_mult),
                            ('weight_decay', lambda g: g.wd_mult),
                            ('requires_grad', lambda g: not g.frozen)):
      results.append(_worst(
          f'param_groups_stage3/{submodel}/{official}',
          {n: float(value(g)) for n, g in ours.items()},
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
        if len(ref) != len(ours):  # The optimiser may list only parameters not frozen.
          ours = [o for o in ours if o[1]]
        if len(ref) != len(ours):
          raise Skipped(f'{key} has {len(ref)} entries; meta.param_groups_stage3.{submodel} '
                        f'names {len(section["params"])} parameters')
        results.append(_relative(key, [g.lr_mult * lr for g, _ in ours], ref, SCHEDULE_TOL,
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


# ---------------------------------------------------------------------------- part B updates
# The release's ViT kinds -> `vit.FAMILIES` (their official names are MIM-Refiner's own).
_VIT_KINDS = {'vit.vit': 'kappamodules', 'vit.data2vec2_vit': 'data2vec2'}
# Parameters after the updates are judged against the float64 re-run (README): at most
# F64_FACTOR times the official float32 run's own distance from it, per parameter, with a floor.
F64_FACTOR = 2.0
F64_FLOOR = 1e-5
# Step losses against the official float32 run: the README's ~1e-4 at update 1 comes from the
# zero-gradient entries' rounding noise (the official run is that far from float64 too).
STEP_LOSS_TOL = 5e-4
# The README's alternative criterion: outside the zero-gradient entries, this far from float64.
TIGHT_TOL = 3e-5


def _batch(ctx: Context, t: int) -> dict[str, np.ndarray]:
  """Update t's batch in the method's layout (views NHWC, sample-major)."""
  views = lambda key: np.moveaxis(ctx.arrays[f'batch{t}/{key}'], (0, 2), (1, 4))
  return {'global_views': views('global_views'), 'local_views': views('local_views'),
          'index': ctx.arrays[f'batch{t}/idx'], 'label': ctx.arrays[f'batch{t}/cls']}


def _encoder_family(ctx: Context) -> str:
  kind = ctx.meta_section('refine', 'vit', 'kind')
  if kind not in _VIT_KINDS:
    raise Skipped(f'meta.refine.vit.kind {kind!r} is not one of {sorted(_VIT_KINDS)}')
  return _VIT_KINDS[kind]


def refinement_config(ctx: Context, stage: str) -> ml_collections.ConfigDict:
  """The fixture's run (`meta.refine`, sizes from the arrays) as a capi_jax MIM-Refiner config."""
  refine, v = ctx.meta_section('refine'), ctx.meta_section('refine', 'vit')
  if int(v.get('num_cls_tokens', 1)) != 1:
    raise Skipped(f"vit.ViT has one class token; the fixture's encoder has {v['num_cls_tokens']}")
  n_global, batch, _, size, _ = ctx.arrays['batch0/global_views'].shape
  n_local, _, _, local_size, _ = ctx.arrays['batch0/local_views'].shape
  first = ctx.refine_heads[0]
  head = heads.config_from_official(ctx.state_dict(f'stage3/init/heads.{first}.'))
  schedule = refine['schedule']
  upe = int(schedule['updates_per_epoch'])
  family = _encoder_family(ctx)
  model = dict(vit.FAMILIES[family], norm_eps=float(v['eps']), patch_size=int(v['patch_size']),
               image_size=size, embed_dim=int(v['dim']), depth=int(v['depth']),
               num_heads=int(v['num_attn_heads']), mlp_ratio=float(v['mlp_ratio']),
               drop_path_rate=float(v['drop_path_rate']))
  return ml_collections.ConfigDict(dict(
      method='mim_refiner',
      train=dict(total_iters=int(schedule['max_epochs']) * upe, global_batch_size=batch),
      data=dict(image_size=size),
      efficiency=dict(compute_dtype='float32', param_dtype='float32', remat_policy='none',
                      scan_layers=ctx.scan_layers),
      mim_refiner=dict(
          model=model,
          optim=dict(base_lr=float(refine[f'lr_{stage}']),
                     warmup_iters=int(schedule['warmup_epochs']) * upe,
                     end_lr=float(schedule.get('end_value', DEFAULT_END_LR)),
                     betas=tuple(refine['betas']), eps=float(refine['adam_eps']),
                     weight_decay=float(refine['wd_encoder']),
                     head_weight_decay=float(refine['wd_heads'])),
          stage=int(stage.removeprefix('stage')), encoder=family, heads=tuple(ctx.refine_heads),
          pooling='cls', temperature=float(refine['temperature']),
          topk=int(ctx.arrays[f'{stage}/step0/queue/{first}/topk_index'].shape[1]),
          queue_size=int(ctx.arrays[f'stage3/init/heads.{first}.queue.x'].shape[0]),
          proj_hidden_dim=head.proj_hidden_dim, pred_hidden_dim=head.pred_hidden_dim,
          output_dim=head.output_dim, proj_hidden_layers=head.proj_hidden_layers,
          pred_hidden_layers=head.pred_hidden_layers, ema=float(refine.get('ema', 0.0)),
          layer_decay=float(refine['llrd']), freeze_end_percent=_freeze_end_percent(ctx),
          views=dict(local_size=local_size, n_local=n_local, global_blur_p=(0.0,) * n_global,
                     global_solarize_p=(0.0,) * n_global))))


# The batch key under which the engine step below receives the official run's top-k picks.
_TOPK_CHOICE = 'topk_choice'


class _RecordedChoices(mim_method.MimRefiner):
  """MIM-Refiner taking the official run's recorded top-k picks, (n_heads, G * B) in the batch
  under `_TOPK_CHOICE`, instead of drawing them."""

  def topk_choice(self, batch, rng, head_index):
    del rng
    return batch[_TOPK_CHOICE][head_index]


def _initial_variables(ctx: Context, method: mim_method.MimRefiner) -> interface.Variables:
  """The fixture's initial ContrastiveModel state, loaded through `from_pretrained` as the
  continuation of a MIM-Refiner run (encoder, heads, BatchNorm statistics, queues)."""
  prefix = 'stage3/init/encoder.'
  encoder = vit_weights.official_to_params(
      {k: v for k, v in ctx.arrays.items() if k.startswith(prefix)}, method.encoder,
      _encoder_family(ctx), prefix=prefix)
  head_params, head_buffers = {}, {}
  for h in ctx.refine_heads:
    state = HeadState.from_official(ctx.state_dict(f'stage3/init/heads.{h}.'),
                                    method.encoder.embed_dim)
    head_params[h] = state.params
    head_buffers[h] = {'batch_stats': state.batch_stats, 'queue': state.queue._asdict()}
  source = interface.Variables({'encoder': encoder, 'heads': head_params}, {},
                          {'heads': head_buffers})
  pretrained = interface.Pretrained(method=method.name, variables=source)
  return method.from_pretrained(method.init(jax.random.PRNGKey(0)), {'init': pretrained})


@dataclasses.dataclass(frozen=True)
class RefinementRun:
  """The engine's steps of one stage on the fixture's batches, with official names."""
  losses: list[dict[str, float]]  # per update: 'total' and 'heads.<h>.total'
  final: StateDict  # ContrastiveModel state_dict after the updates (trained, stats, queues)
  ema: StateDict  # stage 3: 'encoder.<name>' of the EMA


def run_refinement(ctx: Context, stage: str) -> RefinementRun:
  """`stage`'s updates through `MimRefiner` and `engine.step.make_train_step` (the engine's
  step with the method's optimiser), the recorded top-k picks injected."""
  method = _RecordedChoices(refinement_config(ctx, stage))
  variables = _initial_variables(ctx, method)
  optimizer = method.optimizer(variables.params)
  state = state_lib.TrainState(
      step=jnp.zeros([], jnp.int32), rng=jax.random.PRNGKey(0), params=variables.params,
      frozen=variables.frozen, buffers=variables.buffers,
      opt_state=optimizer.init(variables.params))
  step_fn = jax.jit(step_lib.make_train_step(method, optimizer))
  losses, t = [], 0
  while ctx.has(f'batch{t}/idx') and ctx.has(f'{stage}/step{t}/loss/total'):
    batch = _batch(ctx, t)
    batch[_TOPK_CHOICE] = np.stack(
        [ctx.lookup(f'{stage}/step{t}/queue/{h}').choice for h in ctx.refine_heads])
    state, metrics = step_fn(state, batch)
    losses.append({'total': float(metrics['loss']),
                   **{f'heads.{h}.total': float(metrics[f'loss/{h}']) for h in ctx.refine_heads}})
    t += 1
  family = _encoder_family(ctx)
  encoder = method.eval_params(state.variables, 'student')
  final = vit_weights.params_to_official(jax.device_get(encoder), family, prefix='encoder.')
  for h in ctx.refine_heads:
    buffers = jax.device_get(state.buffers['heads'][h])
    final.update({f'heads.{h}.{k}': v for k, v in heads.to_official(
        jax.device_get(state.params['heads'][h]), buffers['batch_stats']).items()})
    final.update(queue.to_official(queue.Queue(**buffers['queue']), prefix=f'heads.{h}.queue.'))
  ema = {}
  if 'ema' in state.buffers:
    ema = vit_weights.params_to_official(jax.device_get(state.buffers['ema']), family,
                                         prefix='encoder.')
  return RefinementRun(losses, final, ema)


def _recorded_lrs(ctx: Context, stage: str) -> dict[str, float]:
  """'<submodel>.<name>' -> the sum of the learning rates it got over `stage`'s updates."""
  sums = {}
  for submodel, section in ctx.meta_section('param_groups_stage3').items():
    params = section['params']
    t = 0
    while ctx.has(f'{stage}/step{t}/lr/{submodel}'):
      lrs = ctx.arrays[f'{stage}/step{t}/lr/{submodel}']
      names = list(params) if len(lrs) == len(params) else [
          n for n, p in params.items() if p['requires_grad']]
      for name, lr in zip(names, lrs):
        sums[f'{submodel}.{name}'] = sums.get(f'{submodel}.{name}', 0.0) + float(lr)
      t += 1
  return sums


def _zero_gradient_entries(name: str, shape: tuple[int, ...], names: set[str]
                           ) -> np.ndarray | None:
  """Mask of the README's analytically zero-gradient entries of a parameter (None: none):
  the key third of `attn.qkv.bias`, the encoder's final-norm bias, each head's last projector
  BatchNorm bias."""
  if re.fullmatch(r'encoder\.blocks\.\d+\.attn\.qkv\.bias', name):
    mask = np.zeros(shape, bool)
    mask[shape[0] // 3:2 * shape[0] // 3] = True
    return mask
  match = re.fullmatch(r'(heads\.[^.]+\.projector)\.(\d+)\.1\.bias', name)
  if name == 'encoder.norm.bias' or (
      match and f'{match.group(1)}.{int(match.group(2)) + 1}.1.bias' not in names):
    return np.ones(shape, bool)
  return None


@dataclasses.dataclass(frozen=True)
class Verdict:
  """A parameter's distance from float64 and the bound of the criterion that decides it."""
  error: float
  bound: float
  rule: str


def _f64_verdicts(ctx: Context, stage: str, ours: StateDict) -> dict[str, Verdict]:
  """The README's criterion for every float entry of the final state, against
  `<stage>_f64/final`: at most F64_FACTOR x the official float32 run's own distance (floor
  F64_FLOOR), or at most TIGHT_TOL outside the zero-gradient entries and, inside them, the sum
  of the parameter's recorded learning rates."""
  truth, official = ctx.state_dict(f'{stage}_f64/final/'), ctx.state_dict(f'{stage}/final/')
  lrs = _recorded_lrs(ctx, stage)
  out = {}
  for name, t in truth.items():
    if not np.issubdtype(t.dtype, np.floating) or name not in official or not t.size:
      continue
    diff = lambda x: np.abs(np.asarray(x, np.float64) - t)
    ours_diff = diff(ours[name])
    error = float(np.max(ours_diff))
    bound = max(F64_FACTOR * float(np.max(diff(official[name]))), F64_FLOOR)
    if error <= bound:
      out[name] = Verdict(error, bound, f'{F64_FACTOR:g}x official')
      continue
    mask = _zero_gradient_entries(name, t.shape, set(truth))
    inside = 0.0 if mask is None else float(np.max(ours_diff[mask]))
    outside = error if mask is None else float(np.max(ours_diff[~mask], initial=0.0))
    if outside <= TIGHT_TOL and inside <= lrs.get(name, 0.0):
      tight = TIGHT_TOL if mask is None else max(TIGHT_TOL, lrs.get(name, 0.0))
      out[name] = Verdict(error, tight, 'zero-gradient rule')
    else:
      out[name] = Verdict(error, bound, f'{F64_FACTOR:g}x official')
  return out


def _worst_verdict(quantity: str, verdicts: Mapping[str, Verdict]) -> Result:
  """One row: the entry closest to (or furthest past) its own bound."""
  name = max(verdicts, key=lambda n: verdicts[n].error / verdicts[n].bound)
  v = verdicts[name]
  return Result(f'{quantity} (worst: {name}, {v.rule})', v.error, 0.0, v.bound, absolute=True)


def _refinement_results(ctx: Context, stage: str) -> list[Result]:
  run, results = run_refinement(ctx, stage), []
  for t, losses in enumerate(run.losses):
    for key, value in losses.items():
      name = 'loss/total' if key == 'total' else f'loss/{key}'
      results.append(compare(f'{stage}/step{t}/{name}', value,
                             ctx.arrays[f'{stage}/step{t}/{name}'], STEP_LOSS_TOL))
  verdicts = _f64_verdicts(ctx, stage, run.final)
  for submodel in sorted({n.split('.')[0] if n.startswith('encoder.') else
                          '.'.join(n.split('.')[:2]) for n in verdicts}):
    results.append(_worst_verdict(
        f'{stage}/final/{submodel}.* vs float64', {n: v for n, v in verdicts.items()
                                                   if n.startswith(submodel + '.')}))
  official = ctx.state_dict(f'{stage}/final/')
  exact = {n: run.final[n] for n, v in official.items()
           if n in run.final and not np.issubdtype(v.dtype, np.floating)}
  results.append(_worst(f'{stage}/final/*queue.{{idx,cls,age,ptr}}', exact,
                        {n: official[n] for n in exact}, 0.0, 1.0))
  if stage == 'stage2':  # The frozen encoder must not move.
    init = ctx.state_dict('stage3/init/encoder.')
    results.append(_worst('stage2 encoder after the updates vs stage3/init',
                          {n: v for n, v in run.final.items() if n.startswith('encoder.')},
                          {f'encoder.{n}': v for n, v in init.items()}, 0.0, 1.0))
  ema_ref = ctx.state_dict('stage3/ema/')
  if stage == 'stage3' and ema_ref:
    ema = float(ctx.meta_section('refine', 'ema'))
    n_updates = len(run.losses)
    ema_verdicts = {}
    for name, ref in ema_ref.items():
      error = float(np.max(np.abs(np.asarray(run.ema[name], np.float64) - ref)))
      # Each update mixes in (1 - ema) of parameters that may be as far off as the final ones.
      bound = max(n_updates * (1 - ema) * verdicts[name].bound, F64_FLOOR)
      ema_verdicts[name] = Verdict(error, bound, f'{n_updates} x (1 - ema) x its bound')
    results.append(_worst_verdict('stage3/ema/encoder.* vs the official EMA', ema_verdicts))
  return results


@SUITE.register('part B: two stage-3 refinement updates (encoder, heads, EMA)',
                requires=('stage3/init/encoder.patch_embed.proj.weight', 'batch0/global_views',
                          'stage3/step0/loss/total'))
def _stage3_updates(ctx: Context) -> list[Result]:
  return _refinement_results(ctx, 'stage3')


@SUITE.register('part B: two stage-2 refinement updates (heads; encoder frozen)',
                requires=('stage3/init/encoder.patch_embed.proj.weight', 'batch0/global_views',
                          'stage2/step0/loss/total'))
def _stage2_updates(ctx: Context) -> list[Result]:
  return _refinement_results(ctx, 'stage2')
