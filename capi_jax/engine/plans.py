"""Plans without the hardware: the real train step compiled ahead of time for a TPU slice or
NVIDIA GPU nodes.

libtpu describes a TPU topology (`jax.experimental.topologies`), the CUDA plugin GPU nodes
(from the GPUs' published facts, `base.hardware.gpu_target_config`); the config's mesh is laid
over their devices, and the engine's own state layout and jitted step (`state.state_layout`,
`step.jit_train_step`) are lowered for abstract inputs and compiled by the TPU compiler: the
executable a pod would run, without one. `plan` reports, per chip: memory (arguments,
temporaries, outputs not aliased to donated arguments, their total against the HBM a program
may use: on TPUs the compiler's own figure, `usable_hbm_bytes`),
XLA's FLOP count for one step (on the unoptimised HLO, blocks looped: `step_flops`) and the
ideal step at the chip's bf16 peak, collective bytes per step by kind; `find_max_batch`
searches the largest global batch that fits.

Several slices (`num_slices`, with `config.sharding.dcn_mesh`): the compiled HLO is one slice's
program. Its collectives stay inside the slice (ICI); what crosses slices over the data centre
network (DCN) is not a collective op but host-transfer `send`s handled by the
`xla_megascale_runtime`, reported apart as `dcn_bytes` (the bytes a chip sends per step).
"""

from collections.abc import Callable, Iterator, Sequence
import collections
import dataclasses
import os
import re
import time
from typing import Any, NamedTuple

import jax
from jax._src import xla_bridge  # CPU cost analysis of unoptimised HLO (`step_flops`).
from jax._src.lib import _jax
from jax.experimental import topologies
import jax.numpy as jnp
import ml_collections
import numpy as np

from capi_jax import methods
from capi_jax.base import hardware
from capi_jax.base import interface
from capi_jax.base import sharding
from capi_jax.engine import benchmark
from capi_jax.engine import config_checks
from capi_jax.engine import state as state_lib
from capi_jax.engine import step as step_lib

GiB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class Chip:
  """What the compiler needs to name a TPU generation or a GPU, and what a plan compares
  against."""
  topology_prefix: str  # libtpu's name of the generation in a topology string.
  chip_config: str  # 'megacore': one JAX device per chip (v4, v5p fuse their two cores).
  hbm_bytes: int
  gpu: hardware.GpuFacts | None = None  # NVIDIA GPUs: compiled for from their facts.

# Per-chip HBM from Google Cloud's TPU system-architecture pages.
CHIPS = {
    'v4': Chip('v4', 'megacore', 32 * GiB),
    'v5e': Chip('v5e', 'default', 16 * GiB),
    'v5p': Chip('v5', 'megacore', 95 * GiB),
    'v6e': Chip('v6e', 'default', 32 * GiB),
    **{name: Chip('', '', facts.memory_bytes, facts) for name, facts in hardware.GPUS.items()},
}
# Fused-attention kernels in compiled HLO: cuDNN's flash attention (`__cudnn$fmha...`) on
# GPUs, Pallas/Mosaic kernels (`tpu_custom_call`: splash attention) on TPUs.
_FUSED_KERNELS = re.compile(r'custom_call_target="(__cudnn\$fmha\w*|tpu_custom_call)"')

# HLO opcodes of collectives; async pairs are counted at their '-start'.
_COLLECTIVES = ('all-gather', 'reduce-scatter', 'all-reduce', 'all-to-all', 'collective-permute')
# Cross-slice transfers: `send`s to this host-transfer handler, their kind in the attribute.
_MEGASCALE = 'xla_megascale_runtime'
DCN_PREFIX = 'dcn '

_DTYPE_BYTES = {'pred': 1, 's8': 1, 'u8': 1, 's16': 2, 'u16': 2, 'f16': 2, 'bf16': 2, 's32': 4,
                'u32': 4, 'f32': 4, 's64': 8, 'u64': 8, 'f64': 8, 'c64': 8, 'c128': 16}


def parse_topology(topology: str) -> tuple[str, Chip, tuple[int, ...]]:
  """'v5e:4x4' -> ('v5e', its Chip, (4, 4)); 'h100:2x8' -> ('h100', its Chip, (2, 8)): nodes x
  GPUs per node. Errors name the accepted forms."""
  chip_name, _, grid = topology.partition(':')
  form = r'\d+x\d+' if chip_name in hardware.GPUS else r'\d+(x\d+){1,2}'
  if chip_name not in CHIPS or not re.fullmatch(form, grid):
    raise ValueError(f'--topology={topology!r}: expected CHIP:GRID with CHIP one of '
                     f'{sorted(CHIPS)} and GRID like 4x4 or 2x2x4 (TPU chips per slice) or '
                     'NODESxGPUS like 1x8 (NVIDIA GPUs).')
  return chip_name, CHIPS[chip_name], tuple(int(n) for n in grid.split('x'))


def gpu_devices(facts: hardware.GpuFacts, nodes: int, per_node: int) -> list[jax.Device]:
  """Compile-only devices of `nodes` x `per_node` GPUs, from the CUDA plugin (no GPU needed).

  The nodes are processes (`process_index`); `slice_index` is 0 on every node, so a mesh
  spans nodes as process granules (`sharding.make_mesh`).
  """
  try:
    description = topologies.get_topology_desc(
        platform='cuda', topology=f'1x{nodes}x{per_node}',
        target_config=hardware.gpu_target_config(facts))
  except Exception as e:  # The CUDA plugin missing.
    raise RuntimeError(
        f'JAX\'s CUDA plugin could not describe {nodes}x{per_node} {facts.name} ('
        f"{type(e).__name__}: {e}). Install it with `pip install '.[gpu-plans]'` "
        '(jax-cuda12-plugin pinned to this jax, and cuDNN for its attention).') from e
  return list(description.devices)


def topology_devices(topology: str, num_slices: int = 1) -> list[jax.Device]:
  """Compile-only devices of `num_slices` slices of a TPU `topology`, from libtpu (no TPU
  needed), or of a GPU `topology`'s nodes (`gpu_devices`)."""
  _, chip, grid = parse_topology(topology)
  if chip.gpu:
    if num_slices != 1:
      raise ValueError(f'--num_slices is for TPUs; GPU nodes are the first number of '
                       f'{topology!r}.')
    return gpu_devices(chip.gpu, *grid)
  # Compile-only use holds no TPU: let other processes (a running job, parallel plans) load
  # libtpu too instead of failing on its lock file.
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  name = f'{chip.topology_prefix}:{"x".join(map(str, grid))}'
  try:
    description = topologies.get_topology_desc(
        name, 'tpu', chip_config_name=chip.chip_config, chips_per_host_bounds=(2, 2, 1),
        num_slices=num_slices)
  except Exception as e:  # libtpu missing or the grid unknown to it.
    raise RuntimeError(
        f'libtpu could not describe {topology!r} ({type(e).__name__}: {e}). Install it with '
        "`pip install '.[tpu]'` (libtpu pinned to this jax) and check the grid.") from e
  return list(description.devices)


def lower_train_step(config: ml_collections.ConfigDict, devices: Sequence[jax.Device]):
  """The engine's train step lowered for `devices` on abstract inputs (nothing allocated)."""
  method = methods.from_config(config)
  mesh = sharding.make_mesh(config, devices)
  layout = state_lib.state_layout(config, method, mesh)
  step = step_lib.jit_train_step(method, layout, mesh)
  return step.lower(layout.abstract, abstract_batch(config, method))


def compile_train_step(config: ml_collections.ConfigDict, devices: Sequence[jax.Device]):
  """The engine's train step compiled for `devices` on abstract inputs (nothing allocated)."""
  return step_lib.compile_step(lower_train_step(config, devices), devices[0].platform)


def step_flops(config: ml_collections.ConfigDict, devices: Sequence[jax.Device],
               lowered: Any = None) -> float:
  """XLA's FLOP count of one train step per device, on the unoptimised HLO.

  XLA's cost analysis counts a while loop's body once, so a step whose blocks are scanned
  (`efficiency.scan_layers`) is counted with its blocks looped: the same computation; and a
  custom call counts nothing, so a step with attention kernels (`efficiency.attention`) is
  counted with XLA's attention: the same math. The count runs on the CPU backend (TPU and GPU compile-only clients have none for an
  unoptimised module) over the global program, divided by the devices.

  Args:
    config: the run's config.
    devices: the devices the step is laid over.
    lowered: the step already lowered for `config` (reused when its blocks are looped).
  """
  e = config.efficiency
  if e.get('scan_layers', False) or e.get('attention', 'xla') != 'xla':
    looped = config.copy_and_resolve_references()
    with looped.unlocked():
      looped.efficiency.scan_layers = False
      looped.efficiency.attention = 'xla'
    lowered = lower_train_step(looped, devices)
  elif lowered is None:
    lowered = lower_train_step(config, devices)
  module = lowered.compiler_ir('hlo').as_hlo_module()
  cost = _jax.hlo_module_cost_analysis(xla_bridge.get_backend('cpu'), module)
  return float(cost.get('flops', 0.0)) / len(devices)


def abstract_batch(config: ml_collections.ConfigDict,
                   method: interface.Method) -> dict[str, jax.ShapeDtypeStruct]:
  """The global batch's shapes and dtypes, read off one example of the method's transform."""
  one = config.copy_and_resolve_references()
  with one.unlocked():
    one.train.global_batch_size = 1
  batch = config.train.global_batch_size
  return {k: jax.ShapeDtypeStruct((batch, *v.shape[1:]), v.dtype)
          for k, v in benchmark.synthetic_batch(one, method.train_transform(), 0).items()}


def shape_bytes(shape: str) -> int:
  """Bytes of an HLO shape string: 'f32[8,128]{1,0}', or a tuple '(bf16[4], f32[2,2])'."""
  total = 0
  for dtype, dims in re.findall(r'(\w+)\[([\d,]*)\]', shape):
    if dtype in _DTYPE_BYTES:
      n = 1
      for d in filter(None, dims.split(',')):
        n *= int(d)
      total += n * _DTYPE_BYTES[dtype]
  return total


def _trip_count(while_line: str, computations: dict[str, list[str]]) -> int:
  """Iterations of a `while` op: XLA's `known_trip_count` when the text has it, else the bound
  of a condition `counter < constant` (a scan's loop, its counter from 0 by 1, as the TPU
  compiler writes scanned layers), else 1."""
  known = re.search(r'"known_trip_count":\{"n":"(\d+)"', while_line)
  if known:
    return int(known.group(1))
  condition = re.search(r'condition=%([\w.\-]+)', while_line)
  lines = computations.get(condition.group(1), []) if condition else []
  bounds = [int(m.group(1)) for line in lines
            for m in [re.search(r'= s32\[\]\S* constant\((\d+)\)', line)] if m]
  compares = [line for line in lines if ' compare(' in line and 'direction=LT' in line]
  return bounds[0] if len(bounds) == 1 and len(compares) == 1 else 1


class HloModule(NamedTuple):
  """A compiled module's text, split once for every walk over it (`parse_hlo`)."""
  entry: str  # ENTRY's name.
  computations: dict[str, list[str]]  # {computation: its instruction lines}.
  shapes: dict[str, str]  # {instruction: its shape text}.


def walk_ops(module: HloModule) -> Iterator[tuple[str, str, str, str, int, str | None]]:
  """Every instruction of a compiled module in one run, with how often it runs.

  Yields (computation, opcode, operand text, line, times, caller): `times` multiplies the trip
  counts of the while loops around it (`_trip_count`; a loop whose count is not known counts
  once), `caller` is the opcode that reaches its computation (None in ENTRY; 'while', 'fusion',
  'all-reduce' for a reducer, ...). Shapes of operands: `module.shapes`.
  """
  computations = module.computations

  def visit(name: str, times: int, caller: str | None):
    for line in computations.get(name, []):
      m = re.match(r'\s+(?:ROOT )?%[\w.\-]+ = (?:\(.*?\)|\S+) ([\w\-]+)\((.*?)\)', line)
      if not m:
        continue
      opcode, operands = m.groups()
      yield name, opcode, operands, line, times, caller
      trips = _trip_count(line, computations) if opcode == 'while' else 1
      for callee in re.findall(r'(?:body|calls|to_apply|branch_computations)=\{?%([\w.\-]+)',
                               line):
        yield from visit(callee, times * trips, opcode)

  yield from visit(module.entry, 1, None)


def parse_hlo(hlo_text: str) -> HloModule:
  """`HloModule` of a compiled module's text (`compiled.as_text()`)."""
  computations: dict[str, list[str]] = {}
  entry, current = None, None
  for line in hlo_text.splitlines():
    header = re.match(r'(ENTRY )?%?([\w.\-]+) .*\{$', line)
    if header and not line.startswith(' '):
      current = header.group(2)
      computations[current] = []
      if header.group(1):
        entry = current
    elif current and line.startswith('  '):
      computations[current].append(line)
  if entry is None:
    raise ValueError('No ENTRY computation in the HLO text.')
  shapes = {}
  for lines in computations.values():
    for line in lines:
      m = re.match(r'\s+(?:ROOT )?%([\w.\-]+) = (\(.*?\)|\S+) ', line)
      if m:
        shapes[m.group(1)] = m.group(2)
  return HloModule(entry, computations, shapes)


def operand_bytes(operands: str, shapes: dict[str, str]) -> int:
  """Bytes of the named operands of one instruction."""
  return sum(shape_bytes(shapes.get(o, '')) for o in re.findall(r'%([\w.\-]+)', operands))


def collective_kind(computation: str, opcode: str, line: str) -> str | None:
  """The collective kind of an instruction ('all-gather', ..., 'dcn all-reduce'), or None."""
  kind = opcode.removesuffix('-start')
  if kind == 'all-reduce' and computation.startswith('all-reduce-scatter'):
    # The TPU compiler's fused reduce-scatter: an all-reduce whose result is sliced to each
    # device's shard (the gradients of FSDP-sharded weights).
    kind = 'reduce-scatter'
  if opcode == 'send' and _MEGASCALE in line:
    transfer = re.search(r'_xla_megascale_transfer_type="(\w+)"', line)
    kind = DCN_PREFIX + (transfer.group(1).lower().replace('_', '-') if transfer else 'send')
  if (kind in _COLLECTIVES or kind.startswith(DCN_PREFIX)) and not opcode.endswith('-done'):
    return kind
  return None


def collective_ops(module: HloModule) -> Iterator[tuple[str, int, str, int]]:
  """(kind, operand bytes, line, times) of every collective of one run, per device."""
  for computation, opcode, operands, line, times, _ in walk_ops(module):
    kind = collective_kind(computation, opcode, line)
    if kind:
      yield kind, operand_bytes(operands, module.shapes), line, times


def collective_bytes(module: HloModule) -> dict[str, int]:
  """Operand bytes per collective kind in one run of the compiled module, per device.

  Collectives inside while loops count once per iteration (`_trip_count`); a loop whose
  count is not known is counted once. The TPU compiler's `all-reduce-scatter` computations
  (an all-reduce sliced to shards) count as reduce-scatters. Cross-slice sends (megascale) count
  under 'dcn ' + their transfer type, e.g. 'dcn all-reduce'.
  """
  totals: collections.Counter[str] = collections.Counter()
  for kind, size, _, times in collective_ops(module):
    totals[kind] += times * size
  return dict(totals)


class _CompileTimer:
  """Wall and process CPU seconds since construction. The CPU seconds (all the compiler's
  threads) are the steadier figure on a shared host, where other processes stretch wall time."""

  def __init__(self):
    self._wall, self._cpu = time.perf_counter(), time.process_time()

  def seconds(self) -> dict[str, float]:
    return {'compile_s': time.perf_counter() - self._wall,
            'compile_cpu_s': time.process_time() - self._cpu}


def plan(config: ml_collections.ConfigDict, topology: str,
         devices: Sequence[jax.Device]) -> dict[str, Any]:
  """Compiles the step for `devices` (one slice of `topology`) and reports what a chip needs."""
  _, chip, _ = parse_topology(topology)
  timer = _CompileTimer()
  lowered = lower_train_step(config, devices)
  try:
    compiled = step_lib.compile_step(lowered, devices[0].platform)
  except jax.errors.JaxRuntimeError as e:
    if 'RESOURCE_EXHAUSTED' not in str(e):
      raise
    # The TPU compiler refuses a program whose temporaries alone exceed HBM: that is the
    # answer 'does not fit', not a failure of the plan.
    return refused_plan(config, topology, devices, str(e), timer.seconds())
  compile_times = timer.seconds()  # Lowering and compiling, as before.
  memory = compiled.memory_analysis()
  arguments = memory.argument_size_in_bytes
  outputs = memory.output_size_in_bytes - memory.alias_size_in_bytes
  temporaries = memory.temp_size_in_bytes
  total = arguments + outputs + temporaries
  hbm = usable_hbm_bytes(devices[0]) or chip.hbm_bytes
  flops = step_flops(config, devices, lowered)
  kind = devices[0].device_kind
  peak = hardware.table_peak_flops(kind, 'bfloat16')
  batch = config.train.global_batch_size
  hlo = compiled.as_text()
  every = collective_bytes(parse_hlo(hlo))
  collectives = {k: v for k, v in every.items() if not k.startswith(DCN_PREFIX)}
  dcn = {k.removeprefix(DCN_PREFIX): v for k, v in every.items() if k.startswith(DCN_PREFIX)}
  granule, granules = sharding.granules(devices)
  return {
      'config': config.name, 'topology': topology, 'device_kind': kind, 'chips': len(devices),
      'slices': granules if granule == 'slice' else 1,
      'mesh': dict(zip(*sharding.mesh_shape(config.sharding.mesh, len(devices)))),
      'global_batch_size': batch, 'images_per_chip': batch / len(devices),
      'compute_dtype': config.efficiency.compute_dtype,
      'remat_policy': config.efficiency.remat_policy,
      'attention': config.efficiency.get('attention', 'xla'),
      'fused_kernels': dict(collections.Counter(_FUSED_KERNELS.findall(hlo))),
      'argument_bytes': arguments, 'temporary_bytes': temporaries, 'output_bytes': outputs,
      'total_bytes': total, 'hbm_bytes': hbm, 'fits': total <= hbm,
      'flops_per_chip': flops, 'peak_flops_per_chip': peak,
      'ideal_step_s': flops / peak if peak else None,
      'collective_bytes': collectives, 'collective_bytes_total': sum(collectives.values()),
      'dcn_bytes': dcn, 'dcn_bytes_total': sum(dcn.values()),
      **compile_times,
  }

_SIZE_UNITS = {'K': 2 ** 10, 'M': 2 ** 20, 'G': GiB, 'T': 2 ** 40}


def compiler_sizes(message: str) -> dict[str, int]:
  """Bytes the TPU compiler names when it refuses a program for HBM: 'HLO temporaries
  (57.31G) exceeds available HBM (15.75G)' -> {'hlo temporaries': ..., 'available hbm': ...}."""
  return {m.group(1).lower(): round(float(m.group(2)) * _SIZE_UNITS[m.group(3)])
          for m in re.finditer(r'(HLO temporaries|available HBM) \((\d+(?:\.\d+)?)([KMGT])\)',
                               message)}


# The HBM one program may use per TPU chip kind, as its compiler states it (`usable_hbm_bytes`).
_usable_hbm: dict[str, int | None] = {}


def usable_hbm_bytes(device: jax.Device) -> int | None:
  """The HBM the TPU compiler lets one program use on `device`'s chip: the chip's HBM less the
  runtime's reserve (15.75 GiB of v5e's 16, 31.25 of v6e's 32), as the compiler states
  it when refusing a probe whose float32 temporaries (512 GiB) exceed any chip's; found once per
  chip kind (a compile of about a second). None off TPU: GPU compile-only clients check no
  memory, and plans there compare with the datasheet's."""
  if device.platform != 'tpu':
    return None
  if device.device_kind not in _usable_hbm:
    one = jax.sharding.NamedSharding(jax.sharding.Mesh(np.array([device]), ('probe',)),
                                     jax.sharding.PartitionSpec())
    running_sums = lambda x: jnp.cumsum(jnp.tile(x, 2 ** 16).reshape(2 ** 16, -1), axis=0)[-1]
    probe = jax.jit(running_sums, in_shardings=one, out_shardings=one)
    try:
      probe.lower(jax.ShapeDtypeStruct((2 ** 20,), jnp.float32, sharding=one)).compile()
      message = ''
    except jax.errors.JaxRuntimeError as e:
      message = str(e)
    _usable_hbm[device.device_kind] = compiler_sizes(message).get('available hbm')
  return _usable_hbm[device.device_kind]


def refused_plan(config: ml_collections.ConfigDict, topology: str,
                 devices: Sequence[jax.Device], message: str, compile_times: dict[str, float]
                 ) -> dict[str, Any]:
  """A plan's keys for a step the compiler refused for lack of HBM: `fits` False, the memory it
  named (e.g. 'HLO temporaries (57.31G) exceeds available HBM (15.75G)') where it named one,
  None for what it did not compute."""
  _, chip, _ = parse_topology(topology)
  sizes = compiler_sizes(message)
  batch = config.train.global_batch_size
  return {
      'config': config.name, 'topology': topology, 'device_kind': devices[0].device_kind,
      'chips': len(devices), 'slices': sharding.granules(devices)[1],
      'mesh': dict(zip(*sharding.mesh_shape(config.sharding.mesh, len(devices)))),
      'global_batch_size': batch, 'images_per_chip': batch / len(devices),
      'compute_dtype': config.efficiency.compute_dtype,
      'remat_policy': config.efficiency.remat_policy,
      'argument_bytes': None, 'temporary_bytes': sizes.get('hlo temporaries'),
      'output_bytes': None, 'total_bytes': None,
      'hbm_bytes': sizes.get('available hbm', chip.hbm_bytes), 'fits': False,
      'compiler_refused': ' '.join(message.split())[:400],
      'flops_per_chip': None, 'peak_flops_per_chip': None, 'ideal_step_s': None,
      'collective_bytes': {}, 'collective_bytes_total': None, 'dcn_bytes': {},
      'dcn_bytes_total': None, **compile_times,
  }


def with_batch(config: ml_collections.ConfigDict, batch: int) -> ml_collections.ConfigDict:
  """A copy of `config` with another global batch."""
  other = config.copy_and_resolve_references()
  with other.unlocked():
    other.train.global_batch_size = batch
  return other


def largest_fitting(fits: Callable[[int], bool], start: int) -> int:
  """The largest n >= 1 with fits(n), for a `fits` true up to some limit and false above it.

  From `start`: doubles while it fits (or halves while it does not) to bracket the limit, then
  bisects. 0 when even n = 1 does not fit.
  """
  if fits(start):
    lo = start
    while fits(lo * 2):
      lo *= 2
    hi = lo * 2
  else:
    hi = start
    while hi > 1 and not fits(hi // 2):
      hi //= 2
    if hi == 1:
      return 0
    lo = hi // 2
  while hi - lo > 1:
    mid = (lo + hi) // 2
    lo, hi = (mid, hi) if fits(mid) else (lo, mid)
  return lo


def batch_unit(config: ml_collections.ConfigDict, chips: int, limit: int = 256) -> int:
  """The fewest images per chip whose global batch the config's checks accept (e.g. CAPI's
  `drop_path_groups` must divide the batch); 1 when none up to `limit` is (the config has other
  problems, which compiling reports)."""
  for unit in range(1, limit + 1):
    if not config_checks.problems(with_batch(config, unit * chips), device_count=chips):
      return unit
  return 1


def find_max_batch(config: ml_collections.ConfigDict, topology: str,
                   devices: Sequence[jax.Device]) -> tuple[int, list[dict[str, Any]]]:
  """(largest global batch that fits, every plan compiled on the way, by batch); 0 when none.

  Searches images per chip in multiples of `batch_unit` (global batches stay multiples of the
  chip count and valid for the config), starting from the config's batch.
  """
  n = len(devices)
  unit = batch_unit(config, n)
  plans: dict[int, dict[str, Any]] = {}

  def fits(units: int) -> bool:
    if units not in plans:
      plans[units] = plan(with_batch(config, units * unit * n), topology, devices)
    return plans[units]['fits']

  units = largest_fitting(fits, max(config.train.global_batch_size // (unit * n), 1))
  return units * unit * n, [plans[k] for k in sorted(plans)]


def report(result: dict[str, Any]) -> str:
  """Human-readable lines for one plan."""
  gib = lambda b: f'{b / GiB:.2f} GiB' if b >= GiB / 10 else f'{b / 2 ** 20:.1f} MiB'
  collectives = ', '.join(f'{k} {gib(v)}' for k, v in sorted(result['collective_bytes'].items()))
  dcn = ', '.join(f'{k} {gib(v)}' for k, v in sorted(result['dcn_bytes'].items()))
  ideal = result['ideal_step_s']
  if result.get('compiler_refused'):
    needs = (f"temporaries alone {gib(result['temporary_bytes'])}"
             if result['temporary_bytes'] else 'more than the chip has')
    return '\n'.join([
        f"{result['config']} on {result['topology']} ({result['chips']} x "
        f"{result['device_kind']}, mesh {result['mesh']}), global batch "
        f"{result['global_batch_size']} ({result['images_per_chip']:g} per chip): DOES NOT FIT",
        f"  per chip: {needs} of {gib(result['hbm_bytes'])} HBM (the TPU compiler refused the "
        f"step after {result['compile_s']:.0f} s); lower --config.train.global_batch_size, or "
        'run with --find_max_batch for the largest batch that fits.'])
  return '\n'.join([
      f"{result['config']} on {result['topology']}"
      + (f" x {result['slices']} slices" if result['slices'] > 1 else '')
      + f" ({result['chips']} x {result['device_kind']}, "
      f"mesh {result['mesh']}), global batch {result['global_batch_size']} "
      f"({result['images_per_chip']:g} per chip), {result['compute_dtype']}, "
      f"remat {result['remat_policy']}; compiled in {result['compile_s']:.0f} s "
      f"({result['compile_cpu_s']:.0f} CPU s)",
      f"  per chip: arguments {gib(result['argument_bytes'])} + temporaries "
      f"{gib(result['temporary_bytes'])} + outputs {gib(result['output_bytes'])} = "
      f"{gib(result['total_bytes'])} of {gib(result['hbm_bytes'])} HBM: "
      + ('fits' if result['fits'] else 'DOES NOT FIT'),
      f"  {result['flops_per_chip']:.3g} FLOPs per chip per step; ideal step "
      + (f'{ideal:.3f} s at {result["peak_flops_per_chip"] / 1e12:g} TFLOP/s bf16'
         if ideal else 'unknown (no peak for this chip)'),
      f"  collectives per chip per step: {gib(result['collective_bytes_total'])}"
      + (f' ({collectives})' if collectives else '')
      + (' inside each slice (ICI)' if result['slices'] > 1 else ''),
      f"  attention {result['attention']}; fused kernels in the HLO: "
      + (', '.join(f'{k} x{n}' for k, n in sorted(result['fused_kernels'].items())) or 'none'),
  ] + ([f"  across slices (DCN) per chip per step: {gib(result['dcn_bytes_total'])} sent"
        + (f' ({dcn})' if dcn else '')] if result['slices'] > 1 else []))
