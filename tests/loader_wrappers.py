"""Test-only wrappers around the real training loader (fault injection, throttling, host rows).

Each keeps the loader checkpointable: Grain's Orbax handler stores the state of an iterator that
is not a Grain DatasetIterator as bytes, so `get_state`/`set_state` speak JSON bytes.
"""

import json
import multiprocessing
import os
import signal
import time

import jax.numpy as jnp
import numpy as np

from capi_jax.data import transforms
from capi_jax.methods.capi import method as capi_method


class WrappedLoader:
  """Delegates iteration state to `loader`; subclasses change the batches in `transform`."""

  def __init__(self, loader):
    self.loader = loader

  def __iter__(self):
    return self

  def __next__(self):
    return self.transform(next(self.loader))

  def transform(self, batch):
    return batch

  def extra_state(self) -> dict:
    return {}

  def load_extra_state(self, state: dict) -> None:
    del state

  def get_state(self) -> bytes:
    inner = self.loader.get_state()
    if isinstance(self.loader, WrappedLoader):  # A wrapped wrapper: its JSON bytes as JSON.
      inner = json.loads(inner.decode())
    return json.dumps({'inner': inner, **self.extra_state()}).encode()

  def set_state(self, state: bytes) -> None:
    state = json.loads(state.decode())
    inner = state['inner']
    self.loader.set_state(json.dumps(inner).encode() if isinstance(self.loader, WrappedLoader)
                          else inner)
    self.load_extra_state(state)

  def start_prefetch(self) -> None:
    self.loader.start_prefetch()

  def close(self) -> None:
    self.loader.close()


class HostRows(WrappedLoader):
  """The single-host training stream, reduced to this process's rows of each batch."""

  def __init__(self, loader, process_index: int, process_count: int):
    super().__init__(loader)
    self.index, self.count = process_index, process_count

  def transform(self, batch):
    n = len(batch['images']) // self.count
    return {k: v[self.index * n:(self.index + 1) * n] for k, v in batch.items()}


class Throttled(WrappedLoader):
  """A real training loader that takes `seconds` per batch, so a signal can land mid-run."""

  def __init__(self, loader, seconds: float):
    super().__init__(loader)
    self.seconds = seconds

  def transform(self, batch):
    time.sleep(self.seconds)
    return batch


class HostNormalisedCapi(capi_method.Capi):
  """CAPI that also takes float images normalised on the host (`NanFrom`'s): registered in
  place of the built-in 'capi' by the tests that inject NaNs (`methods.register`)."""

  def normalize(self, images):
    if jnp.issubdtype(images.dtype, jnp.floating):
      return images
    return super().normalize(images)


class NanFrom(WrappedLoader):
  """A real training loader whose images turn NaN from batch `start` on (fault injection).

  uint8 pixels cannot hold a NaN, so every batch's images are normalised here, on the host; the
  test's method (`HostNormalisedCapi`) passes them through.
  """

  def __init__(self, loader, start: int):
    super().__init__(loader)
    self.start, self.count = start, 0

  def transform(self, batch):
    batch = {**batch, 'images': transforms.normalize(batch['images'])}
    if self.count >= self.start:
      batch['images'][:] = np.nan
    self.count += 1
    return batch

  def extra_state(self) -> dict:
    return {'count': self.count}

  def load_extra_state(self, state: dict) -> None:
    self.count = state['count']


class KillsItsWorkers(WrappedLoader):
  """Kills (SIGKILL) the loader's worker processes before handing out batch `at`."""

  def __init__(self, loader, at: int):
    super().__init__(loader)
    self.at, self.count = at, 0

  def __next__(self):
    if self.count == self.at:
      for child in multiprocessing.active_children():
        os.kill(child.pid, signal.SIGKILL)
      print(f'killed the data workers before batch {self.at}', flush=True)
    self.count += 1
    return next(self.loader)
