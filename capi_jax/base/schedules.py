"""Warmup-then-truncated-cosine schedules (learning rates, EMA momentum), as the reference has them.

The reference precomputes the schedule as a numpy array:
  linspace(start_warmup_value, base_value, warmup_iters)       (both ends included)
  final + 0.5 * (base - final) * (1 + cos(pi * truncate_cos * i / n_cos)),  i = 0 .. n_cos - 1
with n_cos = total_iters - warmup_iters, and `final_value` from `total_iters` on.
`warmup_cosine` builds that array (for tests, plots and the parity check); `warmup_cosine_fn`
evaluates the same formula in closed form on a traced step, so the jitted train step needs no
host round trip and no schedule-sized constant (500k iterations for the paper's recipe).
"""

from collections.abc import Callable
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

ScheduleFn = Callable[[jax.Array], jax.Array]


def warmup_cosine(
    base_value: float,
    final_value: float,
    total_iters: int,
    warmup_iters: int = 0,
    start_warmup_value: float = 0.0,
    truncate_cos: float = 1.0,
) -> np.ndarray:
  """The reference schedule for iterations 0 .. total_iters - 1: float64 `(total_iters,)`."""
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
    value = jnp.where(step < warmup_iters, warm, cos)
    return jnp.where(step >= total_iters, final_value, value).astype(jnp.float32)

  return schedule


def from_config(cfg: ml_collections.ConfigDict, total_iters: int) -> ScheduleFn:
  """A schedule function from a config section with the reference's keys (`optim.lr_schedule`)."""
  return warmup_cosine_fn(
      base_value=cfg.base_value,
      final_value=cfg.final_value,
      total_iters=total_iters,
      warmup_iters=cfg.warmup_iters,
      start_warmup_value=cfg.get('start_warmup_value', 0.0),
      truncate_cos=cfg.get('truncate_cos', 1.0),
  )
