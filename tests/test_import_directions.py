"""Imports flow only downward between the rooms of the house (docs/architecture.md, "Rooms").

Every module of every package is read as source (nothing is imported) and each of its
imports, top-level or inside a function, is checked against the one table below.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# room -> the rooms its modules may import (a room may always import itself).
# Bottom to top: the method, backbones, adapter storage, training and serving side by side,
# then the benchmarks and the command line; tests may import anything.
MAY_IMPORT: dict[str, set[str]] = {
    "method": set(),
    "backbones": {"method"},
    "store": {"method", "backbones"},
    "training": {"method", "backbones", "store"},
    "serving": {"method", "backbones", "store"},
    "benchmarks": {"method", "backbones", "store", "training", "serving"},
    "cli": {"method", "backbones", "store", "training", "serving"},
    "tests": {"method", "backbones", "store", "training", "serving", "benchmarks", "cli"},
}

# module prefix -> room; the longest matching prefix wins.
ROOM_OF: dict[str, str] = {
    "adapters": "method",
    "adapters.store": "store",
    "backbones": "backbones",
    "training": "training",
    "serving": "serving",
    "benchmarks": "benchmarks",
    "cli": "cli",
    "tests": "tests",
}
PACKAGES = sorted({prefix.split(".")[0] for prefix in ROOM_OF})


def room_of(module: str) -> str | None:
    """The room of a dotted module name, or None for a module that is not ours."""
    matches = [prefix for prefix in ROOM_OF if module == prefix or module.startswith(prefix + ".")]
    return ROOM_OF[max(matches, key=len)] if matches else None


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, module: str) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file, relative ones resolved."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.append((node.lineno, base))
            submodules = (f"{base}.{alias.name}" for alias in node.names)  # `from adapters import store`
            found.extend((node.lineno, name) for name in submodules if room_of(name) != room_of(base))
    return found


def source_files() -> list[Path]:
    return sorted(path for package in PACKAGES for path in (ROOT / package).rglob("*.py"))


def test_every_prefix_names_a_room_of_the_table():
    assert set(ROOM_OF.values()) <= set(MAY_IMPORT)
    assert all(allowed <= set(MAY_IMPORT) for allowed in MAY_IMPORT.values())


@pytest.mark.parametrize("path", source_files(), ids=lambda path: str(path.relative_to(ROOT)))
def test_imports_flow_only_downward(path: Path):
    module = module_name(path)
    room = room_of(module)
    upward = [
        f"{path.relative_to(ROOT)}:{line} ({room}) imports {name} ({room_of(name)})"
        for line, name in imported_modules(path, module)
        if room_of(name) not in (None, room) and room_of(name) not in MAY_IMPORT[room]
    ]
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_the_check_sees_an_upward_import(tmp_path):
    """The walk itself works: a method module importing the serving room is caught."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from serving.bank import AdapterBank\n")
    names = [name for _, name in imported_modules(bad, "adapters.bad")]
    assert room_of("adapters.bad") == "method" and "serving.bank" in names
    assert room_of("serving.bank") not in MAY_IMPORT["method"]


# The HTTP edge talks to the model side only through the contract (serving/calls.py, the errors, the
# configs): it never imports the model stack, so the Ingress process holds no torch (docs/architecture.md).
EDGE_MAY_NOT_IMPORT = ("torch", "transformers", "serving.engine", "serving.decoder", "serving.runner",
                       "serving.bank", "serving.model", "serving.service", "serving.backend", "serving.deployment")


@pytest.mark.parametrize("path", sorted((ROOT / "serving" / "api").rglob("*.py")),
                         ids=lambda path: str(path.relative_to(ROOT)))
def test_the_http_edge_imports_the_contract_not_the_model_side(path: Path):
    imports = imported_modules(path, module_name(path))
    found = [f"{path.relative_to(ROOT)}:{line} imports {name}" for line, name in imports
             if any(name == banned or name.startswith(banned + ".") for banned in EDGE_MAY_NOT_IMPORT)]
    assert not found, "\n".join(found)


def test_the_ingress_process_never_loads_torch():
    """Importing what an Ingress replica runs (its deployment, the edge, the request router) leaves
    torch unloaded."""
    import subprocess
    import sys

    code = "import sys, serving.ingress, serving.routing; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT, timeout=120).returncode == 0
