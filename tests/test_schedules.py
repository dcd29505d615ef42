"""Schedules vs the official releases' numbers (CAPI fixture `schedule/lr`, `schedule/momentum`;
MIM-Refiner's `wupcos` against its formula)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from capi_jax.base import schedules


def _fixture_schedule(fixture_path, name):
  data = np.load(fixture_path)
  kwargs = json.loads(str(data['meta_json']))[f'schedule_{name}']
  return kwargs, data[f'schedule/{name}']


@pytest.mark.parametrize('name', ['lr', 'momentum'])
def test_numpy_schedule_matches_reference(fixture_path, name):
  kwargs, expected = _fixture_schedule(fixture_path, name)
  values = schedules.warmup_cosine(**kwargs)
  n = kwargs['total_iters']
  assert values.shape == (n,)
  # Iterations past the end take the final value, as the reference's __getitem__ does.
  values = np.concatenate([values, np.full(len(expected) - n, kwargs['final_value'])])
  np.testing.assert_allclose(values, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize('name', ['lr', 'momentum'])
def test_traced_schedule_matches_reference(fixture_path, name):
  kwargs, expected = _fixture_schedule(fixture_path, name)
  fn = jax.jit(jax.vmap(schedules.warmup_cosine_fn(**kwargs)))
  values = np.asarray(fn(jnp.arange(len(expected))))
  # float32 evaluation: one ulp around 1.0 is 6e-8.
  np.testing.assert_allclose(values, expected, rtol=0, atol=1e-7)


def test_edge_cases():
  # One warmup iteration: np.linspace returns its start value.
  kwargs = dict(total_iters=5, warmup_iters=1, start_warmup_value=0.5)
  fn = schedules.warmup_cosine_fn(1.0, 0.0, **kwargs)
  expected = schedules.warmup_cosine(1.0, 0.0, **kwargs)
  np.testing.assert_allclose([float(fn(i)) for i in range(5)], expected, atol=1e-7)
  no_warmup = schedules.warmup_cosine_fn(2.0, 1.0, total_iters=4, truncate_cos=0.8)
  assert float(no_warmup(0)) == 2.0 and float(no_warmup(10)) == 1.0
  with pytest.raises(ValueError, match='warmup_iters'):
    schedules.warmup_cosine(1.0, 0.0, total_iters=3, warmup_iters=5)


def test_wupcos_per_update():
  fn = schedules.wupcos_fn(1e-3, warmup_updates=4, total_updates=10, end_value=1e-6)
  values = np.asarray(jax.vmap(fn)(jnp.arange(12)), np.float64)
  np.testing.assert_allclose(values[:4], 1e-3 * np.arange(1, 5) / 5, rtol=1e-6)
  t = np.arange(4, 10)
  np.testing.assert_allclose(values[4:10],
                             1e-6 + (1e-3 - 1e-6) * (1 + np.cos(np.pi * (t - 4) / 6)) / 2,
                             rtol=1e-5)
  np.testing.assert_allclose(values[10:], 1e-6)
  with pytest.raises(ValueError, match='warmup_updates'):
    schedules.wupcos_fn(1.0, warmup_updates=5, total_updates=5)
