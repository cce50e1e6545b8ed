"""The architecture holds: imports flow downward only, no circles, a small core.

The layers are declared once, as import-linter contracts in pyproject.toml; this test runs them
(import-linter reads every import statement, including those inside functions) and adds what
import-linter has no contract for: no import cycle between any two of our modules.
"""
from __future__ import annotations

import pathlib

import grimp
from importlinter import api as _configure  # noqa: F401  (import-linter's public entry sets up its adapters)
from importlinter.application import use_cases

ROOT = pathlib.Path(__file__).resolve().parents[2]
PACKAGES = ("converter", "quant_kernels", "manifests")


def _lint(root: pathlib.Path) -> bool:
    """import-linter's own entry point over the contracts in ``root/pyproject.toml`` (True: all kept)."""
    return use_cases.lint_imports(config_filename=str(root / "pyproject.toml"), cache_dir=None,
                                  no_logo=True, is_debug_mode=True) == use_cases.SUCCESS


def test_import_linter_contracts_are_kept(monkeypatch):
    monkeypatch.chdir(ROOT)
    assert _lint(ROOT), "an import-linter contract is broken: the output above (or `lint-imports`) names the chain"


def test_no_import_cycles():
    graph = grimp.build_graph(*PACKAGES)
    cycles = set()
    for module in graph.modules:
        for imported in graph.find_modules_directly_imported_by(module):
            if imported.startswith(module + "."):
                continue  # a package's __init__ importing its own submodule is not a cycle
            chain = graph.find_shortest_chain(importer=imported, imported=module)
            if chain and not any(m.startswith(module + ".") or module.startswith(m + ".") for m in chain[1:-1]):
                cycles.add(" -> ".join((module,) + tuple(chain)))
    assert sorted(cycles) == []


def test_layer_check_sees_an_upward_import(tmp_path, monkeypatch):
    """The contract is not vacuous: a core module importing a subpackage breaks it."""
    import shutil
    copy = tmp_path / "repo"
    shutil.copytree(ROOT / "converter", copy / "converter", ignore=shutil.ignore_patterns("__pycache__"))
    for pkg in ("quant_kernels", "manifests"):
        shutil.copytree(ROOT / pkg, copy / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", copy / "pyproject.toml")
    with open(copy / "converter" / "layout.py", "a") as f:
        f.write("\nimport converter.cli  # noqa\n")
    monkeypatch.chdir(copy)
    monkeypatch.syspath_prepend(str(copy))
    for name in list(__import__("sys").modules):
        if name.split(".")[0] in PACKAGES:
            monkeypatch.delitem(__import__("sys").modules, name)
    assert not _lint(copy)


def test_core_stays_small():
    top = sorted(p.name for p in (ROOT / "converter").glob("*.py") if p.name != "__init__.py")
    # 13: the pipeline's modules, plus direct_io (page-cache bypass shared by its two ends, the
    # source reader and the GGUF writer). A fourteenth wants a subpackage or a merge instead.
    assert len(top) <= 13, top
    subpackages = sorted(p.parent.name for p in (ROOT / "converter").glob("*/__init__.py"))
    assert subpackages == ["cli", "hub", "lora", "quality", "release"]
    for pkg in subpackages:
        doc = (ROOT / "converter" / pkg / "__init__.py").read_text()
        assert doc.startswith('"""') and ("May import" in doc or "may import" in doc), pkg
