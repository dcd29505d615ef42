"""The method interface: a toy method plugs into the unchanged engine (train, resume, evaluate,
benchmark) with nothing but `methods.register`."""

import dataclasses
import json
import pathlib

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from PIL import Image

from capi_jax import methods
from capi_jax.base import interface
from capi_jax.data import transforms
from capi_jax.engine import benchmark
from capi_jax.engine import checkpointing
from capi_jax.engine import config_checks
from capi_jax.engine import pretrained
from capi_jax.engine import train
from configs import tiny

_SIZE, _PATCH, _DIM = 16, 4, 8


class ToyEncoder(nn.Module):
  """Patch embedding only: (B, 16, 16, 3) -> the engine's eval triple."""

  @nn.compact
  def __call__(self, images):
    feature_map = nn.Conv(_DIM, (_PATCH, _PATCH), strides=_PATCH, name='embed')(images)
    b = images.shape[0]
    return feature_map.mean(axis=(1, 2)), jnp.zeros((b, 0, _DIM)), feature_map


@dataclasses.dataclass(frozen=True)
class ToyTransform(grain.transforms.RandomMap):
  """A random resized crop, normalised: {'images': (16, 16, 3)}."""

  def random_map(self, element, rng):
    image = transforms.random_resized_crop(element['image'], _SIZE, (0.5, 1.0), rng)
    return {'images': transforms.normalize(image)}


class Toy(interface.Method):
  """Predicts each patch's mean colour from its embedding; keeps an EMA of the encoder."""
  name = 'toy'
  loss_keys = ('loss',)

  @classmethod
  def config_problems(cls, config):
    return [] if config.toy.lr > 0 else [f'toy.lr={config.toy.lr} must be > 0.']

  def init(self, rng):
    k1, k2 = jax.random.split(rng)
    encoder = ToyEncoder().init(k1, jnp.zeros((1, _SIZE, _SIZE, 3)))['params']
    head = nn.Dense(3).init(k2, jnp.zeros((1, _DIM)))['params']
    return interface.Variables(params={'encoder': encoder, 'head': head},
                          frozen={'target_scale': jnp.float32(0.5)},
                          buffers={'ema': jax.tree.map(jnp.copy, encoder)})

  def optimizer(self, params):
    return optax.adam(self.config.toy.lr)

  def schedules(self):
    return {'lr': lambda step: jnp.float32(self.config.toy.lr)}

  def loss_and_grads(self, variables, batch, rng):
    images = batch['images']
    b = images.shape[0]
    targets = images.reshape(b, 4, _PATCH, 4, _PATCH, 3).mean(axis=(2, 4))
    targets = targets * variables.frozen['target_scale']

    def loss_fn(params):
      _, _, feature_map = ToyEncoder().apply({'params': params['encoder']}, images)
      predictions = nn.Dense(3).apply({'params': params['head']}, feature_map)
      return jnp.mean(jnp.square(predictions - targets))

    loss, grads = jax.value_and_grad(loss_fn)(variables.params)
    return grads, None, {'loss': loss}

  def update_buffers(self, variables, aux, step):
    ema = jax.tree.map(lambda e, p: 0.9 * e + 0.1 * p, variables.buffers['ema'],
                       variables.params['encoder'])
    return {'ema': ema}

  def train_transform(self):
    return ToyTransform()

  def architecture(self):
    return {'toy.dim': _DIM}

  def flops_per_step(self):
    return {'total': 3 * self.config.train.global_batch_size * 2 * 16 * 48 * _DIM}

  def eval_model(self):
    return ToyEncoder()

  def eval_params(self, variables, which):
    return variables.buffers['ema'] if which == 'ema' else variables.params['encoder']

  def from_pretrained(self, variables, pretrained):
    backbone = pretrained['init'].backbone
    return variables._replace(params={**variables.params, 'encoder': backbone},
                              buffers={'ema': backbone})


@pytest.fixture(autouse=True, scope='module')
def _registered():
  methods.register(Toy)


def _image_folder(root: pathlib.Path) -> str:
  """train/ and test/ splits of two classes: dark and bright noisy images."""
  rng = np.random.default_rng(0)
  for split, n in (('train', 24), ('test', 8)):
    for label, level in enumerate((60, 190)):
      (root / split / str(label)).mkdir(parents=True)
      for i in range(n):
        pixels = np.clip(rng.normal(level, 30, (20, 20, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / split / str(label) / f'{i}.png')
  return f'folder:{root}'


def _config(dataset='fashion_mnist', total_iters=4):
  c = tiny.get_config()
  c.method = 'toy'
  c.toy = dict(lr=1e-2)
  c.data.dataset = dataset
  c.data.image_size = _SIZE
  c.train.total_iters = total_iters
  c.train.global_batch_size = 16
  c.train.log_loss_every = 1
  c.train.checkpointing.period = 2
  c.evals.protocols = ('knn',)
  c.evals.batch_size = 16
  c.evals.random_init_baseline = False
  c.evals.knn.train = dict(dataset=dataset, split='train')
  c.evals.knn.test = dict(dataset=dataset, split='test')
  c.evals.knn.ks = (5,)
  c.evals.knn.pixels = False
  c.evals.knn.resolution = _SIZE
  return c


def test_the_toy_method_trains_resumes_and_evaluates(tmp_path):
  dataset = _image_folder(tmp_path / 'data')
  workdir = tmp_path / 'run'
  first = _config(dataset, total_iters=2)
  first.evals.final = False
  state = train.train_and_evaluate(first, workdir)
  assert int(state.step) == 2
  state = train.train_and_evaluate(_config(dataset), workdir)  # Resumes from step 2.
  assert int(state.step) == 4
  rows = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  assert [r['step'] for r in rows] == [0, 1, 2, 3]
  assert rows[-1]['loss'] < rows[0]['loss']
  assert all(r['lr'] == pytest.approx(1e-2) for r in rows)
  # The post-update ran: the EMA moved towards the trained encoder, the frozen part did not.
  assert not np.allclose(state.buffers['ema']['embed']['kernel'],
                         state.params['encoder']['embed']['kernel'])
  assert float(state.frozen['target_scale']) == 0.5
  results = json.loads((workdir / 'eval' / '4' / 'results.json').read_text())
  # Dark vs bright: the toy's features separate them.
  assert results['protocols']['knn']['results']['global/k5'] == 1.0, results
  assert checkpointing.Checkpointer(workdir / 'checkpoints', _config()).all_steps() == [2, 4]


def test_the_engine_checks_the_toy_config_and_benchmarks_it():
  bad = _config()
  bad.toy.lr = -1.0
  assert config_checks.problems(bad) == ['toy.lr=-1.0 must be > 0.']
  timing = benchmark.time_train_step(_config(), jax.devices()[:1], steps=1, warmup=0)
  assert timing['step_time_s'] > 0 and timing['peak_memory_bytes'] > 0


def test_unknown_method_is_a_config_error():
  config = _config()
  config.method = 'nope'
  assert 'Unknown method' in config_checks.problems(config)[0]
  assert 'toy' in methods.names() and 'capi' in methods.names()


def test_a_run_starts_from_another_runs_checkpoint(tmp_path):
  dataset = _image_folder(tmp_path / 'data')
  source = _config(dataset, total_iters=2)
  source.evals.final = False
  trained = train.train_and_evaluate(source, tmp_path / 'source')
  config = _config(dataset)
  config.init = dict(checkpoint=str(tmp_path / 'source'))
  method = Toy(config)
  fresh = method.init(jax.random.PRNGKey(1))
  started = pretrained.apply(method, fresh)
  # The source run's evaluation backbone (its EMA) is the new run's encoder and EMA.
  jax.tree.map(np.testing.assert_array_equal, started.params['encoder'],
               jax.device_get(trained.buffers['ema']))
  jax.tree.map(np.testing.assert_array_equal, started.params['head'], fresh.params['head'])

  capi_config = tiny.get_config()
  capi_config.init = dict(checkpoint=str(tmp_path / 'source'))
  with pytest.raises(ValueError, match="'capi' trains from scratch"):
    pretrained.apply(methods.from_config(capi_config), fresh)
