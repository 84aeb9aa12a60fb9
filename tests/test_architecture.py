"""The layering of the packages, read from the imports of every module (docs/architecture.md).

Each module belongs to a layer; it may import modules of lower layers, and modules of its
own subpackage. No import may run back up, and the module graph has no circle. Imports
inside functions and under TYPE_CHECKING count too: a lazy import is still an arrow.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Module prefix -> layer; the longest prefix that matches wins. Higher imports lower.
LAYERS = {
    "engines": 0,
    "appliance": 1,  # appliance/__init__.py: the version
    "appliance.errors": 1,
    "appliance.paths": 1,
    "appliance.demo.models": 1,  # a leaf: numpy and onnx only (the updater's simulator uses it)
    "appliance.protocol": 2,
    "appliance.config": 3,
    "appliance.observe": 3,
    "appliance.scheduling": 4,
    "appliance.models": 5,
    "appliance.serving": 6,
    "appliance.transport": 7,
    "appliance.client": 7,
    "updater": 8,
    "appliance.demo": 8,
    "appliance.deploy": 8,
    "appliance.app": 9,
    "appliance.cli": 10,
    "appliance.__main__": 11,
}

def _package(module: str) -> str:
    """The package whose modules may import each other freely (circles aside): a
    subpackage of appliance (its face included), or engines or updater as a whole; a
    top-level module of appliance is a package of its own."""
    parts = module.split(".")
    if parts[0] == "appliance":
        return ".".join(parts[:2])
    return parts[0]


def _layer(module: str) -> int:
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        prefix = ".".join(parts[:n])
        if prefix in LAYERS:
            return LAYERS[prefix]
    raise KeyError(module)


def _modules() -> dict[str, Path]:
    out = {}
    for top in ("appliance", "engines", "updater"):
        for path in sorted((ROOT / top).rglob("*.py")):
            rel = path.relative_to(ROOT).with_suffix("")
            parts = list(rel.parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


MODULES = _modules()


def _resolve(name: str) -> str | None:
    """The module of ours that an imported name lives in (a package's face counts as the
    package), or None for a third-party module."""
    if name.split(".", maxsplit=1)[0] not in ("appliance", "engines", "updater"):
        return None
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str, path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for name in names:
            target = _resolve(name)
            if target is not None and target != module:
                found.add(target)
    return found


GRAPH = {m: _imports(m, p) for m, p in MODULES.items()}


def test_every_module_has_a_layer():
    assert [m for m in MODULES if _safe_layer(m) is None] == []


def _safe_layer(module: str) -> int | None:
    try:
        return _layer(module)
    except KeyError:
        return None


def upward_arrows(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for module, targets in graph.items():
        for target in targets:
            if _package(target) == _package(module):
                continue  # inside one package (circles are checked apart)
            if _layer(target) >= _layer(module):
                bad.append(f"{module} (layer {_layer(module)}) imports {target} "
                           f"(layer {_layer(target)})")
    return sorted(bad)


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components of more than one module."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
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
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_runs_back_up():
    assert upward_arrows(GRAPH) == []


def test_the_module_graph_has_no_circle():
    assert circles(GRAPH) == []


def test_the_checks_see_what_they_look_for():
    """A model module importing the service runs back up; two modules of one package that
    import each other are a circle; the real graph with either arrow added fails."""
    bad = {**GRAPH, "appliance.models.manager": GRAPH["appliance.models.manager"]
           | {"appliance.serving.service"}}
    assert upward_arrows(bad) == ["appliance.models.manager (layer 5) imports "
                                  "appliance.serving.service (layer 6)"]
    assert circles(bad)  # service -> manager -> service
    loop = {**GRAPH, "appliance.models.versions": GRAPH["appliance.models.versions"]
            | {"appliance.models.manager"}}
    assert upward_arrows(loop) == []  # inside one package: allowed, but
    assert any({"appliance.models.manager", "appliance.models.versions"} <= set(c)
               for c in circles(loop))


def test_engines_import_nothing_of_ours():
    assert {m: sorted(t) for m, t in GRAPH.items()
            if m.startswith("engines") and any(not x.startswith("engines") for x in t)} == {}


@pytest.mark.parametrize("rule", [
    # The transports call the service and nothing below it but the wire format, config,
    # logs and the read window the socket opens around each read.
    ("appliance.transport", ("appliance.models",)),
    # The updater uses the models and the service only through their public faces, and no
    # part of the server's wiring.
    ("updater", ("appliance.transport", "appliance.app", "appliance.cli",
                 "appliance.demo.launcher", "appliance.demo.workload")),
    # The client speaks the wire protocol; it knows nothing of the server's insides.
    ("appliance.client", ("appliance.config", "appliance.serving", "appliance.models",
                          "appliance.scheduling", "appliance.transport")),
    # The server process does not wire the updater: the CLI hands it the agent.
    ("appliance.app", ("updater",)),
])
def test_forbidden_arrows(rule):
    source, forbidden = rule
    bad = sorted(f"{m} -> {t}" for m, targets in GRAPH.items()
                 if m == source or m.startswith(source + ".")
                 for t in targets if any(t == f or t.startswith(f + ".") for f in forbidden))
    assert bad == []


def test_each_subpackage_says_what_it_holds_and_may_import():
    for module, path in MODULES.items():
        if path.name != "__init__.py" or module.count(".") != 1 or \
                not module.startswith("appliance."):
            continue
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        if module == "appliance.cli":
            continue  # the composition root: it may import anything
        assert "May import" in doc, f"{path}: its docstring must say what it may import"
