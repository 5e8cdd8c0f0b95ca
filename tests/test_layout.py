"""The code's shape: groups sit below the engine, the families above it, and every factory
has a signature that tools can read."""

import ast
import inspect
import pathlib
import typing

import optax
import pytest

import psgd_optax as psgd
from psgd_optax._src import options as options_lib

SRC = pathlib.Path(psgd.__file__).parent / "_src"


def _imports(path):
  """The psgd_optax modules a file imports (``from a.b import c`` gives ``a.b`` and
  ``a.b.c``, which may be a module)."""
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.ImportFrom) and node.module:
      found.add(node.module)
      found.update(f"{node.module}.{alias.name}" for alias in node.names)
    elif isinstance(node, ast.Import):
      found.update(alias.name for alias in node.names)
  return {name for name in found if name.startswith("psgd_optax")}


def _reachable(module, graph):
  seen, stack = set(), [module]
  while stack:
    for imported in graph.get(stack.pop(), ()):
      if imported not in seen:
        seen.add(imported)
        stack.append(imported)
  return seen


def test_groups_import_neither_the_engine_nor_the_families():
  graph = {}
  for path in SRC.rglob("*.py"):
    name = "psgd_optax._src." + ".".join(path.relative_to(SRC).with_suffix("").parts)
    graph[name.removesuffix(".__init__")] = _imports(path)
  above = {"psgd_optax._src.engine", "psgd_optax._src.families",
           "psgd_optax._src.optimizers", "psgd_optax._src.options"}
  groups = [name for name in graph if name.startswith("psgd_optax._src.groups.")]
  assert len(groups) >= 7
  for group in groups:
    assert not _reachable(group, graph) & above, (group, _reachable(group, graph) & above)
  # The engine knows groups only through the protocol module.
  engine_groups = {m for m in graph["psgd_optax._src.engine"] if ".groups." in m}
  assert engine_groups <= {"psgd_optax._src.groups.base",
                           "psgd_optax._src.groups.base.GroupForShape"}, engine_groups


FAMILIES = [psgd.kron, psgd.dense, psgd.diag, psgd.lra, psgd.xmat, psgd.butterfly,
            psgd.splu, psgd.scan, psgd.scaw]
ENGINE_OPTIONS = [name for name in inspect.signature(psgd.preconditioner).parameters
                  if name != "group_for_shape"]


@pytest.mark.parametrize("factory", FAMILIES + [psgd.optimizers.kron, psgd.optimizers.dense,
                                                psgd.optimizers.diag])
def test_every_factory_declares_every_option_with_its_default(factory):
  parameters = inspect.signature(factory).parameters
  assert all(p.kind is not inspect.Parameter.VAR_KEYWORD for p in parameters.values())
  assert set(ENGINE_OPTIONS) <= set(parameters)
  assert all(p.default is not inspect.Parameter.empty for name, p in parameters.items()
             if name in ENGINE_OPTIONS)
  # The source declares every option with its type (for pyright and IDEs): written out, or
  # in the TypedDict its **options unpacks.
  source = inspect.getsource(factory)
  typed = source.split("**options: Unpack[")[1].split("]")[0]
  declared = typing.get_type_hints(getattr(options_lib, typed), include_extras=False)
  for name in parameters:
    assert f"{name}:" in source or name in declared, name
  assert all(entry in factory.__doc__ for entry in ENGINE_OPTIONS) or factory.__module__ \
      == "psgd_optax._src.optimizers"


def test_inject_hyperparams_sees_every_numeric_option():
  tx = optax.inject_hyperparams(psgd.optimizers.kron)(
      learning_rate=0.1, precond_lr=0.2, update_probability=0.5, damping=1e-5, max_skew=2.0,
      lipschitz_decay=0.8, weight_decay=1e-3)
  state = tx.init({"w": optax.tree.zeros_like({"w": [[0.0] * 3] * 2})["w"]})
  assert {"learning_rate", "precond_lr", "update_probability", "damping", "max_skew",
          "lipschitz_decay", "weight_decay"} <= set(state.hyperparams)


def test_engine_reads_top_down_within_its_budget():
  """The algorithm (coin, probes, lax.cond fit, NaN guard, first-pair scale, P·g) in at most
  350 lines of engine.py, docstrings included; the layout lives in stacks.py."""
  assert len((SRC / "engine.py").read_text().splitlines()) <= 350
