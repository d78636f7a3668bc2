"""The package's architecture, read from its sources (ast): the layer rule (optim -> curvature ->
ops -> reference; every layer may import _support, which imports torch and the standard library
only; nothing imports the package __init__), no import cycles, and the size of the optimizer
classes (thin: at most 200 lines, a docstring of at most 40, a step of at most 60)."""
import ast
import inspect
import sys
from pathlib import Path

import pytest
import torch

import soo_ext

ROOT = Path(soo_ext.__file__).parent
# A module may import its own layer and the layers after it in this order, and _support.
ORDER = ["optim", "curvature", "ops", "reference"]
COMPILED = "soo_ext._C"  # the compiled module: only ops loads it


def read_package(root: Path = ROOT) -> dict[str, str]:
    """``{module name: source}`` of every module of the package."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path.read_text()
    return out


def is_package(name: str, sources: dict[str, str]) -> bool:
    return any(other.startswith(name + ".") for other in sources)


def imports(name: str, source: str, sources: dict[str, str]) -> list[str]:
    """The modules ``name`` imports (absolute names; ``from pkg import x`` counts as ``pkg.x``
    when that is a module, else as ``pkg``, i.e. the package's __init__)."""
    package = name if is_package(name, sources) else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            for alias in node.names:
                full = f"{module}.{alias.name}"
                out.append(full if full in sources or full == COMPILED else module)
    return out


def layer(name: str) -> str | None:
    """The layer of a soo_ext module ('_support', 'optim', ..., 'package' for the __init__)."""
    parts = name.split(".")
    if parts[0] != "soo_ext":
        return None
    return "package" if len(parts) == 1 else parts[1]


def violations(sources: dict[str, str]) -> list[str]:
    out = []
    stdlib = sys.stdlib_module_names
    for name, source in sources.items():
        mine = layer(name)
        for target in imports(name, source, sources):
            theirs = layer(target)
            if theirs is None:
                top = target.split(".")[0]
                if mine == "_support" and top not in stdlib and top != "torch":
                    out.append(f"{name} imports {target}: _support imports torch only")
                continue
            if mine == "package" or target.startswith(name + "."):
                continue  # the package __init__ names the public API; a package its modules
            if target == COMPILED:
                if mine != "ops":
                    out.append(f"{name} imports {target}: only ops loads the compiled module")
                continue
            if theirs == "package":
                out.append(f"{name} imports the package __init__ ({target})")
            elif theirs == "_support" or theirs == mine:
                continue
            elif mine == "_support":
                out.append(f"{name} imports {target}: _support imports torch only")
            elif mine not in ORDER or theirs not in ORDER or ORDER.index(theirs) < ORDER.index(mine):
                out.append(f"{name} ({mine}) imports {target} ({theirs}): against the layer order")
    return out


def cycles(sources: dict[str, str]) -> list[list[str]]:
    graph = {name: sorted({t for t in imports(name, src, sources) if t in sources and t != name
                           and not t.startswith(name + ".")})
             for name, src in sources.items()}
    found, state = [], {}

    def visit(node, path):
        state[node] = 1
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                found.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node, [node])
    return found


def test_every_layer_imports_only_what_it_may():
    assert violations(read_package()) == []


def test_no_import_cycles():
    assert cycles(read_package()) == []


def test_the_checks_see_violations_and_cycles():
    sources = read_package()
    bad = dict(sources)
    bad["soo_ext.curvature.bad"] = "from ..optim.kfac import KFAC\nfrom .. import build_info\n"
    bad["soo_ext._support.bad"] = "import numpy\nfrom ..ops import kron_eigh\n"
    found = violations(bad)
    assert any("soo_ext.curvature.bad (curvature) imports soo_ext.optim.kfac" in v for v in found)
    assert any("soo_ext.curvature.bad imports the package __init__" in v for v in found)
    assert any("soo_ext._support.bad imports numpy" in v for v in found)
    assert any("soo_ext._support.bad imports soo_ext.ops" in v for v in found)
    bad = dict(sources)
    bad["soo_ext._support.a"] = "from . import b\n"
    bad["soo_ext._support.b"] = "from .a import x\n"
    assert ["soo_ext._support.a", "soo_ext._support.b", "soo_ext._support.a"] in cycles(bad)


OPTIMIZERS = [getattr(soo_ext, name) for name in soo_ext.__all__
              if isinstance(getattr(soo_ext, name), type)
              and issubclass(getattr(soo_ext, name), torch.optim.Optimizer)]


def class_sizes(cls) -> tuple[int, int, int]:
    """Lines of the class, of its docstring and of its step (0 if it inherits step)."""
    source = inspect.getsource(inspect.getmodule(cls))
    node = next(n for n in ast.parse(source).body
                if isinstance(n, ast.ClassDef) and n.name == cls.__name__)
    doc = node.body[0] if ast.get_docstring(node) is not None else None
    step = next((f for f in node.body if isinstance(f, ast.FunctionDef) and f.name == "step"),
                None)

    def lines(n):
        start = min([n.lineno] + [d.lineno for d in getattr(n, "decorator_list", [])])
        return n.end_lineno - start + 1
    return lines(node), lines(doc) if doc else 0, lines(step) if step else 0


def test_every_public_optimizer_is_listed():
    assert {c.__name__ for c in OPTIMIZERS} >= {"BFGS", "DRSOM", "KFAC", "LBFGS", "MLBFGS",
                                                "Shampoo"}


@pytest.mark.parametrize("cls", OPTIMIZERS, ids=lambda c: c.__name__)
def test_optimizer_classes_are_thin(cls):
    total, doc, step = class_sizes(cls)
    assert total <= 200, f"{cls.__name__}: {total} lines"
    assert 0 < doc <= 40, f"{cls.__name__}: docstring of {doc} lines"
    assert step <= 60, f"{cls.__name__}.step: {step} lines"
    assert "Example::" in cls.__doc__ and "Args:" in cls.__doc__
