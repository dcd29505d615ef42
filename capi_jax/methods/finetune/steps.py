"""Fine-tuning's optimiser and training step (pure functions; the run wraps them).

One step as the release's `engine_for_finetuning.train_one_epoch` takes it: Mixup / CutMix on the
batch (`mixing.mix`, the draw made on the host), forward in train mode (drop path), soft-target
cross-entropy, gradients, their global norm (logged; the recipe does not clip), AdamW over the
layer-decay groups with the per-iteration cosine lr (`base.schedules.warmup_cosine_fn`, warm-up
from 0, `min_lr`) and a constant weight decay. No EMA.
"""

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import optax

from capi_jax.base import optim
from capi_jax.base import schedules
from capi_jax.methods.finetune import mixing
from capi_jax.methods.finetune import model as model_lib

PyTree = Any


class Recipe(NamedTuple):
  """The numbers of one fine-tuning run (CAE v2's `run_class_finetuning.py` flags)."""
  lr: float  # absolute peak lr (`--lr`; the release does not scale it by the batch).
  min_lr: float
  total_iters: int
  warmup_iters: int
  weight_decay: float
  layer_decay: float
  num_classes: int
  smoothing: float
  betas: tuple[float, float] = (0.9, 0.999)
  eps: float = 1e-8


def lr_schedule(recipe: Recipe) -> schedules.ScheduleFn:
  """`cosine_scheduler(lr, min_lr, epochs, iters, warmup_epochs)` per iteration (traced step)."""
  return schedules.warmup_cosine_fn(recipe.lr, recipe.min_lr, recipe.total_iters,
                                    recipe.warmup_iters)


def groups(params: PyTree, depth: int, layer_decay: float) -> PyTree:
  """A `optim.Group` per parameter of a `model_lib.Classifier`: layer decay and no-decay rules."""
  return optim.group_tree(params, model_lib.group_rule(depth, layer_decay))


def optimizer(recipe: Recipe, params: PyTree, depth: int) -> optax.GradientTransformation:
  """AdamW (torch's) over the layer-decay groups; the frozen sin-cos table keeps no state."""
  return optim.adamw(lr_schedule(recipe), betas=recipe.betas, eps=recipe.eps,
                     weight_decay=recipe.weight_decay,
                     groups=groups(params, depth, recipe.layer_decay),
                     state_labels=optim.STATE_LABELS)


def train_step(model: nn.Module, tx: optax.GradientTransformation, recipe: Recipe,
               params: PyTree, opt_state: optax.OptState, images: jax.Array, labels: jax.Array,
               mix: mixing.MixParams, rng: jax.Array
               ) -> tuple[PyTree, optax.OptState, dict[str, jax.Array]]:
  """One optimiser step.

  Args:
    model: a `model_lib.Classifier`.
    tx: `optimizer(recipe, params, depth)`.
    recipe: the run's numbers (classes, smoothing).
    params, opt_state: the current state.
    images: (B, H, W, 3) float32 normalised, after the host's transforms; B even.
    labels: (B,) int.
    mix: this batch's Mixup / CutMix draw (`mixing.draw`).
    rng: the drop-path key of this step.

  Returns:
    New params, new optimiser state, metrics {'loss', 'grad_norm'} (float32 scalars).
  """
  mixed, targets = mixing.mix(images, labels, mix, recipe.num_classes, recipe.smoothing)

  def loss_fn(p):
    logits = model.apply({'params': p}, mixed, train=True, rngs={'drop_path': rng})
    return model_lib.soft_target_cross_entropy(logits, targets)

  loss, grads = jax.value_and_grad(loss_fn)(params)
  updates, opt_state = tx.update(grads, opt_state, params)
  params = optax.apply_updates(params, updates)
  return params, opt_state, {'loss': loss, 'grad_norm': optax.tree.norm(grads)}
