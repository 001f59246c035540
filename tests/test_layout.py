"""The package's layout rules, read statically from the source (nothing is imported or run).

Three rules from STYLE.md, each checked over every `.py` file under `hf_compress/`:

* no import cycles between modules (imports inside functions count: a cycle broken only by a function-level import
  is still two modules that each need the other);
* no `from hf_compress.x import _name` from another module (a helper two modules need lives below both, public);
* no function or method longer than `MAX_FUNCTION_LINES` lines (from its `def` to its last line) unless the line
  just above its `def` (or first decorator), or a line of its signature or the line right after it, carries
  `# long: <reason>`.

How imports become edges of the module graph:

* `import a.b.c` and `from a.b import c` where `a.b.c` is a module are edges to `a.b.c`; `from a.b import name` where
  `name` is not a module is an edge to `a.b`. Relative imports are resolved against the importing module's package.
* Package `__init__` re-exports: `from pkg import name`, where `pkg/__init__.py` re-exports `name` from one of its
  own submodules (`from .sub import name`), is an edge to the module that defines `name`, followed through
  re-export chains. Importing through a package's public face therefore links the modules that really depend on
  each other, and an `__init__` that re-exports its children never closes a false `child -> pkg -> child` loop;
  a real `child -> sibling -> child` loop is caught whichever spelling it uses.
* Imports a package `__init__` makes of its own descendants inside a function (a lazy `__getattr__`) are not edges:
  they run after the package has finished importing, and every import of a descendant runs the `__init__` first
  anyway. The same imports at top level are edges. `importlib.import_module("...")` is dynamic and is not read.
* Imports under `if TYPE_CHECKING:` never run and are not edges.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest

PACKAGE = "hf_compress"
REPO_ROOT = Path(__file__).resolve().parent.parent
MAX_FUNCTION_LINES = 80
LONG_REASON = re.compile(r"#\s*long:\s*\S")


# --- the walker ----------------------------------------------------------------------------------------------------


@dataclass
class ImportRecord:
    """One imported name: `importer` imports `name` (None for `import x`) from module `source`, at `line`."""

    importer: str
    source: str
    name: str | None
    line: int
    in_function: bool


@dataclass
class Layout:
    modules: dict[str, Path]  # dotted module name -> file; a package is named by its package (its __init__)
    packages: set[str]
    imports: list[ImportRecord] = field(default_factory=list)
    reexports: dict[str, dict[str, str]] = field(default_factory=dict)  # package -> {name: module it comes from}


def _module_name(path: Path, root: Path) -> tuple[str, bool]:
    parts = list(path.relative_to(root).with_suffix("").parts)
    is_package = parts[-1] == "__init__"
    if is_package:
        parts = parts[:-1]
    return ".".join(parts), is_package


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(tree: ast.AST):
    """Yields `(node, in_function)` for every Import/ImportFrom, skipping `if TYPE_CHECKING:` bodies."""

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child.test):
                for sub in child.orelse:
                    yield from visit_one(sub, in_function)
                continue
            yield from visit_one(child, in_function)

    def visit_one(node, in_function):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node, in_function
        inner = in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        yield from visit(node, inner)

    yield from visit(tree, False)


def _resolve_from(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def scan(root: Path, package: str = PACKAGE) -> Layout:
    """Reads every module of `package` (a folder under `root`) and the imports each makes of the package itself."""
    files = sorted((root / package).rglob("*.py"))
    layout = Layout(modules={}, packages=set())
    trees = {}
    for path in files:
        name, is_package = _module_name(path, root)
        layout.modules[name] = path
        if is_package:
            layout.packages.add(name)
        trees[name] = (ast.parse(path.read_text(encoding="utf-8"), filename=str(path)), is_package)
    for name, (tree, is_package) in trees.items():
        for node, in_function in _import_nodes(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name == package or alias.name.startswith(package + "."):
                        layout.imports.append(ImportRecord(name, alias.name, None, node.lineno, in_function))
                continue
            source = _resolve_from(node, name, is_package)
            if not (source == package or source.startswith(package + ".")):
                continue
            for alias in node.names:
                layout.imports.append(ImportRecord(name, source, alias.name, node.lineno, in_function))
                submodule = f"{source}.{alias.name}"
                if is_package and source.startswith(name + ".") and submodule not in layout.modules:
                    layout.reexports.setdefault(name, {})[alias.asname or alias.name] = source
    return layout


def defining_module(layout: Layout, source: str, name: str | None) -> str:
    """The module an import really depends on: a submodule named `name`, else the module that defines `name`
    behind any chain of package re-exports, else `source` itself."""
    if name is None:
        return source
    if f"{source}.{name}" in layout.modules:
        return f"{source}.{name}"
    seen = set()
    while source in layout.reexports and name in layout.reexports[source] and source not in seen:
        seen.add(source)
        source = layout.reexports[source][name]
        if f"{source}.{name}" in layout.modules:
            return f"{source}.{name}"
    return source


def import_graph(layout: Layout) -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {m: set() for m in layout.modules}
    for rec in layout.imports:
        target = defining_module(layout, rec.source, rec.name)
        if target not in layout.modules or target == rec.importer:
            continue
        lazy_child = rec.importer in layout.packages and target.startswith(rec.importer + ".") and rec.in_function
        if not lazy_child:
            edges[rec.importer].add(target)
    return edges


def strongly_connected(edges: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative; returns the components with more than one module, each sorted."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []
    counter = 0
    for start in sorted(edges):
        if start in index:
            continue
        work = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
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
                if len(component) > 1:
                    found.append(sorted(component))
    return sorted(found)


def import_cycles(layout: Layout) -> list[str]:
    edges = import_graph(layout)
    out = []
    for component in strongly_connected(edges):
        members = set(component)
        links = [f"{a} -> {b}" for a in component for b in sorted(edges[a] & members)]
        out.append(" <-> ".join(component) + "  (" + ", ".join(links) + ")")
    return out


def private_imports(layout: Layout, root: Path) -> list[str]:
    out = []
    for rec in layout.imports:
        name = rec.name
        if name is None or not name.startswith("_") or (name.startswith("__") and name.endswith("__")):
            continue
        if f"{rec.source}.{name}" in layout.modules:  # a submodule, imported as a module
            continue
        if defining_module(layout, rec.source, name) == rec.importer:
            continue
        path = layout.modules[rec.importer].relative_to(root).as_posix()
        out.append(f"{path}:{rec.line}: from {rec.source} import {name}")
    return out


def long_functions(layout: Layout, root: Path, limit: int = MAX_FUNCTION_LINES) -> list[str]:
    out = []
    for module, path in sorted(layout.modules.items()):
        lines = path.read_text(encoding="utf-8").splitlines()
        tree = ast.parse("\n".join(lines), filename=str(path))
        for node, qualname in _functions(tree):
            length = node.end_lineno - node.lineno + 1
            if length <= limit:
                continue
            first = min([node.lineno] + [d.lineno for d in node.decorator_list])
            # the line above the def/decorators, the signature lines, and the first line of the body
            candidates = [first - 1] + list(range(node.lineno, node.body[0].lineno + 1))
            if any(LONG_REASON.search(lines[i - 1]) for i in candidates if 1 <= i <= len(lines)):
                continue
            out.append(f"{path.relative_to(root).as_posix()}:{node.lineno}: {qualname} is {length} lines")
    return out


def _functions(tree: ast.AST, prefix: str = ""):
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node, prefix + node.name
            yield from _functions(node, prefix + node.name + ".")
        elif isinstance(node, ast.ClassDef):
            yield from _functions(node, prefix + node.name + ".")
        else:
            yield from _functions(node, prefix)


# --- the real package ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_layout():
    return scan(REPO_ROOT)


def test_walker_reads_the_real_package(real_layout):
    # guards the rules below against passing because the walker found nothing
    assert "hf_compress.model_cards.card" in real_layout.modules
    assert "hf_compress.pruning" in real_layout.packages
    assert len(real_layout.imports) > 100


def test_hf_compress_has_no_import_cycles(real_layout):
    cycles = import_cycles(real_layout)
    assert not cycles, "import cycles between modules:\n" + "\n".join(cycles)


def test_hf_compress_imports_no_private_names_across_modules(real_layout):
    found = private_imports(real_layout, REPO_ROOT)
    assert not found, "`_private` names imported from another module:\n" + "\n".join(found)


def test_hf_compress_functions_are_short_or_say_why_not(real_layout):
    found = long_functions(real_layout, REPO_ROOT)
    assert not found, (
        f"functions longer than {MAX_FUNCTION_LINES} lines without a `# long: <reason>` comment:\n" + "\n".join(found)
    )


# --- each checker catches a planted violation in a fake package --------------------------------------------------


def _fake_package(tmp_path: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = tmp_path / "fakepkg" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for folder in [tmp_path / "fakepkg", *(p for p in (tmp_path / "fakepkg").rglob("*") if p.is_dir())]:
        (folder / "__init__.py").touch()
    return tmp_path


def _cycles(tmp_path, files):
    return import_cycles(scan(_fake_package(tmp_path, files), "fakepkg"))


def test_cycle_through_function_level_and_relative_imports_is_reported(tmp_path):
    cycles = _cycles(tmp_path, {
        "a.py": "from .b import g\n",
        "b.py": "def g():\n    from fakepkg.c import h\n    return h\n",
        "c.py": "def h():\n    from . import a\n    return a\n",
        "d.py": "from fakepkg import a\n",  # imports into the cycle without being in it
    })
    assert cycles == [
        "fakepkg.a <-> fakepkg.b <-> fakepkg.c  (fakepkg.a -> fakepkg.b, fakepkg.b -> fakepkg.c, fakepkg.c -> fakepkg.a)"
    ]


def test_lazy_package_reexports_make_no_false_cycle(tmp_path):
    cycles = _cycles(tmp_path, {
        "sub/__init__.py": (
            "from .x import public_x\n"
            "def __getattr__(name):\n    from .y import public_y\n    return public_y\n"
            "VERSION = 1\n"
        ),
        "sub/x.py": "def public_x():\n    pass\n",
        # imports through the package face: resolves to sub.x, and to sub itself for what sub defines
        "sub/y.py": "from fakepkg.sub import public_x, VERSION\ndef public_y():\n    pass\n",
    })
    assert cycles == []


def test_child_sibling_loop_through_package_reexport_is_reported(tmp_path):
    cycles = _cycles(tmp_path, {
        "sub/__init__.py": "from .x import public_x\nfrom .y import public_y\n",
        "sub/x.py": "from fakepkg.sub import public_y\ndef public_x():\n    pass\n",
        "sub/y.py": "def public_y():\n    from fakepkg.sub import public_x\n    return public_x\n",
    })
    assert cycles == ["fakepkg.sub.x <-> fakepkg.sub.y  (fakepkg.sub.x -> fakepkg.sub.y, fakepkg.sub.y -> fakepkg.sub.x)"]


def test_type_checking_imports_are_not_edges(tmp_path):
    cycles = _cycles(tmp_path, {
        "a.py": "from .b import g\n",
        "b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import A\ndef g():\n    pass\n",
    })
    assert cycles == []


def test_private_import_from_another_module_is_reported(tmp_path):
    root = _fake_package(tmp_path, {
        "a.py": "def _helper():\n    pass\n__all__ = []\n_OWN = 1\n",
        "sub/__init__.py": "from .impl import _hidden\n",
        "sub/impl.py": "def _hidden():\n    pass\n",
        "b.py": (
            "from fakepkg.a import _helper, __all__\n"  # one private name, one dunder (allowed)
            "from .sub import _hidden\n"  # through a re-export: still private
            "from . import _private_module\n"  # a submodule, not a name
        ),
        "_private_module.py": "",
    })
    found = private_imports(scan(root, "fakepkg"), root)
    assert found == [
        "fakepkg/b.py:1: from fakepkg.a import _helper",
        "fakepkg/b.py:2: from fakepkg.sub import _hidden",
        "fakepkg/sub/__init__.py:1: from fakepkg.sub.impl import _hidden",
    ]


def _function(name: str, body_lines: int, above: str = "", first: str = "") -> str:
    body = ([f"    {first}"] if first else []) + [f"    x{i} = {i}" for i in range(body_lines)]
    return (f"{above}\n" if above else "") + f"def {name}():\n" + "\n".join(body) + "\n"


def test_long_function_is_reported_unless_it_says_why(tmp_path):
    root = _fake_package(tmp_path, {
        "m.py": (
            _function("short_enough", MAX_FUNCTION_LINES - 1)  # def + 79 lines = 80: allowed
            + _function("too_long", MAX_FUNCTION_LINES)  # 81
            + _function("excused_above", 100, above="# long: one table, read top to bottom")
            + _function("excused_inside", 100, first="# long: the steps share twelve locals")
            + _function("empty_reason", 100, above="# long:")
            + "class K:\n" + "\n".join("    " + ln for ln in _function("method", 90).splitlines()) + "\n"
        ),
    })
    found = long_functions(scan(root, "fakepkg"), root)
    assert found == [
        "fakepkg/m.py:81: too_long is 81 lines",
        "fakepkg/m.py:367: empty_reason is 101 lines",
        "fakepkg/m.py:469: K.method is 91 lines",
    ]
