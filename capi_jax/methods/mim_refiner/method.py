"""MIM-Refiner (Alkin et al., ICLR 2025) as a `Method`: refine a pretrained encoder's late blocks
with nearest-neighbour contrastive ID heads, as the official release computes it
(`docs/reference/mim_refiner_algorithm.md`).

Variables (`config.mim_refiner.stage`):
  stage 2  params  = {'heads': {name: IdHead params}};
           frozen  = {'encoder': backbone params} (no gradient; it is also what evaluations read);
           buffers = {'heads': {name: {'batch_stats', 'queue'}}}.
  stage 3  params  = {'encoder', 'heads'}; frozen = {};
           buffers = {'heads': ..., 'ema': EMA of the encoder (evaluations read it)}.
The queue is a dict of `queue.Queue`'s fields. The backbone is `encoder.build(config)`.

One step (the release's `ContrastiveTrainer` with its `ContrastiveModel`):
  1. one encoder pass per view resolution: the G global views of the batch together, then the
     L local views (the position table resized to their grid), rows view-major;
  2. per head: its pooled features of all views (global views first), the ID head (BatchNorm
     over all rows of that head), a queue lookup for the global views' anchors (one of the top
     k drawn at random per row), the NNA loss (`objective.head_objective`);
  3. the gradient of the sum of the head losses; one AdamW over encoder (stage 3, layer-wise
     lr decay, optional block freezer) and heads (`optim.optimizer`);
  4. `update_buffers`: each head's new BatchNorm statistics, global view 0's anchors enqueued,
     the EMA of the updated encoder (stage 3).
Written on global arrays: under `jax.jit` with the batch split over devices, BatchNorm
statistics are over the global batch (SyncBatchNorm), every device's predictions are
negatives, and the anchors are enqueued in global sample order, as the release's multi-GPU
runs do (its ranks hold contiguous blocks of the global batch).
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from capi_jax.base import interface
from capi_jax.base import optim as core_optim
from capi_jax.base import schedules
from capi_jax.methods.mim_refiner import augment
from capi_jax.methods.mim_refiner import config_checks
from capi_jax.methods.mim_refiner import encoder as encoder_lib
from capi_jax.methods.mim_refiner import flops
from capi_jax.methods.mim_refiner import heads as heads_lib
from capi_jax.methods.mim_refiner import objective
from capi_jax.methods.mim_refiner import optim
from capi_jax.methods.mim_refiner import queue as queue_lib
from capi_jax.weights import rules
from capi_jax.weights import vit as vit_weights

PyTree = Any
Array = jax.Array

# Batch key of the parity check's recorded top-k picks, (n_heads, n_global * batch) int in head
# order; training draws them from the step's rng instead (the release draws them at random).


def tree_differences(expected: PyTree, found: PyTree, limit: int | None = 5) -> list[str]:
  """The first `limit` (None: all) paths where two trees differ in presence or shape, as
  sentences."""
  flat = lambda tree: {core_optim.path_name(p): tuple(jnp.shape(x))
                       for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}
  want, got = flat(expected), flat(found)
  problems = [f'{n}: missing (expected {want[n]})' for n in want if n not in got]
  problems += [f'{n}: unexpected {got[n]}' for n in got if n not in want]
  problems += [f'{n}: expected {want[n]}, found {got[n]}' for n in want
               if n in got and want[n] != got[n]]
  return problems[:limit]


def _checked(expected: PyTree, found: PyTree, what: str, fix: str) -> PyTree:
  """`found` cast to `expected`'s dtypes if the trees match, else a CheckpointMismatchError
  naming the first differences."""
  problems = tree_differences(expected, found, limit=None)
  if problems:
    raise rules.CheckpointMismatchError(
        f'{what} does not fit the configured model ({fix}): ' + '; '.join(problems[:5]),
        problems)
  return jax.tree.map(lambda e, x: jnp.asarray(x, e.dtype), expected, found)


class MimRefiner(interface.Method):
  """MIM-Refiner: ID heads with a nearest-neighbour queue on a pretrained encoder."""
  name = 'mim_refiner'
  loss_keys = ('loss',)

  def __init__(self, config):
    super().__init__(config)
    cfg = config.mim_refiner
    self.stage = cfg.stage
    self.encoder = encoder_lib.build(config)
    self.head_names = tuple(cfg.heads)
    self.head = heads_lib.IdHead(
        proj_hidden_dim=cfg.proj_hidden_dim, pred_hidden_dim=cfg.pred_hidden_dim,
        output_dim=cfg.output_dim, proj_hidden_layers=cfg.proj_hidden_layers,
        pred_hidden_layers=cfg.pred_hidden_layers)
    self.blocks = tuple(sorted({b for b in map(encoder_lib.head_block, self.head_names)
                                if b is not None}))
    self.multicrop = augment.MultiCrop(global_size=config.data.image_size,
                                       **dict(cfg.views))

  @classmethod
  def config_problems(cls, config):
    return config_checks.problems(config)

  # ------------------------------------------------------------------ state
  def _encoder_params(self, variables: interface.Variables) -> PyTree:
    return variables.params['encoder'] if self.stage == 3 else variables.frozen['encoder']

  def _from_official(self, state_dict: dict[str, Any]) -> PyTree:
    """An official ViT state_dict (MAE / dBOT / data2vec 2.0 / MIM-Refiner names) -> encoder."""
    family = self.config.mim_refiner.encoder
    if family == encoder_lib.CAPI:
      raise ValueError('An official CAPI file holds a whole CAPI backbone: convert it first '
                       '(`python -m capi_jax.convert --to=capi_jax`) and pass the output directory '
                       'as config.init.checkpoint.')
    prefix = 'encoder.' if any(k.startswith('encoder.') for k in state_dict) else ''
    vit_weights.check_activation(state_dict, self.encoder, self.encoder.activation,
                                 'mim_refiner.model.activation', f'the {family} checkpoint', prefix)
    params = vit_weights.official_to_params(state_dict, self.encoder, family, prefix)
    return jax.tree.map(lambda x: np.asarray(x, np.float32), params)

  def architecture_keys(self, role: str) -> str:
    del role  # Only 'init'.
    return 'mim_refiner.model and mim_refiner.encoder'

  def _head_in_dim(self, name: str) -> int:
    """Width of a head's input: the final output's (a ViT may project it) or a block's."""
    if encoder_lib.head_block(name) is None and getattr(self.encoder, 'out_dim', 0):
      return self.encoder.out_dim
    return self.encoder.embed_dim

  def init(self, rng: Array) -> interface.Variables:
    k_encoder, k_heads, k_queues = jax.random.split(rng, 3)
    size = self.config.data.image_size
    encoder = self.encoder.init(k_encoder, jnp.zeros((1, size, size, 3), jnp.float32))['params']
    head_params, head_buffers = {}, {}
    for i, name in enumerate(self.head_names):
      variables = self.head.init(jax.random.fold_in(k_heads, i),
                                 jnp.zeros((2, self._head_in_dim(name)), jnp.float32))
      head_params[name] = variables['params']
      q = queue_lib.init(jax.random.fold_in(k_queues, i), self.config.mim_refiner.queue_size,
                         self.head.output_dim)
      head_buffers[name] = {'batch_stats': variables['batch_stats'], 'queue': q._asdict()}
    return self._variables(encoder, head_params, head_buffers)

  def _variables(self, encoder: PyTree, head_params: PyTree, head_buffers: PyTree
                 ) -> interface.Variables:
    if self.stage == 2:
      return interface.Variables({'heads': head_params}, {'encoder': encoder},
                            {'heads': head_buffers})
    # The release's EMA callback starts from the weights the run starts from.
    return interface.Variables({'encoder': encoder, 'heads': head_params}, {},
                          {'heads': head_buffers, 'ema': jax.tree.map(jnp.copy, encoder)})

  def from_pretrained(self, variables: interface.Variables,
                      pretrained: dict[str, interface.Pretrained]) -> interface.Variables:
    """Puts the pretrained encoder ('init') in; stage 3 from a MIM-Refiner run also takes its
    heads.

    From a MIM-Refiner run (`pretrained.method == 'mim_refiner'`, as the release's
    `previous_run_initializer` loads stage 2 into stage 3): its encoder (trained or frozen,
    not the EMA), head params, BatchNorm statistics and queue contents. From any other method's
    run or a `capi_jax.convert` output: its backbone, fresh heads. From an official file
    (MAE / dBOT / data2vec 2.0 releases, a MIM-Refiner encoder): its tensors converted with the
    configured ViT family's names (`vit_convert`), a leading 'encoder.' stripped. The
    optimiser starts fresh either way; the EMA starts from the loaded encoder.

    Raises:
      ValueError: the pretrained trees differ from the configured ones (names the first
        differences).
    """
    pretrained = pretrained['init']
    current = self._encoder_params(variables)
    head_params, head_buffers = variables.params['heads'], variables.buffers['heads']
    if pretrained.state_dict is not None:
      encoder = self._from_official(pretrained.state_dict)
    elif pretrained.method == self.name and pretrained.variables is not None:
      source = pretrained.variables
      found = source.params.get('encoder', source.frozen.get('encoder'))
      encoder = _checked(current, found, 'The MIM-Refiner run\'s encoder',
                         'use the model config of the run it continues')
      head_params = _checked(head_params, source.params['heads'], 'The MIM-Refiner run\'s heads',
                             'use the same mim_refiner.heads and head sizes')
      head_buffers = _checked(head_buffers, source.buffers['heads'],
                              'The MIM-Refiner run\'s head buffers',
                              'use the same mim_refiner.heads, head sizes and queue_size')
    else:
      encoder = _checked(current, pretrained.backbone, 'The pretrained backbone',
                         'set mim_refiner.model (and mim_refiner.encoder) to its architecture')
    return self._variables(encoder, head_params, head_buffers)

  # ------------------------------------------------------------------ optimisation
  def _lr_fn(self) -> schedules.ScheduleFn:
    o, t = self.config.mim_refiner.optim, self.config.train
    return schedules.wupcos_fn(optim.scaled_lr(o.base_lr, t.global_batch_size),
                               warmup_updates=o.warmup_iters, total_updates=t.total_iters,
                               end_value=o.end_lr)

  def encoder_groups(self, encoder_params: PyTree) -> PyTree:
    """A `Group` per encoder parameter: layer-wise lr decay, weight decay, freezer."""
    cfg = self.config.mim_refiner
    o = cfg.optim

    def rule(path: str, ndim: int) -> core_optim.Group:
      if encoder_lib.frozen(path, self.encoder):
        return core_optim.Group(frozen=True)
      return optim.encoder_group(
          encoder_lib.refiner_name(path, self.encoder), ndim,
          depth=encoder_lib.depth(self.encoder), weight_decay=o.weight_decay,
          layer_decay=cfg.layer_decay, freeze_end_percent=cfg.freeze_end_percent)

    return core_optim.group_tree(encoder_params, rule)

  def param_groups(self, params: PyTree) -> PyTree:
    """A `Group` per trained parameter (heads: the release's generic rule)."""
    decay = self.config.mim_refiner.optim.head_weight_decay
    head_rule = lambda path, ndim: optim.head_group(
        heads_lib.official_name(path), ndim, weight_decay=decay)
    groups = {'heads': {h: core_optim.group_tree(p, head_rule)
                        for h, p in params['heads'].items()}}
    if 'encoder' in params:
      groups['encoder'] = self.encoder_groups(params['encoder'])
    return groups

  def optimizer(self, params: PyTree) -> optax.GradientTransformation:
    o = self.config.mim_refiner.optim
    return optim.optimizer(self.param_groups(params), self._lr_fn(), betas=tuple(o.betas),
                           eps=o.eps)

  def schedules(self) -> dict[str, schedules.ScheduleFn]:
    return {'lr': self._lr_fn()}

  # ------------------------------------------------------------------ step
  def _encode(self, encoder_params: PyTree, batch: interface.Batch, rng: Array
              ) -> dict[str, Array]:
    """{head: (n_views * batch, D)} pooled features, view-major, global views first."""
    encoded = []
    for i, key in enumerate(('global_views', 'local_views')):
      views = batch[key]  # (batch, n, S, S, 3)
      if views.shape[1] == 0:
        continue
      images = jnp.swapaxes(views, 0, 1).reshape(-1, *views.shape[2:])
      encoded.append(self.encoder.apply(
          {'params': encoder_params}, images, blocks=self.blocks, train=self.stage == 3,
          rngs={'drop_path': jax.random.fold_in(rng, i)}, method='encode'))
    return encoder_lib.head_inputs(encoded, self.head_names, self.config.mim_refiner.pooling,
                                   encoder_lib.n_prefix(self.encoder))

  def topk_choice(self, batch: interface.Batch, rng: Array, head_index: int) -> Array:
    """(G * B,) which of its top k neighbours each anchor row takes as its positive, drawn
    uniformly as the release's `torch.randint` (head `head_index` of `self.head_names`)."""
    del head_index
    b, n_global = batch['global_views'].shape[:2]
    return queue_lib.random_choice(rng, n_global * b, self.config.mim_refiner.topk)

  def loss_and_grads(self, variables, batch, rng):
    """Gradients of the summed NNA losses of all heads.

    Args:
      variables: see the module docstring.
      batch: 'global_views' (B, G, S, S, 3), 'local_views' (B, L, s, s, 3), 'index' (B,) dataset
        indices, 'label' (B,).
      rng: this step's key (top-k picks, stochastic depth).

    Returns:
      (grads like params, aux: {'heads': {name: {'batch_stats', 'rows' (B, O)}}, 'index',
      'label'}, metrics: 'loss' and per head 'loss/<h>', 'nn-similarity/<h>',
      'nn-accuracy/<h>').
    """
    cfg = self.config.mim_refiner
    choice_rng, path_rng = jax.random.split(rng)
    idx, labels = batch['index'].astype(jnp.int32), batch['label'].astype(jnp.int32)
    b, n_global = batch['global_views'].shape[:2]
    head_buffers = variables.buffers['heads']

    def loss_fn(params):
      encoder_params = (params['encoder'] if self.stage == 3
                        else jax.lax.stop_gradient(variables.frozen['encoder']))
      features = self._encode(encoder_params, batch, path_rng)
      total, losses, outputs = 0.0, {}, {}
      for i, name in enumerate(self.head_names):
        choice = self.topk_choice(batch, jax.random.fold_in(choice_rng, i), i)
        losses[name], outputs[name] = objective.head_objective(
            self.head, params['heads'][name], head_buffers[name]['batch_stats'],
            queue_lib.Queue(**head_buffers[name]['queue']), features[name], idx, labels,
            choice.astype(jnp.int32), n_global=n_global, topk=cfg.topk,
            temperature=cfg.temperature)
        total += losses[name]  # In head order, as the release sums them.
      return total, (losses, outputs)

    (total, (losses, outputs)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        variables.params)
    metrics = {'loss': total}
    for name, out in outputs.items():
      metrics[f'loss/{name}'] = losses[name]
      metrics[f'nn-similarity/{name}'] = out.lookup.metrics['nn-similarity']
      metrics[f'nn-accuracy/{name}'] = out.lookup.metrics['nn-accuracy']
    aux = {'heads': {name: {'batch_stats': out.batch_stats, 'rows': out.enqueue_rows(b)}
                     for name, out in outputs.items()},
           'index': idx, 'label': labels}
    return grads, aux, metrics

  def update_buffers(self, variables, aux, step):
    del step
    heads = {}
    for name, buffers in variables.buffers['heads'].items():
      new = aux['heads'][name]
      q = queue_lib.enqueue(queue_lib.Queue(**buffers['queue']), new['rows'], aux['index'],
                            aux['label'])
      heads[name] = {'batch_stats': new['batch_stats'], 'queue': q._asdict()}
    if self.stage == 2:
      return {'heads': heads}
    # Frozen parameters (fixed position tables, ...) are copied, not averaged.
    ema = core_optim.ema_update(
        variables.buffers['ema'], variables.params['encoder'], self.config.mim_refiner.ema,
        self.encoder_groups(variables.params['encoder']))
    return {'heads': heads, 'ema': ema}

  # ------------------------------------------------------------------ data
  def train_transform(self):
    return self.multicrop

  # ------------------------------------------------------------------ bookkeeping
  def architecture(self):
    cfg = self.config.mim_refiner
    model = cfg.model.to_dict()
    # Stochastic depth changes no parameter.
    for key in ('drop_path_rate', 'drop_path_groups'):
      model.pop(key, None)
    return {'model': model, 'mim_refiner.encoder': cfg.encoder, 'mim_refiner.stage': cfg.stage,
            'mim_refiner.heads': list(cfg.heads),
            **{f'mim_refiner.{k}': cfg[k] for k in (
                'proj_hidden_dim', 'pred_hidden_dim', 'output_dim', 'proj_hidden_layers',
                'pred_hidden_layers', 'queue_size')}}

  def flops_per_step(self):
    return flops.train_step_flops(self.config, self.encoder, self.multicrop, self.blocks)

  # ------------------------------------------------------------------ evaluation
  def eval_model(self) -> nn.Module:
    return encoder_lib.EvalEncoder(self.encoder, self.config.mim_refiner.pooling)

  def eval_params(self, variables, which):
    if which not in ('student', 'ema'):
      raise ValueError(f"which must be 'student' or 'ema', got {which!r}.")
    if which == 'ema' and self.stage == 3:
      return variables.buffers['ema']
    return self._encoder_params(variables)

  def official_backbone(self, state_dict, which):
    """An official ViT file of the configured family (`mim_refiner.encoder`: MAE, dBOT,
    data2vec 2.0, a MIM-Refiner encoder) as the evaluation encoder (`_from_official`)."""
    del which  # The releases hold one encoder.
    return self.eval_model(), self._from_official(dict(state_dict))
