"""MIM-Refiner's instance-discrimination (ID) head: projector and predictor MLPs with BatchNorm.

Reproduces `NnclrHead` of the official release (ml-jku/MIM-Refiner, `models/ssl/nnclr_head.py`,
BatchNorm mode; see `docs/reference/mim_refiner_algorithm.md`):
  projector: [Linear(no bias), BatchNorm1d, GELU] x (1 + proj_hidden_layers), Linear, BatchNorm1d
  predictor: [Linear(no bias), BatchNorm1d, GELU] x (1 + pred_hidden_layers), Linear, BatchNorm1d
GELU is the exact (erf) form; weights are xavier-uniform, BatchNorm scale 1 and bias 0.
Heads compute in float32 whatever the encoder's compute dtype.

BatchNorm always runs in training mode, as the heads do in training: it normalises with the
biased variance of the batch and moves its running statistics (the `batch_stats` collection,
buffers of the method) with momentum 0.1 towards the batch mean and the *unbiased* variance,
as `torch.nn.BatchNorm1d`. The statistics are over every row of the input (all views x all
samples of that head); written on global arrays, under `jax.jit` with the rows sharded they
are global (GSPMD inserts the reductions SyncBatchNorm does by hand).

Variables: params `{projector,predictor}/layer{i}/linear/kernel (in, out)` and
`.../norm/{scale,bias}`; batch_stats `.../norm/{mean,var}`. Official names map onto them by
`official_name` / `from_official` / `to_official` (the `NnclrHead` state_dict without its
`queue.*` buffers and `num_batches_tracked`, which only counts calls).
"""

from collections.abc import Mapping
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from capi_jax.models import layers

Array = jax.Array
PyTree = Any
StateDict = dict[str, np.ndarray]

BN_EPS = 1e-5
BN_MOMENTUM = 0.1


class BatchNorm1d(nn.Module):
  """torch.nn.BatchNorm1d in training mode on (rows, features) inputs; see the module docstring."""
  eps: float = BN_EPS
  momentum: float = BN_MOMENTUM
  # False: the output carries no gradient to `bias` (for a layer whose consumers are invariant
  # to a per-feature shift, where that gradient is analytically zero; see `IdHead`).
  bias_gradient: bool = True

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """(rows, C) -> (rows, C) float32; updates `batch_stats` when that collection is mutable."""
    features = x.shape[-1]
    scale = self.param('scale', nn.initializers.ones, (features,))
    bias = self.param('bias', nn.initializers.zeros, (features,))
    if not self.bias_gradient:
      bias = jax.lax.stop_gradient(bias)
    running_mean = self.variable('batch_stats', 'mean', jnp.zeros, (features,), jnp.float32)
    running_var = self.variable('batch_stats', 'var', jnp.ones, (features,), jnp.float32)
    mean = jnp.mean(x, axis=0)
    var = jnp.mean(jnp.square(x - mean), axis=0)
    # init's dummy batch must not move the statistics (torch initialises them to 0 and 1).
    if not self.is_initializing() and self.is_mutable_collection('batch_stats'):
      rows = x.shape[0]
      if rows < 2:
        raise ValueError(f'BatchNorm1d in training mode needs at least 2 rows; got {rows}.')
      unbiased = var * (rows / (rows - 1))
      running_mean.value = (1 - self.momentum) * running_mean.value + self.momentum * mean
      running_var.value = (1 - self.momentum) * running_var.value + self.momentum * unbiased
    return (x - mean) * jax.lax.rsqrt(var + self.eps) * scale + bias


class LinearNorm(nn.Module):
  """Linear (no bias, xavier-uniform) -> BatchNorm1d -> GELU (when `activation`)."""
  features: int
  activation: bool
  norm_bias_gradient: bool = True

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """(rows, in) -> (rows, features) float32."""
    x = nn.Dense(self.features, use_bias=False, kernel_init=layers.xavier_uniform,
                 name='linear')(x)
    x = BatchNorm1d(bias_gradient=self.norm_bias_gradient, name='norm')(x)
    return layers.gelu(x) if self.activation else x


class Mlp(nn.Module):
  """`LinearNorm` layers of widths `features`; GELU after all but the last."""
  features: tuple[int, ...]
  last_bias_gradient: bool = True

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """(rows, in) -> (rows, features[-1]) float32."""
    last = len(self.features) - 1
    for i, width in enumerate(self.features):
      x = LinearNorm(width, activation=i < last,
                     norm_bias_gradient=self.last_bias_gradient or i < last,
                     name=f'layer{i}')(x)
    return x


class IdHead(nn.Module):
  """The ID head: `projector` then `predictor` (no normalisation in between).

  Attributes: widths of the official constructor (`zztemplates/models/nnclr.yaml`; 'base' is
  2048 / 4096 / 256 with 1 projector and 0 predictor hidden layers).
  """
  proj_hidden_dim: int
  pred_hidden_dim: int
  output_dim: int
  proj_hidden_layers: int = 1
  pred_hidden_layers: int = 0

  def setup(self):
    # The projector's output reaches the loss only through the predictor (the anchors are
    # detached), whose bias-free Linear and training-mode BatchNorm cancel any per-feature
    # shift: the gradient of the projector's last BatchNorm bias is exactly zero. Computed, it
    # is float32 rounding noise of the size of Adam's eps, which Adam turns into steps of up to
    # the lr that shift the enqueued rows and so the next steps' losses (the official float32
    # run does this; its float64 re-run does not). The output is the same.
    self.projector = Mlp((self.proj_hidden_dim,) * (1 + self.proj_hidden_layers)
                         + (self.output_dim,), last_bias_gradient=False)
    self.predictor = Mlp((self.pred_hidden_dim,) * (1 + self.pred_hidden_layers)
                         + (self.output_dim,))

  def __call__(self, x: Array) -> tuple[Array, Array]:
    """Pooled features of all views -> (projected, predicted).

    Args:
      x: (views * batch, in_dim) rows view-major (row v * batch + b is view v of sample b).

    Returns:
      projected (views * batch, output_dim) and predicted (views * batch, output_dim), float32.
    """
    projected = self.projector(x.astype(jnp.float32))
    return projected, self.predictor(projected)


# ---------------------------------------------------------------------------- official names
_TORCH_LEAF = {('linear', 'kernel'): '0.weight', ('norm', 'scale'): '1.weight',
               ('norm', 'bias'): '1.bias', ('norm', 'mean'): '1.running_mean',
               ('norm', 'var'): '1.running_var'}
# Official head entries that are not head variables here: the queue's buffers (see
# `queue.from_official`) and BatchNorm's call counter (unused with a fixed momentum).
_NOT_HEAD_VARIABLES = re.compile(r'^queue\.|\.num_batches_tracked$')


def official_name(path: str) -> str:
  """'/'-joined path of a params or batch_stats leaf -> the official state_dict name.

  'projector/layer1/linear/kernel' -> 'projector.1.0.weight';
  'predictor/layer0/norm/mean' -> 'predictor.0.1.running_mean'.
  """
  parts = path.split('/')
  if (len(parts) != 4 or parts[0] not in ('projector', 'predictor')
      or not re.fullmatch(r'layer\d+', parts[1]) or tuple(parts[2:]) not in _TORCH_LEAF):
    raise ValueError(f'{path!r} is not a leaf of an IdHead.')
  return f'{parts[0]}.{parts[1][len("layer"):]}.{_TORCH_LEAF[tuple(parts[2:])]}'


def config_from_official(state_dict: Mapping[str, np.ndarray]) -> IdHead:
  """The `IdHead` whose variables have the shapes of an official NnclrHead state_dict."""
  def widths(mlp: str) -> list[int]:
    out, i = [], 0
    while f'{mlp}.{i}.0.weight' in state_dict:
      out.append(int(state_dict[f'{mlp}.{i}.0.weight'].shape[0]))
      i += 1
    if len(out) < 2:
      raise ValueError(f'An official NnclrHead has at least two {mlp} layers; found '
                       f'{len(out)} ({mlp}.<i>.0.weight).')
    return out

  proj, pred = widths('projector'), widths('predictor')
  return IdHead(proj_hidden_dim=proj[0], pred_hidden_dim=pred[0], output_dim=proj[-1],
                proj_hidden_layers=len(proj) - 2, pred_hidden_layers=len(pred) - 2)


def from_official(state_dict: Mapping[str, np.ndarray], head: IdHead, in_dim: int
                  ) -> tuple[PyTree, PyTree]:
  """Official NnclrHead state_dict -> (params, batch_stats) of `head`; exact (transposes only).

  Raises:
    ValueError: a head variable is missing, unexpected or of the wrong shape; names them all.
  """
  abstract = jax.eval_shape(head.init, jax.random.key(0), jnp.zeros((2, in_dim), jnp.float32))
  expected = {}  # official name -> (collection, flax keys, official shape)
  for collection in ('params', 'batch_stats'):
    for path, leaf in jax.tree_util.tree_flatten_with_path(abstract[collection])[0]:
      keys = tuple(k.key for k in path)
      shape = leaf.shape[::-1] if keys[-1] == 'kernel' else leaf.shape
      expected[official_name('/'.join(keys))] = (collection, keys, shape)
  out = {'params': {}, 'batch_stats': {}}
  problems = []
  for name in sorted(state_dict):
    if _NOT_HEAD_VARIABLES.search(name):
      continue
    value = np.asarray(state_dict[name])
    if name not in expected:
      problems.append(f'unexpected {name} {value.shape}')
      continue
    collection, keys, shape = expected.pop(name)
    if value.shape != shape:
      problems.append(f'{name}: expected {shape}, found {value.shape}')
      continue
    node = out[collection]
    for key in keys[:-1]:
      node = node.setdefault(key, {})
    node[keys[-1]] = jnp.asarray(value.T if keys[-1] == 'kernel' else value, jnp.float32)
  problems += [f'missing {name} {shape}' for name, (_, _, shape) in sorted(expected.items())]
  if problems:
    raise ValueError(f'The state_dict does not fit {head}: ' + '; '.join(problems))
  return out['params'], out['batch_stats']


def to_official(params: PyTree, batch_stats: PyTree | None = None) -> StateDict:
  """(params[, batch_stats]) of an IdHead -> official names, float32 numpy; exact."""
  out = {}
  for tree in (params, batch_stats or {}):
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
      keys = tuple(k.key for k in path)
      value = np.asarray(leaf)
      out[official_name('/'.join(keys))] = value.T if keys[-1] == 'kernel' else value
  return out
