"""Import hygiene of the package: no import cycle among fxadapt's modules, no source file over 400 lines.

The cycle check reads the sources with `ast` (nothing is imported): an edge A -> B is an import of B that
runs when A is imported, i.e. one at module level (inside `if`/`try` too, but not under `if TYPE_CHECKING:`).
Function-local imports run later and are not edges; a second check counts them too, since a cycle they close
is only postponed (issue #10 keeps them for heavy imports). The three source folders are one package through
pyproject's `package-dir` (`passes/` is `fxadapt.passes`, `tools/` is `fxadapt.tools`)."""

from __future__ import annotations

import ast
import functools
import tomllib
from dataclasses import dataclass
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 400


def package_dirs(root: Path = ROOT) -> dict[str, Path]:
    """Top-level package name -> source folder, as pyproject's [tool.setuptools] package-dir installs them."""
    setuptools = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    return {name: root / folder for name, folder in setuptools["package-dir"].items()}


def module_files(dirs: dict[str, Path]) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file under the package folders (`__init__` is the package)."""
    modules = {}
    for package, folder in dirs.items():
        for file in folder.rglob("*.py"):
            parts = [package, *file.relative_to(folder).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            modules.setdefault(".".join(parts), file)
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _module_level(body: list[ast.stmt]):
    """The import statements that run on import: module-level ones, also inside if/else, try and with."""
    for stmt in body:
        if isinstance(stmt, ast.Import | ast.ImportFrom):
            yield stmt
        elif isinstance(stmt, ast.If):
            if not _is_type_checking(stmt.test):
                yield from _module_level(stmt.body)
            yield from _module_level(stmt.orelse)
        elif isinstance(stmt, ast.Try):
            for block in (stmt.body, *(h.body for h in stmt.handlers), stmt.orelse, stmt.finalbody):
                yield from _module_level(block)
        elif isinstance(stmt, ast.With):
            yield from _module_level(stmt.body)


def _packages_loaded(target: str, module: str, known: set[str]) -> set[str]:
    """The packages whose `__init__` importing `target` runs first: every enclosing package of `target` (`from pkg
    import mod` and `import pkg.mod` both initialise pkg), except those enclosing the importer, which are already
    initialised (or being initialised) when it runs."""
    parts = target.split(".")
    enclosing = {".".join(parts[:i]) for i in range(1, len(parts))}
    importer = module.split(".")
    mine = {".".join(importer[:i]) for i in range(1, len(importer) + 1)}
    return (enclosing - mine) & known


def _imported(stmt: ast.Import | ast.ImportFrom, module: str, is_package: bool, known: set[str]) -> set[str]:
    """The known modules one import statement loads: `from p import m` names module p.m when that exists, else p,
    and both load the packages enclosing it (`_packages_loaded`)."""
    if isinstance(stmt, ast.Import):
        targets = {alias.name for alias in stmt.names}
    else:
        base = stmt.module or ""
        if stmt.level:
            anchor = module.split(".") if is_package else module.split(".")[:-1]
            anchor = anchor[: len(anchor) - (stmt.level - 1)]
            base = ".".join(anchor + ([base] if base else []))
        targets = set()
        for alias in stmt.names:
            candidate = f"{base}.{alias.name}"
            targets.add(candidate if candidate in known else base)
    for target in list(targets):
        targets |= _packages_loaded(target, module, known)
    return targets & known


@dataclass(frozen=True)
class Import:
    """One import of a package module: who imports what, where, and when it runs."""

    module: str
    target: str
    where: str  # file:line
    when: str  # "load" (runs on import), "call" (inside a function), "lazy" (a package's PEP 562 __getattr__)


def _deferred(tree: ast.Module) -> dict[int, str]:
    """id(import statement) -> "lazy" or "call" for every import inside a function."""
    when = {}
    for func in ast.walk(tree):
        if isinstance(func, ast.FunctionDef | ast.AsyncFunctionDef):
            kind = "lazy" if func in tree.body and func.name == "__getattr__" else "call"
            for stmt in ast.walk(func):
                if isinstance(stmt, ast.Import | ast.ImportFrom):
                    when.setdefault(id(stmt), kind)  # the outermost function decides
    return when


def package_imports(modules: dict[str, Path], root: Path = ROOT) -> list[Import]:
    """Every import of one known module by another, in file and line order."""
    known, found = set(modules), []
    for name, file in modules.items():
        tree = ast.parse(file.read_text(), str(file))
        is_package, load, deferred = file.name == "__init__.py", set(map(id, _module_level(tree.body))), _deferred(tree)
        for stmt in ast.walk(tree):
            if isinstance(stmt, ast.Import | ast.ImportFrom) and (id(stmt) in load or id(stmt) in deferred):
                when = "load" if id(stmt) in load else deferred[id(stmt)]
                found += [Import(name, target, f"{file.relative_to(root)}:{stmt.lineno}", when)
                          for target in sorted(_imported(stmt, name, is_package, known) - {name})]
    return sorted(found, key=lambda i: (i.where.split(":")[0], int(i.where.split(":")[1]), i.target))


def import_graph(imports: list[Import], when: tuple[str, ...] = ("load",)) -> nx.DiGraph:
    graph = nx.DiGraph()
    graph.add_nodes_from(i.module for i in imports)
    graph.add_edges_from((i.module, i.target) for i in imports if i.when in when)
    return graph


def import_cycles(graph: nx.DiGraph) -> list[list[str]]:
    """One cycle (A, B, ..., A) for each group of modules that import each other, directly or through others."""
    cycles = []
    for group in nx.strongly_connected_components(graph):
        if len(group) > 1:
            path = [source for source, _ in nx.find_cycle(graph.subgraph(group))]
            start = path.index(min(path))  # start at the first name, so that a report reads the same every run
            path = path[start:] + path[:start]
            cycles.append([*path, path[0]])
    return sorted(cycles)


def _cycles_message(cycles: list[list[str]]) -> str:
    return "\n".join(" -> ".join(cycle) for cycle in cycles)


@functools.cache
def _repository_imports() -> tuple[Import, ...]:
    return tuple(package_imports(module_files(package_dirs())))


def test_no_import_cycle():
    cycles = import_cycles(import_graph(list(_repository_imports())))
    assert not cycles, "module-level import cycles:\n" + _cycles_message(cycles)


def test_no_cycle_hidden_in_function_local_imports():
    """A function-local import that closes a cycle only postpones it (issue #10: keep them for heavy imports).
    A package's lazy `__getattr__` (PEP 562) is not counted: it runs after the package is initialized."""
    cycles = import_cycles(import_graph(list(_repository_imports()), ("load", "call")))
    assert not cycles, "import cycles through function-local imports:\n" + _cycles_message(cycles)


def test_no_source_file_over_400_lines():
    long = {str(file.relative_to(ROOT)): n for file in module_files(package_dirs()).values()
            if (n := len(file.read_text().splitlines())) > MAX_LINES}
    assert not long, f"files over {MAX_LINES} lines (split them by responsibility): {long}"


def _write_tree(root: Path, files: dict[str, str]) -> dict[str, Path]:
    (root / "pyproject.toml").write_text('[tool.setuptools]\npackage-dir = {"pkg" = "src", "pkg.extra" = "extra"}\n')
    for path, text in files.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(text)
    return module_files(package_dirs(root))


def test_checker_finds_cycles_and_ignores_deferred_imports(tmp_path):
    """The checker itself: a cycle through a relative import and a second folder is found; an import under
    TYPE_CHECKING is no edge, a function-local one closes only a hidden cycle, a lazy package __getattr__ none."""
    modules = _write_tree(tmp_path, {
        "src/__init__.py": "def __getattr__(name):\n    from . import a\n    return getattr(a, name)\n",
        "src/a.py": "from .sub import b\n",
        "src/sub/__init__.py": "",
        "src/sub/b.py": "try:\n    import pkg.extra.c\nexcept ImportError:\n    pass\n",
        "extra/__init__.py": "",
        "extra/c.py": "from pkg import __version__, a\n",
        "src/d.py": "from . import e, f\n",
        "src/e.py": "def g():\n    from pkg.d import y\n",
        "src/f.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.d import x\n",
    })
    imports = package_imports(modules, tmp_path)
    assert [i for i in imports if i.when != "load"] == [Import("pkg", "pkg.a", "src/__init__.py:2", "lazy"),
                                                        Import("pkg.e", "pkg.d", "src/e.py:2", "call")]
    load_cycle = ["pkg.a", "pkg.sub.b", "pkg.extra.c", "pkg.a"]
    assert import_cycles(import_graph(imports)) == [load_cycle]
    assert import_cycles(import_graph(imports, ("load", "call"))) == [load_cycle, ["pkg.d", "pkg.e", "pkg.d"]]
    assert import_graph(imports, ("load", "call", "lazy")).has_edge("pkg", "pkg.a")


def test_importing_a_module_of_a_package_runs_the_packages_init(tmp_path):
    """`from pkg.sub import leaf` (and `from ..sub import leaf`) initialises pkg.sub first: a cycle through that
    `__init__` is a cycle, although `leaf` itself imports nothing (the checkpoints <-> methods cycle of issue #10
    hid this way). Packages enclosing the importer are already initialised and are no edge."""
    modules = _write_tree(tmp_path, {
        "src/__init__.py": "",
        "src/user.py": "from pkg.sub import leaf\n",
        "src/other.py": "from .sub import leaf\n",
        "src/sub/__init__.py": "from .. import user\n",
        "src/sub/leaf.py": "",
        "src/sub/inner.py": "from . import leaf\n",
    })
    imports = package_imports(modules, tmp_path)
    graph = import_graph(imports)
    assert graph.has_edge("pkg.user", "pkg.sub") and graph.has_edge("pkg.other", "pkg.sub")
    assert not graph.has_edge("pkg.sub.inner", "pkg.sub") and not graph.has_edge("pkg.user", "pkg")
    assert import_cycles(graph) == [["pkg.sub", "pkg.user", "pkg.sub"]]
