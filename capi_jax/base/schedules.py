"""The releases' warmup-then-cosine schedules (learning rates, EMA momentum).

Two official formulas, each kept exactly as its release computes it:
  - CAPI and CAE v2 (DINO's `cosine_scheduler`, with CAPI's `truncate_cos`): a numpy array
      linspace(start_warmup_value, base_value, warmup_iters)       (both ends included)
      final + 0.5 * (base - final) * (1 + cos(pi * truncate_cos * i / n_cos)),  i = 0 .. n_cos - 1
    with n_cos = total_iters - warmup_iters, and `final_value` from `total_iters` on.
    `warmup_cosine` builds that array (for tests, plots and the parity checks);
    `warmup_cosine_fn` evaluates it in closed form on a traced step, so the jitted train step
    needs no host round trip and no schedule-sized constant (500k iterations for CAPI's recipe).
  - MIM-Refiner (`wupcos`, kappaschedules), per update t with W warmup and T total updates:
      peak (t + 1) / (W + 1) during warmup (a linear increase without its end points), then
      end + (peak - end) (1 + cos(pi (t - W) / (T - W))) / 2 (a cosine without its last point),
    and `end` from T on: `wupcos_fn`.
The two write the cosine in a different order of operations; each keeps its own, so that the
compiled steps stay those the parity checks validated. They share the piecewise assembly.
"""

from collections.abc import Callable
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

ScheduleFn = Callable[[jax.Array], jax.Array]


def _warmup_decay_end(x: jax.Array, warmup: int, total: int, warm: jax.Array,
                      decay: jax.Array, end: float) -> jax.Array:
  """`warm` before `warmup`, `decay` until `total`, `end` from then on; float32 scalar."""
  value = jnp.where(x < warmup, warm, decay)
  return jnp.where(x >= total, end, value).astype(jnp.float32)


def warmup_cosine(
    base_value: float,
    final_value: float,
    total_iters: int,
    warmup_iters: int = 0,
    start_warmup_value: float = 0.0,
    truncate_cos: float = 1.0,
) -> np.ndarray:
  """CAPI's / CAE v2's schedule for iterations 0 .. total_iters - 1: float64 `(total_iters,)`."""
  if not 0 <= warmup_iters <= total_iters:
    raise ValueError(f'warmup_iters={warmup_iters} must lie in [0, total_iters={total_iters}].')
  warmup = np.linspace(start_warmup_value, base_value, warmup_iters)
  iters = np.arange(total_iters - warmup_iters)
  cosine = final_value + 0.5 * (base_value - final_value) * (
      1 + np.cos(np.pi * truncate_cos * iters / max(len(iters), 1)))
  return np.concatenate((warmup, cosine))


def warmup_cosine_fn(
    base_value: float,
    final_value: float,
    total_iters: int,
    warmup_iters: int = 0,
    start_warmup_value: float = 0.0,
    truncate_cos: float = 1.0,
) -> ScheduleFn:
  """`warmup_cosine` as a function of a (traced) integer step; float32 scalar out.

  Matches `warmup_cosine(...)[step]` for step < total_iters and `final_value` beyond, to float32
  rounding.
  """
  if not 0 <= warmup_iters <= total_iters:
    raise ValueError(f'warmup_iters={warmup_iters} must lie in [0, total_iters={total_iters}].')
  n_cos = max(total_iters - warmup_iters, 1)
  # np.linspace with one point returns its start; guard the division for that case.
  warmup_slope = (base_value - start_warmup_value) / max(warmup_iters - 1, 1)

  def schedule(step: jax.Array) -> jax.Array:
    step = jnp.asarray(step, jnp.int32)
    warm = start_warmup_value + warmup_slope * step.astype(jnp.float32)
    i = (step - warmup_iters).astype(jnp.float32)
    cos = final_value + 0.5 * (base_value - final_value) * (
        1 + jnp.cos(math.pi * truncate_cos * i / n_cos))
    return _warmup_decay_end(step, warmup_iters, total_iters, warm, cos, final_value)

  return schedule


def from_config(cfg: ml_collections.ConfigDict, total_iters: int) -> ScheduleFn:
  """`warmup_cosine_fn` from a config section with the releases' keys (e.g. `capi.optim.lr_schedule`)."""
  return warmup_cosine_fn(
      base_value=cfg.base_value,
      final_value=cfg.final_value,
      total_iters=total_iters,
      warmup_iters=cfg.warmup_iters,
      start_warmup_value=cfg.get('start_warmup_value', 0.0),
      truncate_cos=cfg.get('truncate_cos', 1.0),
  )


def wupcos_fn(peak: float, *, warmup_updates: int, total_updates: int,
              end_value: float = 1e-6) -> ScheduleFn:
  """MIM-Refiner's `wupcos` as a function of the (traced) update index; float32 scalar out.

  Updates from `total_updates` on get `end_value`.
  """
  if not 0 <= warmup_updates < total_updates:
    raise ValueError(f'warmup_updates={warmup_updates} must lie in [0, total_updates='
                     f'{total_updates}).')

  def schedule(step: jax.Array) -> jax.Array:
    t = jnp.asarray(step, jnp.int32).astype(jnp.float32)
    warm = peak * (t + 1) / (warmup_updates + 1)
    progress = (t - warmup_updates) / (total_updates - warmup_updates)
    cos = end_value + (peak - end_value) * (1 + jnp.cos(math.pi * progress)) / 2
    return _warmup_decay_end(t, warmup_updates, total_updates, warm, cos, end_value)

  return schedule
