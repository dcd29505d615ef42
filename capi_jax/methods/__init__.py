"""Pretraining methods: what the engine (`train_step.py`) needs to know about one.

A method is a config plus its heads and losses. It provides
  - `init(rng, image_shape) -> (student_params, teacher_head_params)`: the student is
    `{'backbone': ..., 'head': ...}` (the EMA starts as its copy); the teacher head is trained by
    its own optimiser (CAPI's online clustering); `{}` when a method has none;
  - `teacher_head_optimizer() -> optax.GradientTransformation`;
  - `grads(student, ema, teacher_head, batch, rng) -> (student_grads, teacher_head_grads, metrics)`.
The engine owns the rest: the student's AdamW, the EMA, sharding, checkpoints, the loop.
"""

import ml_collections

from capi_jax.methods.capi import method as capi

METHODS = {'capi': capi.Capi}


def from_config(config: ml_collections.ConfigDict):
  """The method named by `config.method`."""
  name = config.method
  if name not in METHODS:
    raise ValueError(f'Unknown method {name!r}; known: {sorted(METHODS)}.')
  return METHODS[name](config)
