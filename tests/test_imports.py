"""The package reads bottom-up: no module imports a layer above its own, and no package loops."""
from __future__ import annotations

import ast

from tests.conftest import ROOT

PKG = ROOT / "src" / "lmnet"

#: layers -> models -> data, metrics -> deploy -> engine -> cli (infrastructure at the bottom).
RANK = {"_version": 0, "_defaults": 0, "_dataclass": 0, "_optional": 0, "_files": 0, "runtime": 0,
        "run_folder": 0,
        "layers": 0,
        "models": 1, "losses": 1, "data": 2, "metrics": 2, "config": 2, "deploy": 3,
        "engine": 4, "cli": 5, "__main__": 5, "__init__": 5}


def _unit(module: str) -> str:
    """``lmnet.deploy.backends`` -> ``deploy``; ``lmnet`` itself -> ``__init__``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports() -> dict[str, set[str]]:
    """Unit of each module -> units it imports (at module level or inside functions)."""
    found: dict[str, set[str]] = {}
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG.parent).with_suffix("")
        module = ".".join(rel.parts).removesuffix(".__init__")
        unit = _unit(module) if module != "lmnet" else "__init__"
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names
                                          if node.module == "lmnet"]
            for name in names:
                if name == "lmnet" or not name.startswith("lmnet."):
                    continue
                target = _unit(name)
                if target != unit:
                    found.setdefault(unit, set()).add(target)
    return found


def test_every_unit_has_a_rank():
    units = {p.stem if p.is_file() else p.name for p in PKG.iterdir()
             if (p.suffix == ".py" or (p.is_dir() and (p / "__init__.py").exists()))}
    assert units <= set(RANK), units - set(RANK)


def test_no_import_upward():
    upward = [(u, t) for u, targets in _imports().items() for t in targets if RANK[t] > RANK[u]]
    assert upward == [], upward


def test_no_import_loops_between_units():
    graph = _imports()

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        for nxt in graph.get(start, ()):
            if nxt == goal or (nxt not in seen and reaches(nxt, goal, seen | {nxt})):
                return True
        return False

    loops = sorted(u for u in graph if reaches(u, u, {u}))
    assert loops == [], loops


def _module_imports() -> dict[str, set[str]]:
    """Every module of the package -> the package modules it imports, at module level or inside
    functions. ``from X import a`` depends on ``X.a`` where that is a module, else on ``X``; the
    parent packages Python initialises on the way are not counted."""
    paths = {}
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG.parent).with_suffix("")
        paths[".".join(rel.parts).removesuffix(".__init__")] = path

    def owner(name: str) -> str:
        while name not in paths:
            name = name.rpartition(".")[0]
        return name

    graph: dict[str, set[str]] = {}
    for module, path in paths.items():
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: resolve against this module's package
                    pkg = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
                    base = ".".join(pkg[:len(pkg) - node.level + 1] + ([base] if base else []))
                names = [f"{base}.{a.name}" if f"{base}.{a.name}" in paths else base for a in node.names]
            else:
                continue
            deps |= {owner(n) for n in names if n == "lmnet" or n.startswith("lmnet.")}
        graph[module] = deps - {module}
    return graph


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_circles_between_modules():
    """No module imports one that imports it back, directly or through others, counting the
    imports inside functions: deploy reads bottom-up, the registry does not load models lazily."""
    graph = _module_imports()
    assert "lmnet.deploy.export" in graph and "lmnet.models._registry" in graph
    assert _circles(graph) == []


def test_the_circle_finder_finds_circles():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e"}}
    assert _circles(graph) == [["a", "b", "c"]]
    assert _circles({"a": {"b"}, "b": set()}) == []


def test_deploy_reads_bottom_up():
    """Inside deploy, each module imports only the ones listed before it."""
    order = ["checkpoint", "metadata", "preprocess", "postprocess", "openvino_ops", "convert",
             "backends", "quantize", "pretrained", "loading", "export"]
    graph = _module_imports()
    deploy = {m.removeprefix("lmnet.deploy."): {d.removeprefix("lmnet.deploy.") for d in deps
                                                 if d.startswith("lmnet.deploy.")}
              for m, deps in graph.items() if m.startswith("lmnet.deploy.")}
    assert set(deploy) == set(order), set(deploy) ^ set(order)
    later = [(m, d) for m, deps in deploy.items() for d in deps if order.index(d) > order.index(m)]
    assert later == []
