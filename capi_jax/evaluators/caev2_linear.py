r"""CAE v2's linear probe ('caev2_linear'), as the release's scripts run `tools/run_linear.py`.

Atten4Vis/CAE @a7fd162 (`docs/reference/caev2_eval_protocols.md`), flags of
`project/CAEv2/scripts/caev2_*_300e.sh`: `--use_cls --enable_linear_eval --linear_type standard
--disable_rel_pos_bias --weight_decay 0 --blr 0.1 --epochs 90` (warm-up 10 epochs, min lr 0):
- Feature: the class token of the encoder's final output, after its last norm (the first
  prefix token for a backbone without a class token: a CAPI encoder's first register).
- Head: BatchNorm1d(D, affine=False, eps=1e-6) (batch statistics while training, running ones
  with momentum 0.1 when scoring), then Linear(D, classes): weight truncated normal std 0.01 (cut
  at +-2), bias 0. Everything else is frozen.
- Optimiser: LARS (`linear_util/lars.py`): for the weight (ndim > 1) g += wd p, then g x= 0.001
  ||p|| / ||g|| (1 where either norm is 0); the bias gets plain momentum; mu = 0.9 mu + g, p -=
  lr mu. lr = blr x batch / 256; weight decay 0.
- Schedule (`lr_sched.adjust_learning_rate`, before every update at the fractional epoch
  e = epoch + iteration / iterations per epoch): lr e / warmup while e < warmup, then min_lr +
  (lr - min_lr) (1 + cos(pi (e - warmup) / (epochs - warmup))) / 2.
- Loss: cross-entropy. Train images: the release's TF-style RandomResizedCrop (`crop_box`: one
  draw, no retries) + horizontal flip, bicubic; test: shorter side to resolution x 256 / 224,
  central crop. The number reported: top-1 on the test set after each epoch, and the best over
  epochs (the release's "Max accuracy").
The release runs the head in fp16 autocast with a loss scaler; here float32.
"""

from collections.abc import Callable
import dataclasses
import functools
import math
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from capi_jax.data import transforms as image_ops
from capi_jax.evaluators import backbone as backbone_lib
from capi_jax.evaluators import datasets
from capi_jax.evaluators import online
from capi_jax.evaluators import protocol

PyTree = Any

BN_EPS, BN_MOMENTUM = 1e-6, 0.1
INIT_STD = 0.01
MOMENTUM, TRUST = 0.9, 0.001
CROP_SCALE, CROP_RATIO = (0.08, 1.0), (3 / 4, 4 / 3)


# ----------------------------------------------------------------------------------------------
# Train transform.


def crop_box(height: int, width: int, u_area: float, u_ratio: float, u_top: float,
             u_left: float, scale: tuple[float, float] = CROP_SCALE,
             ratio: tuple[float, float] = CROP_RATIO) -> tuple[int, int, int, int]:
  """`linear_util.crop.RandomResizedCrop.get_params` (TF / BYOL style) from four uniform
  variates in [0, 1): (top, left, h, w).

  Area fraction U(scale), aspect ratio exp(U(log ratio)); w = round(sqrt(A r)), h = round(sqrt(A
  / r)), each clipped to the image; top and left uniform over the valid offsets. One draw, no
  retries and no fallback (unlike torchvision's).
  """
  area = height * width * (scale[0] + (scale[1] - scale[0]) * u_area)
  log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
  aspect = math.exp(log_lo + (log_hi - log_lo) * u_ratio)
  w = min(int(round(math.sqrt(area * aspect))), width)
  h = min(int(round(math.sqrt(area / aspect))), height)
  top = min(int(u_top * (height - h + 1)), height - h)
  left = min(int(u_left * (width - w + 1)), width - w)
  return top, left, h, w


def train_image(image: Image.Image, size: int, box: tuple[int, int, int, int], flip: bool
                ) -> np.ndarray:
  """Crop `box` (top, left, h, w), resize to (size, size) bicubic, maybe flip, normalise:
  float32 (size, size, 3) (torchvision's resized_crop on a PIL image, then ToTensor +
  Normalize)."""
  top, left, h, w = box
  image = image.crop((left, top, left + w, top + h)).resize((size, size),
                                                            Image.Resampling.BICUBIC)
  if flip:
    image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
  return image_ops.normalize(image)


@dataclasses.dataclass(frozen=True)
class TrainTransform:
  """The release's linear-probe train transform as readers call it: (image, rng) -> image."""
  size: int

  def __call__(self, image: Image.Image, rng: np.random.Generator) -> np.ndarray:
    u = rng.random(5)
    box = crop_box(image.height, image.width, *u[:4])
    return train_image(image, self.size, box, bool(u[4] < 0.5))


# ----------------------------------------------------------------------------------------------
# Schedule, head, LARS.


def lr_at(epoch: float, lr: float, warmup_epochs: float, epochs: float, min_lr: float = 0.0
          ) -> float:
  """`lr_sched.adjust_learning_rate` at the fractional epoch `epoch`."""
  if epoch < warmup_epochs:
    return lr * epoch / warmup_epochs
  return min_lr + (lr - min_lr) * 0.5 * (
      1.0 + math.cos(math.pi * (epoch - warmup_epochs) / (epochs - warmup_epochs)))


def schedule(lr: float, warmup_epochs: float, epochs: int, iters_per_epoch: int,
             min_lr: float = 0.0) -> np.ndarray:
  """(epochs x iters_per_epoch,) float64 lr of every update."""
  return np.asarray([lr_at(e + i / iters_per_epoch, lr, warmup_epochs, epochs, min_lr)
                     for e in range(epochs) for i in range(iters_per_epoch)])


def init_head(rng: jax.Array, dim: int, num_classes: int) -> PyTree:
  """{'kernel': (D, C) truncated normal std 0.01, 'bias': (C,) zeros}; BN statistics apart."""
  return {'kernel': INIT_STD * jax.random.truncated_normal(rng, -2 / INIT_STD, 2 / INIT_STD,
                                                           (dim, num_classes)),
          'bias': jnp.zeros((num_classes,))}


def init_stats(dim: int) -> PyTree:
  return {'mean': jnp.zeros((dim,)), 'var': jnp.ones((dim,))}


def _bn_train(x: jax.Array, stats: PyTree) -> tuple[jax.Array, PyTree]:
  mean = x.mean(0)
  var = jnp.mean(jnp.square(x - mean), 0)
  n = x.shape[0]
  new = {'mean': (1 - BN_MOMENTUM) * stats['mean'] + BN_MOMENTUM * mean,
         'var': (1 - BN_MOMENTUM) * stats['var'] + BN_MOMENTUM * var * n / max(n - 1, 1)}
  return (x - mean) * jax.lax.rsqrt(var + BN_EPS), new


def logits_eval(params: PyTree, stats: PyTree, features: jax.Array) -> jax.Array:
  """Eval-mode head: (B, D) class tokens -> (B, C)."""
  x = (features.astype(jnp.float32) - stats['mean']) * jax.lax.rsqrt(stats['var'] + BN_EPS)
  return x @ params['kernel'] + params['bias']


def lars(params: PyTree, grads: PyTree, mu: PyTree, lr: jax.Array, weight_decay: float = 0.0
         ) -> tuple[PyTree, PyTree]:
  """One LARS step (module docstring): (params, momentum buffers)."""

  def direction(p, g):
    if p.ndim <= 1:
      return g
    g = g + weight_decay * p
    p_norm, g_norm = jnp.linalg.norm(p), jnp.linalg.norm(g)
    q = jnp.where((p_norm > 0) & (g_norm > 0), TRUST * p_norm / g_norm, 1.0)
    return g * q

  mu = jax.tree.map(lambda m, p, g: MOMENTUM * m + direction(p, g), mu, params, grads)
  return jax.tree.map(lambda p, m: p - lr * m, params, mu), mu


def train_step(params: PyTree, mu: PyTree, stats: PyTree, features: jax.Array,
               labels: jax.Array, lr: jax.Array) -> tuple[PyTree, PyTree, PyTree, jax.Array]:
  """One update on a batch of class tokens (B, D): (params, momentum, statistics, loss)."""
  x, stats = _bn_train(features.astype(jnp.float32), stats)

  def loss_fn(p):
    log_p = jax.nn.log_softmax(x @ p['kernel'] + p['bias'], -1)
    return -jnp.mean(jnp.take_along_axis(log_p, labels[:, None], -1))

  loss, grads = jax.value_and_grad(loss_fn)(params)
  params, mu = lars(params, grads, mu, lr)
  return params, mu, stats, loss


# ----------------------------------------------------------------------------------------------
# The online run.


@dataclasses.dataclass(frozen=True)
class ClassToken:
  """A forward giving the class token of the final output: (params, images) -> (B, D)."""
  encode: backbone_lib.EncodeForward

  def __call__(self, params, images) -> jax.Array:
    return self.encode(params, images)['tokens'][:, 0]


@functools.partial(jax.jit, static_argnames=('forward',), donate_argnames=('params', 'mu',
                                                                            'stats'))
def _online_step(params, mu, stats, backbone_params, images, labels, lr, *, forward):
  return train_step(params, mu, stats, forward(backbone_params, images), labels, lr)


@functools.partial(jax.jit, static_argnames=('forward',))
def _eval_correct(params, stats, backbone_params, images, labels, valid, *, forward):
  logits = logits_eval(params, stats, forward(backbone_params, images))
  return jnp.sum((jnp.argmax(logits, -1) == labels) & valid)[None]


@dataclasses.dataclass(frozen=True)
class Settings:
  """The release's numbers: blr 0.1, 90 epochs, 10 warm-up, batch 16384 (tiny) / 8192."""
  blr: float = 0.1
  epochs: int = 90
  warmup_epochs: float = 10
  min_lr: float = 0.0
  batch_size: int = 8192
  resolution: int = 224
  num_classes: int = 0
  log_every: int = 100


def run(backbone, train_set: datasets.ClassifSet, test_set: datasets.ClassifSet,
        settings: Settings, *, num_workers: int = 0, seed: int = 0,
        log: Callable[[str], None] = print) -> tuple[dict[str, float], dict[str, Any]]:
  """Trains the head online and scores it after every epoch (module docstring).

  Returns:
    ({'max': best test accuracy over epochs, 'last': after the last epoch}, details).
  """
  num_classes = online.num_classes('caev2_linear', train_set, settings.num_classes)
  forward = ClassToken(backbone.require_tokens('caev2_linear').forward(()))
  res = settings.resolution
  dim = jax.eval_shape(forward, backbone.params,
                       jax.ShapeDtypeStruct((1, res, res, 3), jnp.float32)).shape[-1]
  replicated = jax.sharding.NamedSharding(backbone.mesh, jax.sharding.PartitionSpec())
  state = {'params': init_head(jax.random.key(seed), dim, num_classes), 'stats': init_stats(dim)}
  state['mu'] = jax.tree.map(jnp.zeros_like, state['params'])
  state = jax.device_put(state, replicated)
  per_epoch = len(train_set) // settings.batch_size
  lr = settings.blr * settings.batch_size / 256
  lrs = schedule(lr, settings.warmup_epochs, settings.epochs, max(per_epoch, 1),
                 settings.min_lr)

  def update(it, images, labels):
    state['params'], state['mu'], state['stats'], loss = _online_step(
        state['params'], state['mu'], state['stats'], backbone.params, images, labels,
        jnp.float32(lrs[it]), forward=forward)
    return loss

  def correct(images, labels, valid):
    return _eval_correct(state['params'], state['stats'], backbone.params, images, labels, valid,
                         forward=forward)

  outcome = online.run('caev2_linear', backbone, train_set, test_set,
                       online.Heads(update, correct, ['linear']), epochs=settings.epochs,
                       batch_size=settings.batch_size, resolution=res,
                       train_transform=TrainTransform(res), num_workers=num_workers, seed=seed,
                       log_every=settings.log_every, log=log)
  accuracy = outcome.accuracy[:, 0]
  results = {'max': float(accuracy.max()), 'last': float(accuracy[-1])}
  details = {'accuracy_per_epoch': accuracy.tolist(), 'lr': lr,
             'best_epoch': int(accuracy.argmax()) + 1, 'updates_per_epoch': per_epoch,
             'loss': outcome.losses, 'train_seconds': outcome.train_seconds,
             'eval_seconds': outcome.eval_seconds}
  return results, details


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class Linear(protocol.Protocol):
  """'caev2_linear': CAE v2's linear probe (module docstring). Results 'max' (the release's
  "Max accuracy") and 'last'."""
  name: ClassVar[str] = 'caev2_linear'

  train: Any  # Image set the head trains on (ImageNet train).
  test: Any  # Image set scored after every epoch (ImageNet val).
  num_classes: int  # 0: the training set's.
  blr: float  # 0.1; lr = blr x batch / 256.
  epochs: int  # 90
  warmup_epochs: float  # 10
  min_lr: float  # 0
  batch_size: int  # Global: 16384 (tiny), 8192 (small, base); ViT-L (CAE v1 script): 16384.
  resolution: int  # 224
  log_every: int

  @property
  def settings(self) -> Settings:
    return Settings(self.blr, self.epochs, self.warmup_epochs, self.min_lr, self.batch_size,
                    self.resolution, self.num_classes, self.log_every)

  def check(self, p, key, model):
    datasets.check_set(p, f'{key}.train', self.train)
    datasets.check_set(p, f'{key}.test', self.test)
    p.number(f'{key}.num_classes', self.num_classes, 0, integer=True)
    p.check(protocol.is_number(self.blr) and self.blr > 0, f'{key}.blr={self.blr!r} must be > 0.')
    p.number(f'{key}.epochs', self.epochs, 1, integer=True)
    p.check(protocol.is_number(self.warmup_epochs) and 0 <= self.warmup_epochs < self.epochs,
            f'{key}.warmup_epochs={self.warmup_epochs!r} must be in [0, epochs).')
    p.check(protocol.is_number(self.min_lr) and self.min_lr >= 0,
            f'{key}.min_lr={self.min_lr!r} must be >= 0.')
    p.number(f'{key}.batch_size', self.batch_size, 2, integer=True)
    protocol.check_resolution(p, f'{key}.resolution', self.resolution, model)
    p.number(f'{key}.log_every', self.log_every, 1, integer=True)

  def run(self, backbone, env, out_dir, log):
    del out_dir
    train = datasets.classif_set('train', self.train, env.data_dir)
    test = datasets.classif_set('test', self.test, env.data_dir)
    return run(backbone, train, test, self.settings, num_workers=env.num_workers,
               seed=env.seed, log=log)
