"""Scaling studies without the hardware: models x TPU slices x meshes, compiled ahead of time.

Each point is the engine's real train step compiled for a slice (`plans.lower_train_step` on
libtpu's compile-only devices), as `capi_jax.aot` does. Per chip it reports memory (arguments,
temporaries, outputs; whether they fit in HBM), and three step-time BOUNDS from published
figures (`base.hardware`), never measurements:
  compute       XLA's FLOPs per chip (`plans.step_flops`) / the chip's dense bf16 peak;
  memory        HBM bytes the compiled step touches (`hbm_bytes`: every top-level
                instruction's operands and result, loops times their trip counts) / HBM
                bandwidth;
  interconnect  bytes a chip sends for its collectives (`egress_bytes`: ring algorithms'
                (n-1)/n factors over the group of each op) / half the chip's bidirectional ICI
                bandwidth (every link busy); cross-slice sends / DCN bandwidth per chip.
A step takes at least the largest of them, which is named as the bottleneck. Collective bytes
are broken down by the work they serve (`SERVICES`), read off each op's device groups (which
mesh axes it spans) and its op_name metadata (forward or `transpose`, the backward pass).

`sweep` runs every point once, appending each result (or the error that stopped it) as one
JSON line to OUT/points.jsonl and skipping points already there, so an interrupted sweep
resumes; it then writes OUT/table.csv, OUT/table.json and pictures (`pictures`). Each point's
compiled HLO is kept in OUT/hlo/ (gzipped text).
"""

from collections.abc import Iterable, Sequence
import collections
import csv
import dataclasses
import gzip
import json
import math
import re
import time
import traceback
from typing import Any

import jax
from etils import epath
import ml_collections
import numpy as np

from capi_jax import methods
from capi_jax.base import hardware
from capi_jax.base import sharding
from capi_jax.engine import plans
from capi_jax.engine import step as step_lib
from capi_jax.models import family

# What each collective serves.
SERVICES = ('weight gathers', 'gradient reductions', 'tensor-parallel activations',
            'batch activations')
BOUNDS = ('compute', 'memory', 'interconnect', 'dcn')
# Instructions that move no HBM bytes of their own (bookkeeping, control flow whose bodies are
# walked, asynchronous halves counted at their start).
_FREE = {'parameter', 'constant', 'tuple', 'get-tuple-element', 'bitcast', 'while', 'call',
         'conditional', 'after-all', 'partition-id', 'replica-id', 'opt-barrier', 'send',
         'send-done', 'recv', 'recv-done', 'copy-done', 'add-dependency', 'domain'}
# Callers whose computations run as their own instructions (not fused into one kernel).
_TOP_LEVEL = (None, 'while', 'call', 'conditional')


# ---------------------------------------------------------------------------- HLO analyses
def replica_groups(line: str, n_devices: int) -> np.ndarray:
  """(groups, group size) logical device ids of a collective's `replica_groups` (every
  device in one group when the attribute is absent or empty).

  Forms: explicit `{{0,1},{2,3}}`; iota `[G,S]<=[dims]T(perm)` (ids 0.. reshaped to dims,
  transposed, reshaped to G x S); mesh `mesh['a'=4,'b'=2] {'a'}` (ids laid over the named
  axes, a group per index of the axes not listed).
  """
  m = re.search(r"replica_groups=mesh\[([^\]]*)\] \{([^}]*)\}", line)
  if m:
    axes = [(a.split('=')[0].strip("'"), int(a.split('=')[1])) for a in m.group(1).split(',')]
    names = [a for a, _ in axes]
    listed = [names.index(a.strip().strip("'")) for a in m.group(2).split(',') if a.strip()]
    ids = np.arange(math.prod(s for _, s in axes)).reshape([s for _, s in axes])
    rest = [i for i in range(len(axes)) if i not in listed]
    ids = ids.transpose(rest + listed)
    return ids.reshape(-1, math.prod(axes[i][1] for i in listed) if listed else 1)
  m = re.search(r'replica_groups=\[(\d+),(\d+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?', line)
  if m:
    groups, size = int(m.group(1)), int(m.group(2))
    dims = [int(d) for d in m.group(3).split(',')]
    ids = np.arange(math.prod(dims)).reshape(dims)
    if m.group(4):
      ids = ids.transpose([int(p) for p in m.group(4).split(',')])
    return ids.reshape(groups, size)
  m = re.search(r'replica_groups=\{(\{[\d,{} ]*\})\}', line)
  if m:
    groups = [[int(i) for i in g.split(',') if i.strip()]
              for g in re.findall(r'\{([\d, ]*)\}', m.group(1))]
    if groups and groups[0]:
      return np.array(groups)
  return np.arange(n_devices)[None]


def spanned_axes(groups: np.ndarray, names: Sequence[str], sizes: Sequence[int]
                 ) -> tuple[str, ...]:
  """The mesh axes along which one group's devices differ (logical id i is the mesh's
  row-major position i, the order of the executable's device assignment)."""
  coords = np.stack(np.unravel_index(groups[0], tuple(sizes)), axis=1)
  return tuple(n for i, n in enumerate(names) if len(set(coords[:, i])) > 1)


def service(kind: str, axes: Sequence[str], line: str) -> str:
  """Which of `SERVICES` one collective serves (`line`: its HLO instruction)."""
  m = re.match(r'[^=]*= (?:\(.*?\)|\S+) [\w\-]+\((.*?)\)', line)
  operands = m.group(1) if m else ''
  m = re.search(r'op_name="([^"]*)"', line)
  op_name = m.group(1) if m else ''
  if kind == 'all-gather' or (kind == 'all-reduce' and 'dynamic-update-slice' in operands):
    # FSDP: a block's weights, again in the backward under remat. The TPU compiler may gather
    # a scanned layer's weights as an all-reduce of each shard written into a zero buffer
    # (its operand a dynamic-update-slice: the whole layer, twice an all-gather's traffic).
    return 'weight gathers'
  if sharding.TENSOR_AXIS in axes and (op_name.endswith('dot_general') or set(axes) == {
      sharding.TENSOR_AXIS}):
    # Row-split outputs summed over 'tensor' (proj, fc2), and in the backward the inputs'
    # gradients of the column-split layers.
    return 'tensor-parallel activations'
  if kind == 'reduce-scatter' or 'transpose(' in op_name:
    return 'gradient reductions'
  # Forward reductions across the batch: losses, clustering statistics, sample subsets.
  return 'batch activations'


def egress_bytes(kind: str, operand: int, group: int) -> float:
  """Bytes one device sends for one collective over `group` devices (ring algorithms)."""
  if group <= 1:
    return 0.0
  share = (group - 1) / group
  return {'all-gather': operand * (group - 1), 'reduce-scatter': operand * share,
          'all-reduce': 2 * operand * share, 'all-to-all': operand * share,
          'collective-permute': operand}.get(kind, operand)


def collectives_by_service(module: plans.HloModule, mesh: Sequence[tuple[str, int]]
                           ) -> tuple[dict[str, int], float]:
  """({service: operand bytes per chip per step}, bytes a chip sends over ICI per step)."""
  names = [n for n, _ in mesh]
  sizes = [s for _, s in mesh]
  n_devices = math.prod(sizes)
  served: collections.Counter[str] = collections.Counter()
  sent = 0.0
  for kind, size, line, times in plans.collective_ops(module):
    if kind.startswith(plans.DCN_PREFIX):
      continue
    groups = replica_groups(line, n_devices)
    served[service(kind, spanned_axes(groups, names, sizes), line)] += times * size
    sent += times * egress_bytes(kind, size, groups.shape[1])
  return dict(served), sent


_INSTRUCTION = re.compile(r'\s+(ROOT )?%([\w.\-]+) = (\(.*?\)|\S+) ([\w\-]+)\((.*?)\)')


def _instruction_bytes(line: str, computations: dict[str, list[str]],
                       shapes: dict[str, str]) -> int:
  """HBM bytes of one top-level instruction: its operands read and its result written, except
  that a buffer updated in place (dynamic-update-slice, a scan writing one layer's slot) costs
  the update only and a buffer read through dynamic-slices (a scan reading one layer's
  weights) costs the slices only, inside a fusion as well."""
  m = _INSTRUCTION.match(line)
  if not m:
    return 0
  _, _, result, opcode, operand_text = m.groups()
  operands = re.findall(r'%([\w.\-]+)', operand_text)
  size = lambda name: plans.shape_bytes(shapes.get(name, ''))
  if opcode == 'dynamic-slice':
    return 2 * plans.shape_bytes(result)
  if opcode == 'dynamic-update-slice':
    return 2 * size(operands[1])
  callee = re.search(r'calls=%([\w.\-]+)', line)
  body = computations.get(callee.group(1), []) if opcode == 'fusion' and callee else []
  if not body:
    return plans.shape_bytes(result) + sum(size(o) for o in operands)
  params, users, alias, shape_of, updates = {}, collections.defaultdict(list), {}, {}, []
  for inner in body:
    im = _INSTRUCTION.match(inner)
    if not im:
      continue
    _, name, shape, op, args = im.groups()
    shape_of[name] = shape
    if op == 'parameter':
      params[int(args)] = name
      continue
    arg_names = re.findall(r'%([\w.\-]+)', args)
    if op == 'bitcast':
      alias[name] = arg_names[0]
    for a in arg_names:
      users[a].append((op, shape, arg_names))
    if op == 'dynamic-update-slice':
      updates.append(arg_names[:2])
  source = lambda n: source(alias[n]) if n in alias else n
  # Buffers updated in place (a scan's stacked outputs): the updates are the traffic.
  in_place = {source(buffer): update for buffer, update in updates}
  total = 0
  for i, operand in enumerate(operands):
    param = params.get(i)
    uses = users.get(param, [])
    if param is not None and param in in_place:
      total += plans.shape_bytes(shape_of.get(in_place[param], ''))
    elif uses and all(op == 'dynamic-slice' and args[0] == param for op, _, args in uses):
      total += sum(plans.shape_bytes(shape) for _, shape, _ in uses)
    else:
      total += size(operand)
  written = plans.shape_bytes(result) - sum(
      plans.shape_bytes(shape_of[p]) for p in in_place if p in shape_of and p in params.values())
  return total + max(written, 0)


def hbm_bytes(module: plans.HloModule) -> int:
  """HBM bytes one run of a compiled module reads and writes, per device: operands and result
  of every top-level instruction (a fusion is one; `_instruction_bytes`), times its loops'
  trip counts. XLA's own `cost_analysis()['bytes accessed']` counts a loop body once, which
  undercounts scanned layers by their depth."""
  total = 0
  for _, opcode, _, line, times, caller in plans.walk_ops(module):
    if caller not in _TOP_LEVEL or opcode in _FREE or opcode.endswith('-done'):
      continue
    total += times * _instruction_bytes(line, module.computations, module.shapes)
  return total


def bounds(flops: float, hbm: float, ici_sent: float, dcn_sent: float, peak: float | None,
           bw: dict[str, float | None]) -> dict[str, float | None]:
  """Step-time lower bounds in seconds per `BOUNDS` (None where a figure is unpublished), from
  per-chip work and the chip's peak FLOP/s and bandwidths (`hardware.TPU_BANDWIDTH`)."""
  return {'compute': flops / peak if peak else None,
          'memory': hbm / bw['hbm'] if bw['hbm'] else None,
          'interconnect': ici_sent / (bw['ici'] / 2) if bw['ici'] else None,
          'dcn': (dcn_sent / bw['dcn'] if bw['dcn'] else None) if dcn_sent else 0.0}


def chip_bandwidth(name: str, chip: Any) -> dict[str, float | None]:
  """HBM / ICI / DCN bytes/s per chip: TPUs from `hardware.TPU_BANDWIDTH`; a GPU (a `Chip` with
  `gpu` facts) its HBM bandwidth only (no NVLink or network figure here yet)."""
  if name in hardware.TPU_BANDWIDTH:
    return hardware.TPU_BANDWIDTH[name]
  facts = getattr(chip, 'gpu', None)
  return {'hbm': getattr(facts, 'memory_bandwidth', None), 'ici': None, 'dcn': None}


# ---------------------------------------------------------------------------- points
@dataclasses.dataclass(frozen=True)
class Point:
  model: str
  topology: str
  mesh: str
  batch_per_device: int

  @property
  def key(self) -> str:
    return f'{self.model}|{self.topology}|{self.mesh}|{self.batch_per_device}'


def plan_point(config: ml_collections.ConfigDict, point: Point,
               devices: Sequence[jax.Device], hlo_dir: epath.Path | None = None
               ) -> dict[str, Any]:
  """Compiles one point's train step (`config` already carries its model, mesh and batch) and
  reports its memory, bounds and collectives per chip; keeps the compiled HLO text gzipped in
  `hlo_dir` (the analyses can be rerun on it without compiling)."""
  chip_name, chip, _ = plans.parse_topology(point.topology)
  mesh = sharding.mesh_shape(config.sharding.mesh, len(devices))
  start = time.perf_counter()
  lowered = plans.lower_train_step(config, devices)
  compiled = step_lib.compile_step(lowered, devices[0].platform)
  compile_s = time.perf_counter() - start
  memory = compiled.memory_analysis()
  total = (memory.argument_size_in_bytes + memory.temp_size_in_bytes
           + memory.output_size_in_bytes - memory.alias_size_in_bytes)
  text = compiled.as_text()
  if hlo_dir is not None:
    hlo_dir.mkdir(parents=True, exist_ok=True)
    (hlo_dir / (re.sub(r'[^\w.=-]+', '_', point.key) + '.hlo.txt.gz')).write_bytes(
        gzip.compress(text.encode()))
  xla_cost = compiled.cost_analysis()
  xla_cost = (xla_cost[0] if isinstance(xla_cost, list) else xla_cost) or {}
  flops = plans.step_flops(config, devices, lowered)
  module = plans.parse_hlo(text)
  served, ici_sent = collectives_by_service(module, tuple(zip(*mesh)))
  dcn_sent = sum(v for k, v in plans.collective_bytes(module).items()
                 if k.startswith(plans.DCN_PREFIX))
  hbm = hbm_bytes(module)
  peak = hardware.table_peak_flops(devices[0].device_kind, 'bfloat16')
  step_bounds = bounds(flops, hbm, ici_sent, dcn_sent, peak, chip_bandwidth(chip_name, chip))
  known = {k: v for k, v in step_bounds.items() if v is not None}
  method = methods.from_config(config)
  params = sum(math.prod(x.shape) for x in jax.tree.leaves(
      jax.eval_shape(lambda rng: method.init(rng).params, jax.random.PRNGKey(0))))
  return {
      **dataclasses.asdict(point), 'chips': len(devices),
      'mesh_shape': dict(zip(*mesh)), 'parameters': params,
      'global_batch_size': config.train.global_batch_size,
      'argument_bytes': memory.argument_size_in_bytes, 'temporary_bytes': memory.temp_size_in_bytes,
      'total_bytes': total, 'hbm_bytes': chip.hbm_bytes, 'fits': total <= chip.hbm_bytes,
      'flops_per_chip': flops, 'hbm_bytes_accessed': hbm,
      # XLA's count, loop bodies once (scanned layers undercounted): for comparison only.
      'xla_bytes_accessed': xla_cost.get('bytes accessed'), 'ici_bytes_sent': ici_sent,
      'dcn_bytes_sent': dcn_sent,
      **{f'collective_{k.replace(" ", "_").replace("-", "_")}_bytes': served.get(k, 0)
         for k in SERVICES},
      **{f'{k}_bound_s': v for k, v in step_bounds.items()},
      'bottleneck': max(known, key=known.get) if known else None,
      'step_bound_s': max(known.values()) if known else None,
      'compile_s': compile_s,
  }


def point_config(base: ml_collections.ConfigDict, point: Point, n_devices: int
                 ) -> ml_collections.ConfigDict:
  """`base` with the point's model (`models.family.MODELS`, or 'config': as `base` has it),
  mesh and global batch."""
  c = base.copy_and_resolve_references()
  with c.unlocked():
    if point.model != 'config':
      if c.method != 'capi':
        raise ValueError(f'--models names family members for CAPI configs; {c.method!r} '
                         "configs take --models=config (the config's own model).")
      c.name = point.model
      family.set_encoder_decoder(c.capi.model, point.model)
    c.sharding.mesh = sharding.parse_mesh(point.mesh)
    c.train.global_batch_size = point.batch_per_device * n_devices
  return c


def load_points(path: epath.Path) -> dict[str, dict[str, Any]]:
  """{point key: its result} of the points already in a sweep's JSON lines."""
  if not path.exists():
    return {}
  done = {}
  for line in path.read_text().splitlines():
    if line.strip():
      row = json.loads(line)
      done[Point(row['model'], row['topology'], row['mesh'], row['batch_per_device']).key] = row
  return done


def sweep(base: ml_collections.ConfigDict, models: Sequence[str], topologies: Sequence[str],
          meshes: Sequence[str], batch_per_device: int, out: epath.Path,
          retry_errors: bool = False, log=print) -> list[dict[str, Any]]:
  """Plans every (model, topology, mesh) point not yet in OUT/points.jsonl, one at a time
  (a compile holds GiBs of host memory), then writes the table and pictures."""
  out.mkdir(parents=True, exist_ok=True)
  path = out / 'points.jsonl'
  done = load_points(path)
  for topology in topologies:
    devices = plans.topology_devices(topology)
    for model in models:
      for mesh in meshes:
        point = Point(model, topology, mesh, batch_per_device)
        if point.key in done and (not retry_errors or 'error' not in done[point.key]):
          continue
        log(f'planning {point.key} ...')
        try:
          row = plan_point(point_config(base, point, len(devices)), point, devices,
                           out / 'hlo')
        except Exception as e:  # pylint: disable=broad-except
          # A point that cannot be built (a mesh that does not divide the heads, a compile
          # out of host memory) is a result of the study, recorded and skipped on resume.
          row = {**dataclasses.asdict(point), 'error': f'{type(e).__name__}: {e}'[:2000],
                 'traceback': traceback.format_exc()[-4000:]}
        done[point.key] = row
        with path.open('a') as f:
          f.write(json.dumps(row) + '\n')
        log(summary(row))
  rows = [done[k] for k in sorted(done)]
  write_table(rows, out)
  pictures(rows, out)
  return rows


def summary(row: dict[str, Any]) -> str:
  head = f"{row['model']} {row['topology']} mesh {row['mesh']}"
  if 'error' in row:
    return f'{head}: ERROR {row["error"].splitlines()[0]}'
  gib = row['total_bytes'] / 2 ** 30
  b = row['step_bound_s']
  return (f"{head}: {gib:.2f} GiB per chip ({'fits' if row['fits'] else 'does NOT fit'}), "
          f"step >= {b * 1e3:.1f} ms bound by {row['bottleneck']} "
          f"(compiled in {row['compile_s']:.0f} s)")


_COLUMNS = ('model', 'topology', 'mesh', 'chips', 'batch_per_device', 'global_batch_size',
            'parameters', 'total_bytes', 'hbm_bytes', 'fits', 'flops_per_chip',
            'hbm_bytes_accessed', 'ici_bytes_sent', 'dcn_bytes_sent',
            *(f'collective_{k.replace(" ", "_").replace("-", "_")}_bytes' for k in SERVICES),
            *(f'{k}_bound_s' for k in BOUNDS), 'step_bound_s', 'bottleneck', 'compile_s',
            'error')


def write_table(rows: Iterable[dict[str, Any]], out: epath.Path) -> None:
  rows = list(rows)
  with (out / 'table.csv').open('w') as f:
    writer = csv.DictWriter(f, _COLUMNS, extrasaction='ignore')
    writer.writeheader()
    writer.writerows(rows)
  (out / 'table.json').write_text(json.dumps(
      [{k: v for k, v in r.items() if k != 'traceback'} for r in rows], indent=1))


def pictures(rows: Sequence[dict[str, Any]], out: epath.Path) -> list[str]:
  """memory.png (per-chip memory vs model size), bounds.png (step-time bound vs chips, the
  bottleneck marked) per mesh; returns the files written."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  ok = [r for r in rows if 'error' not in r]
  if not ok:
    return []
  markers = {'compute': 'o', 'memory': 's', 'interconnect': '^', 'dcn': 'x'}
  written = []
  fig, ax = plt.subplots(figsize=(6, 4))
  for (topology, mesh), group in _groups(ok, ('topology', 'mesh')):
    group.sort(key=lambda r: r['parameters'])
    ax.plot([r['parameters'] for r in group], [r['total_bytes'] / 2 ** 30 for r in group],
            marker='o', label=f'{topology} {mesh}')
  for hbm in sorted({r['hbm_bytes'] for r in ok}):
    ax.axhline(hbm / 2 ** 30, color='grey', linestyle=':', linewidth=1)
  ax.set(xscale='log', yscale='log', xlabel='trained parameters',
         ylabel='compiled memory per chip (GiB)', title='Per-chip memory (dotted: HBM)')
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(out / 'memory.png', dpi=120)
  plt.close(fig)
  written.append('memory.png')

  fig, ax = plt.subplots(figsize=(6, 4))
  for (model, mesh), group in _groups(ok, ('model', 'mesh')):
    group.sort(key=lambda r: r['chips'])
    line, = ax.plot([r['chips'] for r in group], [r['step_bound_s'] for r in group],
                    label=f'{model} {mesh}')
    for r in group:
      ax.scatter(r['chips'], r['step_bound_s'], marker=markers.get(r['bottleneck'], 'o'),
                 color=line.get_color())
  ax.set(xscale='log', yscale='log', xlabel='chips',
         ylabel='step-time bound (s), not measured',
         title='Step-time bounds (o compute, s memory, ^ interconnect)')
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(out / 'bounds.png', dpi=120)
  plt.close(fig)
  written.append('bounds.png')
  return written


def _groups(rows: Iterable[dict[str, Any]], keys: Sequence[str]):
  grouped: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
  for r in rows:
    grouped.setdefault(tuple(r[k] for k in keys), []).append(r)
  return sorted(grouped.items())
