"""The package's layering (``[importlinter]`` in setup.cfg) holds, and the contracts catch a cycle when one appears.

The contracts are checked by import-linter itself: on the real import graph of the package under test, then on that
graph with one import added (grimp's ``add_import``), which is what a new ``import`` statement would do.
"""

from __future__ import annotations

import ast
import copy
from pathlib import Path

import grimp
import pytest
from importlinter import configuration
from importlinter.application.use_cases import lint_imports, read_user_options
from importlinter.contracts.acyclic_siblings import AcyclicSiblingsContract
from importlinter.contracts.layers import LayersContract

import medtl3d

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = Path(medtl3d.__file__).resolve().parent
configuration.configure()  # what the lint-imports command does first: the config readers and graph builder
CONTRACT_TYPES = {"layers": LayersContract, "acyclic_siblings": AcyclicSiblingsContract}


@pytest.fixture(scope="module")
def options():
    return read_user_options(str(ROOT / "setup.cfg"))


@pytest.fixture(scope="module")
def graph():
    return grimp.build_graph("medtl3d", cache_dir=None)


def _broken(options, graph) -> list[str]:
    """Names of the setup.cfg contracts that ``graph`` breaks."""
    broken = []
    for contract_options in options.contracts_options:
        kind = CONTRACT_TYPES[contract_options["type"]]
        contract = kind(name=contract_options["name"], session_options=options.session_options,
                        contract_options=contract_options)
        if not contract.check(copy.deepcopy(graph), verbose=False).kept:
            broken.append(contract_options["type"])
    return broken


def test_the_package_keeps_its_import_contracts(options, capsys):
    assert PACKAGE == ROOT / "medtl3d"  # the checkout under test, not another install
    assert {c["type"] for c in options.contracts_options} == {"layers", "acyclic_siblings"}
    passed = lint_imports(str(ROOT / "setup.cfg"), cache_dir=None, no_logo=True, is_debug_mode=True)
    report = capsys.readouterr().out
    assert passed is True, report
    assert "Contracts: 2 kept, 0 broken." in report


def test_the_real_graph_has_no_cycle(options, graph):
    assert _broken(options, graph) == []


def _siblings(first: str, second: str) -> tuple[str, str]:
    """The ancestors of two modules that are siblings (``medtl3d.weights._loading``, ``medtl3d.backbones.x`` ->
    ``medtl3d.weights``, ``medtl3d.backbones``)."""
    a, b = first.split("."), second.split(".")
    common = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
    return ".".join(a[:common + 1]), ".".join(b[:common + 1])


@pytest.mark.parametrize("importer, imported, broken", [
    # the cycles the package had before its layering: each one, put back, breaks both contracts
    ("medtl3d.weights._loading", "medtl3d.backbones._registry", ["layers", "acyclic_siblings"]),
    ("medtl3d.search._bundle", "medtl3d.cli", ["layers", "acyclic_siblings"]),  # was via workflows, now a leaf
    ("medtl3d.engine._builders", "medtl3d.workflows", ["layers", "acyclic_siblings"]),
    # inside one layer: only the sibling contract sees it (analysis.bundle imports analysis.reports)
    ("medtl3d.analysis.reports", "medtl3d.analysis.bundle", ["acyclic_siblings"]),
    # a downward import that is not a cycle breaks nothing
    ("medtl3d.workflows", "medtl3d.stats", []),
])
def test_an_added_import_that_closes_a_cycle_breaks_the_contracts(options, graph, importer, imported, broken):
    a, b = _siblings(importer, imported)
    closes_a_cycle = graph.chain_exists(importer=b, imported=a, as_packages=True)
    assert closes_a_cycle == bool(broken)
    changed = copy.deepcopy(graph)
    changed.add_import(importer=importer, imported=imported)
    assert _broken(options, changed) == broken


def test_every_module_has_a_layer(options):
    """``exhaustive``: a new top-level module or subpackage must be placed in the layers before the contract
    passes (import-linter refuses one it does not know)."""
    layers = next(c for c in options.contracts_options if c["type"] == "layers")
    placed = {name.strip() for line in layers["layers"] for name in line.split("|")}
    present = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir()
               if (p.suffix == ".py" and p.stem != "__init__") or (p / "__init__.py").is_file()}
    assert present == placed


def _function_level_imports(path: Path) -> list[tuple[int, str]]:
    found = []

    def walk(node, inside: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if inside and isinstance(child, ast.ImportFrom):
                found.append((child.lineno, "." * child.level + (child.module or "")))
            elif inside and isinstance(child, ast.Import):
                found.extend((child.lineno, alias.name) for alias in child.names)
            walk(child, inside or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)))

    walk(ast.parse(path.read_text()), False)
    return found


# The only function-level imports of our own modules, each for a measured reason: importing medtl3d.efficiency
# imports fvcore, which scripts functions with torch.jit and prints a FutureWarning on stderr; the console script and
# the bundle steps other than efficiency must keep their output (one-line errors) free of it.
DEFERRED = {("medtl3d/cli.py", ".efficiency")}  # the bundles import it only through efficiency.yaml


def test_no_function_level_import_of_the_package_itself():
    """Function-level imports are for optional or heavy third-party dependencies; our own modules are imported at
    the top (the layering makes that possible), so the import graph shows every dependency."""
    own = {(str(path.relative_to(PACKAGE.parent)), name) for path in sorted(PACKAGE.rglob("*.py"))
           for _, name in _function_level_imports(path) if name.startswith((".", "medtl3d"))}
    assert own == DEFERRED
