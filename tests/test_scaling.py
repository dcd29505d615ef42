"""Scaling sweeps: mesh specs, collective accounting by device groups, a resumable tiny sweep."""

import importlib.util
import json

import numpy as np
import pytest

from capi_jax.base import sharding
from capi_jax.engine import plans
from capi_jax.engine import scaling
from configs import tiny

_HAS_LIBTPU = importlib.util.find_spec('libtpu') is not None


def test_parse_mesh():
  assert sharding.parse_mesh('fsdp') == (('fsdp', -1),)
  assert sharding.parse_mesh('data=2:fsdp:tensor=4') == (('data', 2), ('fsdp', -1), ('tensor', 4))
  assert sharding.mesh_label(sharding.parse_mesh('data=2:fsdp')) == 'data=2:fsdp'
  for bad in ('', 'fsdp=x', 'fsdp;tensor'):
    with pytest.raises(ValueError):
      sharding.parse_mesh(bad)


def test_replica_groups_and_the_axes_they_span():
  mesh = (('fsdp', 4), ('tensor', 2))
  names, sizes = zip(*mesh)
  # Iota: 4 groups of 2 neighbours: the minor mesh axis, 'tensor'.
  groups = scaling.replica_groups('x replica_groups=[4,2]<=[8], use_global', 8)
  assert groups.tolist() == [[0, 1], [2, 3], [4, 5], [6, 7]]
  assert scaling.spanned_axes(groups, names, sizes) == ('tensor',)
  # Transposed iota: 2 groups of 4 strided devices: 'fsdp'.
  groups = scaling.replica_groups('replica_groups=[2,4]<=[4,2]T(1,0), dims', 8)
  assert groups.tolist() == [[0, 2, 4, 6], [1, 3, 5, 7]]
  assert scaling.spanned_axes(groups, names, sizes) == ('fsdp',)
  # XLA's mesh form, and explicit groups.
  groups = scaling.replica_groups("replica_groups=mesh['axis_0'=4,'axis_1'=2] {'axis_0'}, d", 8)
  assert scaling.spanned_axes(groups, names, sizes) == ('fsdp',)
  groups = scaling.replica_groups('replica_groups={{0,1,2,3,4,5,6,7}}, to_apply', 8)
  assert scaling.spanned_axes(groups, names, sizes) == ('fsdp', 'tensor')
  assert scaling.replica_groups('no groups', 4).shape == (1, 4)


def test_services_and_egress():
  fwd = 'metadata={op_name="jit(train_step)/blocks_0/fc2/dot_general"}'
  bwd = 'metadata={op_name="jit(train_step)/transpose(jvp(x))/blocks_0/sharding_constraint"}'
  assert scaling.service('all-reduce', ('tensor',), fwd) == 'tensor-parallel activations'
  assert scaling.service('all-gather', ('fsdp',), fwd) == 'weight gathers'
  assert scaling.service('reduce-scatter', ('fsdp',), bwd) == 'gradient reductions'
  assert scaling.service('all-reduce', ('data',), bwd) == 'gradient reductions'
  assert scaling.service('all-reduce', ('fsdp',), 'op_name="jit(s)/reduce_sum"') == (
      'batch activations')
  gather_as_sum = ('%ar = bf16[1,64,64]{1,0} all-reduce(%dynamic-slice_dynamic-update-slice_fusion.4'
                   '), channel_id=23, to_apply=%add')
  assert scaling.service('all-reduce', ('fsdp',), gather_as_sum) == 'weight gathers'
  assert scaling.egress_bytes('all-gather', 100, 4) == 300
  assert scaling.egress_bytes('all-reduce', 100, 4) == 150
  assert scaling.egress_bytes('reduce-scatter', 100, 1) == 0
  b = scaling.bounds(2e12, 1e9, 1e9, 0, peak=1e12, bw={'hbm': 1e12, 'ici': 1e9, 'dcn': None})
  assert b == {'compute': 2.0, 'memory': 1e-3, 'interconnect': 2.0, 'dcn': 0.0}
  assert scaling.chip_bandwidth('v5e', None)['ici'] == 400e9

  class Gpu:  # A GPU `plans.Chip`: only its HBM bandwidth is known here.
    gpu = type('Facts', (), {'memory_bandwidth': 3.35e12})()
  assert scaling.chip_bandwidth('h100', Gpu()) == {'hbm': 3.35e12, 'ici': None, 'dcn': None}


# A scan of 3 layers: each iteration reads one layer's weights (dynamic-slice of the stacked
# f32[3,64,64]) and writes one slot of the stacked outputs in place (dynamic-update-slice).
_SCAN_HLO = """\
HloModule scan

%read (p0: f32[3,64,64], p1: s32[]) -> f32[64,64] {
  %p0 = f32[3,64,64]{2,1,0} parameter(0)
  %p1 = s32[] parameter(1)
  ROOT %ds = f32[1,64,64]{2,1,0} dynamic-slice(%p0, %p1, %c, %c), dynamic_slice_sizes={1,64,64}
}

%write (q0: f32[3,8,64], q1: f32[1,8,64], q2: s32[]) -> f32[3,8,64] {
  %q0 = f32[3,8,64]{2,1,0} parameter(0)
  %q1 = f32[1,8,64]{2,1,0} parameter(1)
  %q2 = s32[] parameter(2)
  %b = f32[3,8,64]{2,1,0} bitcast(%q0)
  ROOT %dus = f32[3,8,64]{2,1,0} dynamic-update-slice(%b, %q1, %q2, %c, %c)
}

%body (p: (s32[], f32[3,64,64], f32[3,8,64])) -> (s32[], f32[3,64,64], f32[3,8,64]) {
  %p = (s32[], f32[3,64,64]{2,1,0}, f32[3,8,64]{2,1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %w = f32[3,64,64]{2,1,0} get-tuple-element(%p), index=1
  %o = f32[3,8,64]{2,1,0} get-tuple-element(%p), index=2
  %layer = f32[1,64,64]{2,1,0} fusion(%w, %i), kind=kLoop, calls=%read
  %y = f32[1,8,64]{2,1,0} convolution(%layer, %layer)
  %o2 = f32[3,8,64]{2,1,0} fusion(%o, %y, %i), kind=kLoop, calls=%write
  ROOT %t = (s32[], f32[3,64,64]{2,1,0}, f32[3,8,64]{2,1,0}) tuple(%i, %w, %o2)
}

ENTRY %main (a: f32[3,64,64]) -> f32[3,8,64] {
  %a = f32[3,64,64]{2,1,0} parameter(0)
  %loop = (s32[], f32[3,64,64]{2,1,0}, f32[3,8,64]{2,1,0}) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"3"}}
  ROOT %r = f32[3,8,64]{2,1,0} get-tuple-element(%loop), index=2
}
"""


def test_hbm_bytes_count_a_scan_per_layer():
  layer, slot = 64 * 64 * 4, 8 * 64 * 4
  read = layer + 4 + layer  # The layer's slice (not the stack), the index; the result.
  conv = 2 * layer + slot
  write = slot + slot + 4  # The update read, the index, the update written in place.
  assert scaling.hbm_bytes(plans.parse_hlo(_SCAN_HLO)) == 3 * (read + conv + write)


@pytest.mark.skipif(not _HAS_LIBTPU, reason='libtpu not installed')
def test_tiny_sweep_on_v5e_resumes(tmp_path):
  """Two meshes of a tiny CAPI on a v5e:2x2 slice: table, pictures, bounds; a rerun compiles
  nothing."""
  c = tiny.get_config()
  c.capi.model.embed_dim = 32
  c.capi.model.num_heads = 2
  c.capi.model.encoder_depth = 1
  c.capi.model.decoder_depth = 1
  c.data.image_size = 16
  c.sharding.min_shard_bytes = 0
  logged = []
  rows = scaling.sweep(c, ['config'], ['v5e:2x2'], ['fsdp', 'fsdp:tensor=2'], 2, tmp_path,
                       log=logged.append)
  assert len(rows) == 2 and sum('planning' in line for line in logged) == 2, logged
  by_mesh = {r['mesh']: r for r in rows}
  assert all('error' not in r for r in rows), rows
  fsdp, tensor = by_mesh['fsdp'], by_mesh['fsdp:tensor=2']
  assert fsdp['chips'] == 4 and fsdp['global_batch_size'] == 8
  assert fsdp['collective_tensor_parallel_activations_bytes'] == 0
  assert tensor['collective_tensor_parallel_activations_bytes'] > 0
  for r in rows:
    assert r['bottleneck'] in scaling.BOUNDS and r['fits']
    assert r['step_bound_s'] == max(r[f'{k}_bound_s'] for k in scaling.BOUNDS)
  assert {p.name for p in tmp_path.iterdir()} >= {'points.jsonl', 'table.csv', 'table.json',
                                                  'memory.png', 'bounds.png'}
  assert len(json.loads((tmp_path / 'table.json').read_text())) == 2
  assert len(list((tmp_path / 'hlo').glob('*.hlo.txt.gz'))) == 2
  logged.clear()
  again = scaling.sweep(c, ['config'], ['v5e:2x2'], ['fsdp', 'fsdp:tensor=2'], 2, tmp_path,
                        log=logged.append)
  assert not logged and [r['mesh'] for r in again] == [r['mesh'] for r in rows]
  np.testing.assert_equal(again[0]['total_bytes'], rows[0]['total_bytes'])
