"""The package's layers: each part imports only parts of its own layer or below, at module level.

Layers, bottom to top (docs/architecture.md has the picture):
  base                  errors, the method interface, optimiser pieces, schedules, sharding
  models                transformer parts and backbones
  weights               official weight files and conversion rules
  data                  sources, transforms, masking, input pipelines
  methods, evaluators   pretraining methods and evaluation protocols (each behind a registry)
  engine                state, step, loop, checkpoints, runs, evaluation runner
  reference             parity suites against the official releases (behind check_reference)
  commands              main, evaluate, convert, bench, aot, scaling, prepare_data,
                        check_reference, extract, and api (`capi_jax.load`: the package's
                        Python entry point)
A part is a subpackage or a top-level module. A function-level import of the package is a
cycle in hiding, so there are none.
"""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / 'capi_jax'
LAYERS = (('base',), ('models',), ('weights',), ('data',), ('methods', 'evaluators'),
          ('engine',), ('reference',), ('commands',))
COMMANDS = ('main', 'evaluate', 'convert', 'bench', 'aot', 'scaling', 'prepare_data',
            'check_reference', 'api', 'extract')


def _part(module: str) -> str:
  """'capi_jax.engine.train' -> 'engine'; top-level command modules -> 'commands'."""
  parts = module.split('.')
  if len(parts) == 1:
    return 'package'
  return 'commands' if parts[1] in COMMANDS else parts[1]


def _layer(part: str) -> int:
  return next(i for i, names in enumerate(LAYERS) if part in names)


def _imports() -> list[tuple[str, str, bool]]:
  """(importing module, imported capi_jax module, inside a function) for every import."""
  found = []
  for path in sorted(PACKAGE.rglob('*.py')):
    module = '.'.join(path.relative_to(PACKAGE.parent).with_suffix('').parts)
    module = module.removesuffix('.__init__')
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
      if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
        for inner in ast.walk(node):
          for name in _imported(inner):
            found.append((module, name, True))
    top_level = [n for n in ast.walk(tree)]
    for node in top_level:
      for name in _imported(node):
        found.append((module, name, False))
  # Function-level imports were also seen by the module-level walk; keep one entry each.
  inner = {(a, b) for a, b, f in found if f}
  return [(a, b, (a, b) in inner) for a, b in sorted({(a, b) for a, b, _ in found})]


def _imported(node: ast.AST) -> list[str]:
  if isinstance(node, ast.Import):
    return [a.name for a in node.names if a.name.startswith('capi_jax')]
  if isinstance(node, ast.ImportFrom) and (node.module or '').startswith('capi_jax'):
    return [f'{node.module}.{a.name}' if node.module == 'capi_jax' else node.module
            for a in node.names]
  return []


def test_no_import_of_the_package_inside_a_function():
  inner = [f'{a} -> {b}' for a, b, in_function in _imports() if in_function]
  assert not inner, inner


def test_each_part_imports_only_its_layer_and_below():
  wrong = []
  for importer, imported, _ in _imports():
    a, b = _part(importer), _part(imported)
    if a == 'package' or b == 'package' or a == b:
      continue
    if _layer(b) > _layer(a) or (_layer(b) == _layer(a) and a != b):
      wrong.append(f'{importer} ({a}) -> {imported} ({b})')
  assert not wrong, '\n'.join(wrong)


def test_no_cycle_between_parts():
  graph: dict[str, set[str]] = {}
  for importer, imported, _ in _imports():
    a, b = _part(importer), _part(imported)
    if a != b:
      graph.setdefault(a, set()).add(b)
  # Tarjan's strongly connected components.
  index, low, stack, on_stack, components = {}, {}, [], set(), []

  def visit(v: str) -> None:
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in graph.get(v, ()):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      components.append(component)

  for v in list(graph):
    if v not in index:
      visit(v)
  assert [c for c in components if len(c) > 1] == []


@pytest.mark.parametrize('part', [p for layer in LAYERS for p in layer if p != 'commands'])
def test_every_part_exists(part):
  assert (PACKAGE / part).is_dir()
