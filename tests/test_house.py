"""House rules read from the source (nothing imported): no function over MAX_LINES lines in
polygpt/, and no module above backends/ that branches on which backend it runs on."""

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "polygpt"
MAX_LINES = 60
# What a module above backends/ never compares to: a backend's name, or a device name that only
# one backend knows ("mps" is torch's). "cpu", "cuda" and "gpu" name devices more than one
# backend runs on (MLX runs on cpu/gpu and CUDA; torch on cpu/cuda), so they stay allowed.
BACKEND_NAMES = {"torch", "mlx", "mps"}


def _sources(pkg: Path):
    for path in sorted(pkg.rglob("*.py")):
        yield path.relative_to(pkg.parent), ast.parse(path.read_text())


def long_functions(pkg: Path = PKG, limit: int = MAX_LINES) -> list[str]:
    """file:function:first-last of every def (methods and nested ones too) over `limit` lines,
    counted from its `def` line to its last line."""
    out = []
    for rel, tree in _sources(pkg):
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > limit:
                    out.append(f"{rel}:{node.name}:{node.lineno}-{node.end_lineno} ({n} lines)")
    return out


def _names_a_backend(node: ast.AST) -> bool:
    items = node.elts if isinstance(node, (ast.Tuple, ast.List, ast.Set)) else [node]
    return any(isinstance(c, ast.Constant) and c.value in BACKEND_NAMES for c in items)


def backend_branches(pkg: Path = PKG) -> list[str]:
    """file:line of every comparison (==, !=, in, ...; a `case`) with a backend's name as an
    operand, outside backends/."""
    out = []
    for rel, tree in _sources(pkg):
        if rel.parts[1] == "backends":
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Compare):
                operands = [node.left, *node.comparators]
            elif isinstance(node, ast.MatchValue):
                operands = [node.value]
            else:
                continue
            if any(_names_a_backend(o) for o in operands):
                out.append(f"{rel}:{node.lineno}: {ast.unparse(node)}")
    return out


def test_no_function_over_60_lines():
    bad = long_functions()
    assert not bad, "split by job into well-named helpers:\n" + "\n".join(bad)


def test_no_backend_name_compared_above_backends():
    bad = backend_branches()
    assert not bad, "ask the backend object instead (see backends/base.py):\n" + "\n".join(bad)


def _body(n: int, indent: str) -> str:
    return "".join(f"{indent}x{i} = {i}\n" for i in range(n))


def test_the_checks_see_what_they_forbid(tmp_path):
    pkg = tmp_path / "polygpt"
    (pkg / "backends").mkdir(parents=True)
    (pkg / "a.py").write_text(
        "def fits():\n"
        + _body(59, "    ")  # lines 1-60: 60 lines, allowed
        + "class C:\n    def method(self):\n"
        + _body(60, "        ")  # lines 62-122: 61
        + "def ok(be):\n    return be.device == 'cpu'\n"  # 123-124
        + "def bad(be):\n    if be.name == 'mlx':\n        return 1\n"  # 125-127
        + "    return be.name in ('torch', 'x')\n"  # 128
    )
    (pkg / "backends" / "b.py").write_text("def f(be):\n    return be.name == 'torch'\n")
    assert long_functions(pkg) == ["polygpt/a.py:method:62-122 (61 lines)"]
    assert [s.split(":")[1] for s in backend_branches(pkg)] == ["126", "128"]
