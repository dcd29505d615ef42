"""The method interface: everything the engine knows about a pretraining method.

A method (CAPI, MIM-Refiner, CAE v2, ...) is a config section (`config.<name>`) plus a
subclass of `Method`, registered by name in `capi_jax.methods` (built in, or added with
`methods.register`) and picked by `config.method`. The engine (`capi_jax.engine`: state,
step, checkpoints, loop, evaluation, benchmark, plans) calls only what is declared here and
never imports a method.

State. A method's variables come in three trees (`Variables`):
  - `params`: trained by the method's optimiser (gradients, optimiser state);
  - `frozen`: read but never changed (a frozen teacher, a frozen encoder in MIM-Refiner's
    stage 2); no gradient, no optimiser state;
  - `buffers`: changed by the method after each update, not by gradients (EMA copies, a
    nearest-neighbour queue, BatchNorm statistics).
Each is a dict of named parts (e.g. params = {'backbone', 'head', 'clustering_head'}); the
names are the method's, used in checkpoints, sharding rules and logs.

One step, for every method (`capi_jax.engine.train_step`):
  grads, aux, metrics = method.loss_and_grads(variables, batch, rng)
  params <- optimizer.update(grads, ...)           (the method's optax transformation)
  buffers <- method.update_buffers(variables with the updated params, aux, step)
`aux` carries what the forward pass computed for the post-update (new BatchNorm statistics,
vectors to enqueue); the EMA of the *updated* parameters is taken in `update_buffers`.

Batches. The method's `train_transform` (a Grain RandomMap) turns one decoded record
(`{'image': PIL.Image, 'label': int}`) into a dict of fixed-shape numpy arrays: views, crops,
masks, whatever its loss reads. The engine batches them, makes global arrays and passes the
dict to `loss_and_grads` unchanged.
"""

import abc
from collections.abc import Mapping
from typing import Any, ClassVar, NamedTuple

import flax.linen as nn
import grain
import jax
import ml_collections
import optax

from capi_jax.base import schedules

PyTree = Any
Batch = Mapping[str, jax.Array]


class Variables(NamedTuple):
  """A method's variables: trained `params`, never-trained `frozen`, post-update `buffers`."""
  params: PyTree
  frozen: PyTree
  buffers: PyTree


class Pretrained(NamedTuple):
  """Weights a run starts from, read by the engine from one of `Method.pretrained_paths()`.

  Exactly one of `backbone` / `state_dict` is set, as numpy trees.

  Attributes:
    backbone: capi_jax evaluation-backbone params: `eval_params(..., 'ema')` of the run that
      wrote a capi_jax training checkpoint, or the 'backbone' of a `capi_jax.convert` output.
    state_dict: the tensors of an official-format file (`.pth`, `.pt`, `.npz`) under their
      official names, for the method to convert with its model's converter.
    method: the name of the method that wrote a capi_jax training checkpoint, else None.
    variables: that run's whole variables (else None), for methods that continue their own
      earlier stage (MIM-Refiner's stage 3 loads stage 2's heads, statistics and queues).
  """
  backbone: PyTree | None = None
  state_dict: dict[str, Any] | None = None
  method: str | None = None
  variables: Variables | None = None


class Method(abc.ABC):
  """Base class of pretraining methods; see the module docstring for the contract.

  Subclasses set `name` (the value of `config.method` that picks them), `loss_keys` (the
  metrics whose finiteness decides whether training diverged) and implement the abstract
  methods. `self.config` is the whole run config; the method reads its own section
  (`config.<name>`: its model, optimiser, data augmentation, ... as it defines them) and the
  method-neutral ones (`configs/common.py`: train, init, data source, efficiency, ...).
  """
  name: ClassVar[str]
  loss_keys: ClassVar[tuple[str, ...]]

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config

  # ------------------------------------------------------------------ config
  @classmethod
  @abc.abstractmethod
  def config_problems(cls, config: ml_collections.ConfigDict) -> list[str]:
    """Every invalid value of the keys this method reads, one sentence each naming the key,
    its value and what is valid; [] when usable. Must not raise on any config value."""

  # ------------------------------------------------------------------ state
  @abc.abstractmethod
  def init(self, rng: jax.Array) -> Variables:
    """Fresh variables (jit-able; the engine runs it with output shardings)."""

  def pretrained_paths(self) -> dict[str, str]:
    """Checkpoints a new run starts from, by role (e.g. {'init': ..., 'teacher': ...}).

    The engine reads each (a capi_jax training checkpoint of any method, a `capi_jax.convert`
    output, or an official-format file) into a `Pretrained` and passes them all to
    `from_pretrained` when a run starts; a resumed run restores its own checkpoint instead.
    The default: `config.init.checkpoint` as 'init', when set.
    """
    init = self.config.get('init', {})
    return {'init': init.checkpoint} if init.get('checkpoint') else {}

  def architecture_keys(self, role: str) -> str:
    """The config keys that must describe the architecture of the pretrained checkpoint `role`
    (named when one does not fit)."""
    del role
    return f'{self.name}.model'

  def from_pretrained(self, variables: Variables, pretrained: dict[str, Pretrained]
                      ) -> Variables:
    """`variables` (fresh from `init`) with the pretrained weights put in: the same structure
    and shapes. The default refuses: a method that pretrains from scratch loads nothing."""
    del variables
    raise ValueError(f'Method {self.name!r} trains from scratch and cannot start from '
                     f'{sorted(pretrained)} checkpoints: leave config.init.checkpoint empty.')

  @abc.abstractmethod
  def optimizer(self, params: PyTree) -> optax.GradientTransformation:
    """The transformation applied to `params` (`base.optim.adamw` with a `base.optim.Group` per
    parameter, frozen ones included; schedules; several optimisers via `base.optim.partition`);
    `params` may be ShapeDtypeStructs."""

  @abc.abstractmethod
  def schedules(self) -> dict[str, schedules.ScheduleFn]:
    """Step -> value functions logged every step (e.g. 'lr', 'momentum')."""

  # ------------------------------------------------------------------ step
  @abc.abstractmethod
  def loss_and_grads(self, variables: Variables, batch: Batch, rng: jax.Array
                     ) -> tuple[PyTree, PyTree, dict[str, jax.Array]]:
    """(grads shaped like params, aux for `update_buffers`, scalar metrics)."""

  def update_buffers(self, variables: Variables, aux: PyTree, step: jax.Array) -> PyTree:
    """New buffers after the optimiser update (`variables.params` are the updated ones).

    The default keeps them as they are (methods without EMA, queue or statistics).
    """
    del aux, step
    return variables.buffers

  # ------------------------------------------------------------------ data
  @abc.abstractmethod
  def train_transform(self) -> grain.transforms.RandomMap:
    """One decoded record -> this method's training example (dict of fixed-shape arrays)."""

  # ------------------------------------------------------------------ bookkeeping
  @abc.abstractmethod
  def architecture(self) -> dict[str, Any]:
    """JSON-able config values that decide the shapes of the variables: a checkpoint written
    with other values cannot be resumed (the engine adds `method`)."""

  @abc.abstractmethod
  def flops_per_step(self) -> dict[str, int]:
    """Analytic FLOPs of one step on the global batch, by part, with a 'total'."""

  # ------------------------------------------------------------------ evaluation
  @abc.abstractmethod
  def eval_model(self) -> nn.Module:
    """The backbone evaluations run: `apply({'params': p}, images (B, H, W, 3))` returns
    (global_repr (B, D), registers (B, R, D), feature_map (B, H/p, W/p, D)); R may be 0.

    Its attributes `patch_size` (p) and `embed_dim` (D) let the evaluation settings be checked
    before anything runs (resolutions in whole patches, attentive probes' heads of 64); a model
    without them skips those checks."""

  @abc.abstractmethod
  def eval_params(self, variables: Variables, which: str) -> PyTree:
    """`eval_model`'s params from the variables; which = 'student' (the trained weights) or
    'ema' (the averaged ones, or the trained ones for a method without an EMA)."""

  def official_backbone(self, state_dict: Mapping[str, Any], which: str
                        ) -> tuple[nn.Module, PyTree]:
    """An official-format file's tensors -> (the model to evaluate, its params, float32 numpy).

    The model has `eval_model`'s interface; usually it is `eval_model()`, but a method may
    evaluate another of its networks when the file holds that one (CAE v2: OpenAI CLIP's file
    is its teacher). `which` ('student' or 'ema') picks the network of a file that holds both.
    The default refuses: the method reads no official files.

    Raises:
      CheckpointMismatchError / ValueError: the file does not fit the configured model; the
        message names the parameter or the config key to change.
    """
    del state_dict, which
    raise ValueError(f'Method {self.name!r} reads no official-format checkpoint files: convert '
                     'the file first, or evaluate a capi_jax run or `capi_jax.convert` output.')
