"""The import rules of docs/architecture.md, read from the source: layers, no cycles, sizes."""

import ast
import pathlib

from conftest import REPO
import pytest

PACKAGE = REPO / "ccdd_jax"

# Layers from the bottom; a module may import its own layer and the layers below.
# "base" is ccdd_jax/__init__.py (CCDDError), lists.py, log.py and streams.py.
LAYERS = ("base", "devices", "data", "method", "threats", "config", "run", "main")
# Modules that must stay light, each with the only ccdd_jax modules it may import:
# configs/*.py load the schema, and main.py reads the stage table and the config
# loader before jax.distributed.initialize.
LIGHT = {
  "ccdd_jax.config.schema": set(),
  "ccdd_jax.run.stages": set(),
  "ccdd_jax.config.loader": {"ccdd_jax"},
}
MAIN_TOP_LEVEL = {"ccdd_jax", "ccdd_jax.config.loader", "ccdd_jax.run.stages"}


def module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(REPO).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> str:
  """The layer of a ccdd_jax module (LAYERS)."""
  parts = module.split(".")
  if len(parts) == 1 or parts[1] in ("lists", "log", "streams"):
    return "base"
  if parts[1] == "configs":
    return "config"
  return parts[1]


def imports(path: pathlib.Path, top_level_only: bool = False) -> set[str]:
  """The ccdd_jax modules a file imports (in functions too, unless `top_level_only`)."""
  tree = ast.parse(path.read_text())
  nodes = tree.body if top_level_only else ast.walk(tree)
  found = set()
  for node in nodes:
    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ccdd_jax"):
      for alias in node.names:
        candidate = f"{node.module}.{alias.name}"
        found.add(candidate if _is_module(candidate) else node.module)
    elif isinstance(node, ast.Import):
      found.update(a.name for a in node.names if a.name.startswith("ccdd_jax"))
  return found


def _is_module(name: str) -> bool:
  relative = pathlib.Path(*name.split("."))
  return (REPO / relative.with_suffix(".py")).is_file() or (REPO / relative).is_dir()


def import_graph() -> dict[str, set[str]]:
  """ccdd_jax module -> the ccdd_jax modules it imports."""
  return {module_name(p): imports(p) for p in sorted(PACKAGE.rglob("*.py"))}


def violations(graph: dict[str, set[str]]) -> list[str]:
  """Every import that breaks a rule of docs/architecture.md, as 'a -> b: why'."""
  found = []
  for module, targets in sorted(graph.items()):
    for target in sorted(targets - {module}):
      if LAYERS.index(layer(target)) > LAYERS.index(layer(module)):
        found.append(f"{module} -> {target}: {layer(module)} may not import {layer(target)}")
    if module in LIGHT and targets - LIGHT[module] - {module}:
      found.append(f"{module} -> {sorted(targets - LIGHT[module])}: it must stay light")
  return found + [f"cycle: {' -> '.join(c)}" for c in cycles(graph)]


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """The import cycles among modules (one path per cycle found by depth-first search)."""
  found, state = [], {}

  def visit(node, path):
    state[node] = "open"
    for nxt in sorted(graph.get(node, ())):
      if nxt == node or nxt not in graph or graph[nxt] is None:
        continue
      if state.get(nxt) == "open":
        found.append(path[path.index(nxt) :] + [nxt])
      elif nxt not in state:
        visit(nxt, path + [nxt])
    state[node] = "done"

  for node in sorted(graph):
    if node not in state:
      visit(node, [node])
  return found


def test_the_package_follows_its_import_rules():
  assert violations(import_graph()) == []


@pytest.mark.parametrize(
  "module, forbidden",
  [
    ("ccdd_jax.method.distill", "ccdd_jax.run.pipeline"),  # The method above the run.
    ("ccdd_jax.method.experts", "ccdd_jax.threats.model_attacks"),  # Pruning lives in method.
    ("ccdd_jax.method.models", "ccdd_jax.config.validation"),  # A registry reading the config.
    ("ccdd_jax.devices.sharding", "ccdd_jax.method.distill"),  # Devices below the method.
    ("ccdd_jax.run.stages", "ccdd_jax.run.context"),  # The stage table stays light.
    ("ccdd_jax.method.watermark", "ccdd_jax.method.verify"),  # verify imports watermark.
  ],
)
def test_a_forbidden_import_is_found(module, forbidden):
  graph = import_graph()
  graph[module] = graph[module] | {forbidden}
  assert any(v.startswith(f"{module} -> ") or module in v for v in violations(graph))


def test_main_reads_only_the_light_modules_before_jax_starts():
  assert imports(PACKAGE / "main.py", top_level_only=True) <= MAIN_TOP_LEVEL


def test_shipped_configs_import_only_the_config_package():
  for path in sorted((REPO / "configs").glob("*.py")):
    assert {layer(m) for m in imports(path)} <= {"base", "config"}, path.name


@pytest.mark.parametrize("folder", ["ccdd_jax", "experiments", "benchmarks"])
def test_no_module_over_500_lines_and_no_function_over_80_unless_it_says_why(folder):
  for path in sorted((REPO / folder).rglob("*.py")):
    text = path.read_text()
    assert text.count("\n") <= 500, f"{path.relative_to(REPO)}: {text.count(chr(10))} lines"
    for node in ast.walk(ast.parse(text)):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        length = node.end_lineno - node.lineno + 1
        why = "lines because" in (ast.get_docstring(node) or "")
        assert length <= 80 or why, f"{path.relative_to(REPO)}:{node.name} has {length} lines"
