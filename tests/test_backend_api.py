"""The file list and the public names are the backend contract (keras 3's lesson).

Read from the source with `ast`, so this runs with neither framework installed: every backend
package has the same files, its `Backend` class the same public methods (a superset of the
protocol in base.py), and its model.py the same classes in the same order.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from polygpt.backends import base

PKG = Path(base.__file__).parent
BACKENDS = {name: PKG / e.module.rsplit(".", 1)[1] for name, e in base._REGISTRY.items()}


def _classes(path: Path) -> dict[str, ast.ClassDef]:
    tree = ast.parse(path.read_text())
    return {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}


def _public_methods(cls: ast.ClassDef) -> set[str]:
    """The class's own public methods and those of its bases in backends/slots.py (the row
    operations are written there once)."""
    shared = _classes(PKG / "slots.py")
    inherited = [shared[b.id] for b in cls.bases if isinstance(b, ast.Name) and b.id in shared]
    return {
        n.name
        for c in (cls, *inherited)
        for n in c.body
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and not n.name.startswith("_")
    }


def _protocol_methods() -> set[str]:
    return _public_methods(_classes(Path(base.__file__))["Backend"])


def test_every_backend_package_has_the_same_files():
    files = {name: sorted(p.name for p in d.glob("*.py")) for name, d in BACKENDS.items()}
    first = next(iter(files.values()))
    assert all(f == first for f in files.values()), files
    assert {"__init__.py", "backend.py", "model.py"} <= set(first)


@pytest.mark.parametrize("name", list(BACKENDS))
def test_backend_implements_the_protocol(name):
    methods = _public_methods(_classes(BACKENDS[name] / "backend.py")["Backend"])
    missing = _protocol_methods() - methods
    assert not missing, f"{name} backend lacks {sorted(missing)}"


def test_backends_supply_the_framework_calls_of_the_shared_row_operations():
    ops = _classes(PKG / "slots.py")["SlotOps"]
    needed = {"_new_slot_cache", "_prefill", "_decode", "_copy", "_grow"}
    assert needed <= {n.id for n in ast.walk(ops) if isinstance(n, ast.Name)} | {
        n.attr for n in ast.walk(ops) if isinstance(n, ast.Attribute)
    }
    for name, d in BACKENDS.items():
        cls = _classes(d / "backend.py")["Backend"]
        own = {n.name for n in cls.body if isinstance(n, ast.FunctionDef)}
        assert needed <= own, f"{name} backend lacks {sorted(needed - own)}"


def test_backends_expose_the_same_public_methods():
    methods = {
        name: _public_methods(_classes(d / "backend.py")["Backend"]) for name, d in BACKENDS.items()
    }
    union = set().union(*methods.values())
    diff = {name: sorted(union - m) for name, m in methods.items() if union - m}
    assert not diff, f"methods missing from some backend: {diff}"


def test_model_files_mirror_each_other():
    # public classes (a private helper, such as torch's autograd GELU, is framework detail)
    classes = {
        name: [c for c in _classes(d / "model.py") if not c.startswith("_")]
        for name, d in BACKENDS.items()
    }
    first = next(iter(classes.values()))
    assert all(c == first for c in classes.values()), classes
    assert first[-1] == "GPT"
