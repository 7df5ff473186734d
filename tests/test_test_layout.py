"""The tests mirror the package: ``tests/<package>/test_<module>[_<aspect>].py`` tests
``src/lmnet/<package>/<module>.py``, so that the tests of a module are found where it lies."""
from __future__ import annotations

from pathlib import Path

from tests.conftest import ROOT

#: Suites that cross every layer (each command's errors, load checks, the unpickling safety of
#: every reader, the real data sets, the import structure) and scripts outside the package.
CROSS_CUTTING = {"test_clear_errors", "test_load_checks", "test_safety", "test_real_datasets",
                 "test_imports", "test_scripts", "test_test_layout"}


def astray(tests: Path, package: Path, cross_cutting: set[str] = frozenset()) -> list[str]:
    """Test files under ``tests`` that name no module (or sub-package) of the package folder
    they mirror; a file named after the package itself tests its public surface."""
    out = []
    for test in sorted(tests.rglob("test_*.py")):
        folder = test.parent.relative_to(tests)
        if folder.parts == () and test.stem in cross_cutting:
            continue
        source = package.joinpath(*folder.parts)
        if not source.is_dir():
            out.append(str(test.relative_to(tests)))
            continue
        names = {p.stem.lstrip("_") for p in source.glob("*.py") if p.stem != "__init__"}
        names |= {p.name for p in source.iterdir() if (p / "__init__.py").is_file()}
        names |= {source.name} if folder.parts else set()
        subject = test.stem.removeprefix("test_")
        if not any(subject == n or subject.startswith(n + "_") for n in names):
            out.append(str(test.relative_to(tests)))
    return out


def test_every_test_file_names_the_module_it_tests():
    found = astray(ROOT / "tests", ROOT / "src" / "lmnet", CROSS_CUTTING)
    assert not found, f"test files that name no module of the package folder they mirror: {found}"


def test_the_check_finds_a_test_file_astray(tmp_path):
    package, tests = tmp_path / "pkg", tmp_path / "tests"
    for path in ("deploy/loading.py", "deploy/_hub.py", "engine/predict.py", "losses.py"):
        (package / path).parent.mkdir(parents=True, exist_ok=True)
        (package / path).touch()
    for path in ("deploy/test_loading.py", "deploy/test_hub_cache.py", "deploy/test_predict.py",
                 "engine/test_predict_safety.py", "test_losses.py", "test_everything.py",
                 "nowhere/test_x.py", "deploy/test_load.py"):
        (tests / path).parent.mkdir(parents=True, exist_ok=True)
        (tests / path).touch()
    assert astray(tests, package, {"test_everything"}) == [
        "deploy/test_load.py", "deploy/test_predict.py", "nowhere/test_x.py"]
