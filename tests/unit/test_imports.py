"""The import structure: layering, no cycles, and control services that never load torch.

Three rules, each checked on the real tree and, by a negative test, on a small synthetic
tree written to ``tmp_path`` that breaks it on purpose (so a re-added violation is shown
to fail):

* Layering: no package under ``services/`` imports another one (a service reaches
  another only over MQTT; ``services/cli`` is not a service and imports ``shared``
  only; the gateway may import the client library, ``CLIENT_LIBRARY``), and nothing in
  ``shared/`` imports ``services``. For example, adding
  ``from services.monitor.logic import Persistence`` to services/orchestrator/logic.py
  makes ``test_no_package_under_services_imports_another`` fail naming both modules.
* No import cycle among the modules of ``shared/``, nor among those of one package under
  ``services/`` (strongly connected components of the module graph; each cycle found is
  printed as ``a -> b -> a``).
* The four control services (monitor, orchestrator, split_reviser, broadcaster) do not
  import torch: a fresh interpreter imports every module of the package and its
  ``__main__`` and must not have ``torch`` in ``sys.modules`` (torch costs about 200 MB
  resident; docs/PERFORMANCE.md). Re-adding ``from shared.model.shard import ShardStore``
  to services/orchestrator/service.py makes it fail, with the import chain that did it.

Every import statement counts: module level, inside functions and under
``if TYPE_CHECKING:``; relative imports are resolved. ``from package import name`` is an
edge to ``package.name`` when that is a module of the tree, else to ``package``. Importing
``a.b.c`` also runs ``a/__init__`` and ``a/b/__init__``; those implicit edges are not
counted (every package's ``__init__`` would otherwise be in a cycle with the modules it
re-exports).
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CONTROL_SERVICES = ("monitor", "orchestrator", "split_reviser", "broadcaster")
HEAVY_MODULES = ("torch",)
FRESH_IMPORT_TIMEOUT_S = 120.0

Graph = dict[str, set[str]]


# --- the checkers ---------------------------------------------------------------------


def module_name(root: Path, path: Path) -> str:
    """``services/cli/main.py`` -> ``services.cli.main``; a package's ``__init__.py`` is
    the package itself."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def tree_modules(root: Path, top_packages: Iterable[str]) -> dict[str, Path]:
    """Every module under the given top-level package folders, name -> file (sorted)."""
    found: dict[str, Path] = {}
    for top in top_packages:
        for path in sorted((root / top).rglob("*.py")):
            found[module_name(root, path)] = path
    return found


def _imported_names(
    tree: ast.AST, importer: str, is_package: bool
) -> Iterable[tuple[str, str | None]]:
    """(module, imported attribute or None) for every import statement anywhere in ``tree``."""
    package = importer if is_package else importer.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, None
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)] if node.level > 1 else anchor
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                yield base, alias.name


def import_graph(modules: Mapping[str, Path]) -> Graph:
    """Module -> the modules of ``modules`` it imports (edges leaving the tree dropped)."""
    graph: Graph = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        edges: set[str] = set()
        for target, attribute in _imported_names(tree, name, path.name == "__init__.py"):
            submodule = f"{target}.{attribute}" if attribute not in (None, "*") else ""
            if submodule in modules:
                edges.add(submodule)
            elif target in modules:
                edges.add(target)
        graph[name] = edges
    return graph


def _unit(module: str) -> str | None:
    """The layering unit of a module: ``services.X`` for anything under services/X,
    ``shared`` for anything under shared/, else None."""
    parts = module.split(".")
    if parts[0] == "services" and len(parts) > 1:
        return f"services.{parts[1]}"
    return "shared" if parts[0] == "shared" else None


CLIENT_LIBRARY = frozenset({"services.cli.client", "services.cli.streams"})
"""The client library of the running system: the one part of ``services/cli`` that the
gateway (services/gateway, an HTTP front of the request topics) may import."""


def layering_violations(graph: Mapping[str, set[str]]) -> list[str]:
    """``importer -> imported`` for each edge from one package under services/ into
    another, and for each edge from shared/ into services/ (sorted)."""
    found = []
    for importer, targets in graph.items():
        source = _unit(importer)
        for target in targets:
            destination = _unit(target)
            crosses_services = (
                source is not None and destination is not None and source != destination
                and source.startswith("services.") and destination.startswith("services.")
            )  # fmt: skip
            if source == "services.gateway" and target in CLIENT_LIBRARY:
                crosses_services = False  # the gateway is a client of the running system
            shared_on_services = source == "shared" and target.split(".")[0] == "services"
            if crosses_services or shared_on_services:
                found.append(f"{importer} -> {target}")
    return sorted(found)


def _strong_components(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components (iterative: no recursion limit)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, successors = work[-1]
            advanced = False
            for successor in successors:
                if successor not in index:
                    index[successor] = low[successor] = len(index)
                    stack.append(successor)
                    on_stack.add(successor)
                    work.append((successor, iter(sorted(graph[successor]))))
                    advanced = True
                    break
                if successor in on_stack:
                    low[node] = min(low[node], index[successor])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                components.append(sorted(component))
    return components


def _cycle_through(graph: Mapping[str, set[str]], start: str, members: set[str]) -> list[str]:
    """A shortest cycle ``start -> ... -> start`` inside ``members`` (breadth first)."""
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for successor in sorted(graph[node] & members):
                if successor == start:  # walk back from node to start
                    path = [node]
                    while path[-1] != start:
                        path.append(previous[path[-1]])
                    return [*reversed(path), start]
                if successor not in previous:
                    previous[successor] = node
                    following.append(successor)
        frontier = following
    raise AssertionError(f"{start} is in no cycle within {sorted(members)}")


def import_cycles(graph: Mapping[str, set[str]]) -> list[str]:
    """One printed cycle per strongly connected component that has one (naming the
    component's other modules too), looking only at edges inside one unit (shared/, or
    one package under services/); sorted."""
    within: Graph = {}
    for module, targets in graph.items():
        unit = _unit(module)
        within[module] = {
            target for target in targets if unit is not None and _unit(target) == unit
        }
    cycles = []
    for component in _strong_components(within):
        if len(component) > 1 or component[0] in within[component[0]]:
            cycle = _cycle_through(within, component[0], set(component))
            others = sorted(set(component) - set(cycle))
            tail = f" (also tied into this cycle: {', '.join(others)})" if others else ""
            cycles.append(" -> ".join(cycle) + tail)
    return sorted(cycles)


_SPY = """
import importlib, json, sys, traceback
heavy, modules, root = set(json.loads(sys.argv[1])), json.loads(sys.argv[2]), sys.argv[3]
chains = {}
class HeavyImportSpy:
    # Records who asked first; finds nothing itself, so the import goes on as usual.
    def find_spec(self, name, path=None, target=None):
        if name in heavy and name not in chains:
            chains[name] = [f"{f.filename[len(root) + 1:]}:{f.lineno}" for f in traceback.extract_stack()
                            if f.filename.startswith(root + "/")]
        return None
sys.meta_path.insert(0, HeavyImportSpy())
for module in modules:
    importlib.import_module(module)
print(json.dumps({name: chains.get(name, []) for name in sorted(heavy) if name in sys.modules}))
"""


def heavy_imports(root: Path, modules: Iterable[str], heavy: Iterable[str]) -> dict[str, list[str]]:
    """Import ``modules`` in a fresh interpreter (PYTHONPATH and cwd ``root``); returns
    each of ``heavy`` that ended up in ``sys.modules`` with the project frames
    (``file:line``) of the import that first asked for it. Raises
    subprocess.CalledProcessError if an import fails, TimeoutExpired after
    FRESH_IMPORT_TIMEOUT_S."""
    root = root.resolve()
    env = {**os.environ, "PYTHONPATH": str(root)}
    arguments = [json.dumps(sorted(heavy)), json.dumps(list(modules)), str(root)]
    result = subprocess.run([sys.executable, "-c", _SPY, *arguments], cwd=root, env=env, check=True,
                            capture_output=True, text=True, timeout=FRESH_IMPORT_TIMEOUT_S)  # fmt: skip
    loaded: dict[str, list[str]] = json.loads(result.stdout.strip().splitlines()[-1])
    return loaded


# --- the real tree --------------------------------------------------------------------


@pytest.fixture(scope="module")
def project_graph() -> Graph:
    return import_graph(tree_modules(ROOT, ("shared", "services")))


def test_the_graph_sees_every_kind_of_import(project_graph: Graph) -> None:
    # a function-local import, one under `if TYPE_CHECKING:` and `from package import module`
    assert "shared.model.shard" in project_graph["services.cli.models"]
    assert "shared.model.pipeline" in project_graph["services.cli.infer"]
    assert "shared.model.bert" in project_graph["shared.model.checkpoint"]


def test_no_package_under_services_imports_another(project_graph: Graph) -> None:
    violations = [v for v in layering_violations(project_graph) if v.startswith("services.")]
    assert violations == [], "imports across packages under services/:\n" + "\n".join(violations)


def test_shared_does_not_import_services(project_graph: Graph) -> None:
    violations = [v for v in layering_violations(project_graph) if v.startswith("shared.")]
    assert violations == [], "shared/ imports services/:\n" + "\n".join(violations)


def test_no_import_cycle_in_shared_or_in_a_service_package(project_graph: Graph) -> None:
    cycles = import_cycles(project_graph)
    assert cycles == [], "import cycles:\n" + "\n".join(cycles)


@pytest.mark.parametrize("service", CONTROL_SERVICES)
def test_control_service_does_not_import_torch(service: str) -> None:
    modules = sorted(
        {*tree_modules(ROOT, (f"services/{service}",)), f"services.{service}.__main__"}
    )
    loaded = heavy_imports(ROOT, modules, HEAVY_MODULES)
    assert loaded == {}, (
        f"services.{service} loads {sorted(loaded)}, first asked for by:\n"
        + "\n".join(f"{name}: {' <- '.join(reversed(chain))}" for name, chain in loaded.items())
    )


# --- negative tests: each checker reports a violation made on purpose ------------------


def _write_tree(root: Path, files: Mapping[str, str]) -> Path:
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return root


def test_a_cross_service_import_is_reported(tmp_path: Path) -> None:
    root = _write_tree(tmp_path, {
        "services/__init__.py": "",
        "services/alpha/__init__.py": "",
        "services/alpha/logic.py": "def f():\n    from services.beta import logic\n",
        "services/beta/__init__.py": "",
        "services/beta/logic.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                  "    import services.alpha.logic\n",
        "services/cli/__init__.py": "from services.beta.logic import *\n",
        "shared/__init__.py": "",
        "shared/util.py": "from services.alpha import logic\n",
    })  # fmt: skip
    graph = import_graph(tree_modules(root, ("shared", "services")))
    assert layering_violations(graph) == [
        "services.alpha.logic -> services.beta.logic",
        "services.beta.logic -> services.alpha.logic",
        "services.cli -> services.beta.logic",
        "shared.util -> services.alpha.logic",
    ]


def test_a_two_module_cycle_is_reported(tmp_path: Path) -> None:
    root = _write_tree(tmp_path, {
        "shared/__init__.py": "",
        "shared/pkg/__init__.py": "",
        "shared/pkg/a.py": "from .b import thing\n",
        "shared/pkg/b.py": "def later():\n    from shared.pkg import a\n",
        "shared/leaf.py": "from shared.pkg.a import thing\n",
        "services/__init__.py": "",
        "services/alpha/__init__.py": "from . import main\n",
        "services/alpha/main.py": "import services.alpha\n",  # package <-> its own module
        "services/alpha/solo.py": "from services.alpha import solo\n",  # imports itself
    })  # fmt: skip
    graph = import_graph(tree_modules(root, ("shared", "services")))
    assert import_cycles(graph) == [
        "services.alpha -> services.alpha.main -> services.alpha",
        "services.alpha.solo -> services.alpha.solo",
        "shared.pkg.a -> shared.pkg.b -> shared.pkg.a",
    ]
    across_units = {"shared.x": {"services.y"}, "services.y": {"shared.x"}}
    assert import_cycles(across_units) == []  # layering's business, not a cycle within a unit


def test_a_heavy_import_is_reported_with_its_chain(tmp_path: Path) -> None:
    root = _write_tree(tmp_path, {
        "fakeheavy/__init__.py": "",
        "services/__init__.py": "",
        "services/light/__init__.py": "",
        "services/light/service.py": "import services.light.model\n",
        "services/light/model.py": "import fakeheavy\n",
        "services/clean/__init__.py": "import json\n",
    })  # fmt: skip
    assert heavy_imports(root, ["services.clean"], ["fakeheavy"]) == {}
    loaded = heavy_imports(root, ["services.light.service"], ["fakeheavy", "torch"])
    assert list(loaded) == ["fakeheavy"]
    assert loaded["fakeheavy"][-2:] == ["services/light/service.py:1", "services/light/model.py:1"]
