"""Pretraining methods, by name: `config.method` picks one (`from_config`).

A method is a config section plus a `capi_jax.base.interface.Method` subclass; the engine calls
only that interface. The built-in methods are imported lazily by module path, so the engine
(which imports this registry) never imports a method's code itself. `register` adds one at run
time (a research prototype, a test's toy method) without touching the engine.
"""

import importlib

import ml_collections

from capi_jax.base import interface

# name -> 'module:Class' of the built-in methods.
_BUILT_IN = {
    'capi': 'capi_jax.methods.capi.method:Capi',
    'caev2': 'capi_jax.methods.caev2.method:CaeV2',
    'mim_refiner': 'capi_jax.methods.mim_refiner.method:MimRefiner',
    'finetune': 'capi_jax.methods.finetune.method:Finetune',
}
_REGISTERED: dict[str, type[interface.Method]] = {}


def register(method_cls: type[interface.Method]) -> type[interface.Method]:
  """Makes `method_cls` selectable as `config.method = method_cls.name` (usable as decorator)."""
  _REGISTERED[method_cls.name] = method_cls
  return method_cls


def names() -> list[str]:
  return sorted({*_BUILT_IN, *_REGISTERED})


def get(name: str) -> type[interface.Method]:
  """The Method subclass called `name`."""
  if name in _REGISTERED:
    return _REGISTERED[name]
  if name not in _BUILT_IN:
    raise ValueError(f'Unknown method {name!r} (config.method); known: {names()}.')
  module, cls = _BUILT_IN[name].split(':')
  return getattr(importlib.import_module(module), cls)


def from_config(config: ml_collections.ConfigDict) -> interface.Method:
  """The method named by `config.method`, built from `config`."""
  return get(config.method)(config)
