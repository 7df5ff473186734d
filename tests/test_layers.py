"""The package reads bottom-up: no module imports a layer above its own, and no package loops."""
from __future__ import annotations

import ast

from tests.conftest import ROOT

PKG = ROOT / "src" / "lmnet"

#: layers -> models -> data, metrics -> deploy -> engine -> cli (infrastructure at the bottom).
RANK = {"_version": 0, "_defaults": 0, "_dataclass": 0, "_optional": 0, "_files": 0, "runtime": 0,
        "layers": 0,
        "models": 1, "losses": 1, "data": 2, "metrics": 2, "config": 2, "deploy": 3,
        "engine": 4, "cli": 5, "__main__": 5, "__init__": 5}


def _unit(module: str) -> str:
    """``lmnet.deploy.engines`` -> ``deploy``; ``lmnet`` itself -> ``__init__``."""
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
