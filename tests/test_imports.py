"""The package's imports point down: no cycle, no arrow from a layer to one above it, no
framework outside its backend, and function-level imports only for optional dependencies (read
from the source, nothing imported).
"""

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "polygpt"

# module -> the optional dependencies it may import inside a function, and why
LAZY_ALLOWED = {
    "polygpt.plot": {"matplotlib", "matplotlib.pyplot"},  # the [plot] extra
    "polygpt.tokenizer": {"tiktoken"},  # the [bpe] extra
    "polygpt.hf_tokenizer": {"tokenizers"},  # the [hf] extra (convert --to hf)
    # nanoGPT pickles need torch.load; tensors are read and written through the torch backend
    "polygpt.convert": {"torch", "safetensors.torch", "polygpt.backends.torch_backend.loading"},
    "polygpt.cli.generation": {"polygpt.serve"},  # the [serve] extra (fastapi, uvicorn)
    "polygpt.hub": {"huggingface_hub"},  # the [hub] extra: fetching a model by name
}
FRAMEWORKS = ("torch", "mlx")

# The layers, bottom up: a module imports from its own layer or the ones below it, never from a
# layer above. An entry names a module and everything under it (the longest entry wins).
LAYERS = [
    ("ground", ["polygpt", "polygpt.errors", "polygpt.faults", "polygpt.blas"]),
    (
        "text",
        ["polygpt.textstream", "polygpt.sampling", "polygpt.tokenizer", "polygpt.hf_tokenizer"],
    ),
    ("spec and config", ["polygpt.spec", "polygpt.config"]),
    (
        "files",
        [
            "polygpt.atomic",
            "polygpt.jsonfile",
            "polygpt.tensorfile",
            "polygpt.quantized",
            "polygpt.modelfile",
            "polygpt.checkpoints",
            "polygpt.metrics_log",
            "polygpt.rundir",
            "polygpt.data",
        ],
    ),
    ("backends", ["polygpt.backends"]),
    (
        "engine",
        [
            "polygpt.engine",
            "polygpt.generate",
            "polygpt.inference",
            "polygpt.engine_process",
            "polygpt.distributed",
        ],
    ),
    (
        "workflows",
        [
            "polygpt.finetune",
            "polygpt.train",
            "polygpt.evaluate",
            "polygpt.sweep",
            "polygpt.quantize",
            "polygpt.convert",
            "polygpt.hub",
            "polygpt.plot",
            "polygpt.serve",
            "polygpt.bench",
        ],
    ),
    ("cli", ["polygpt.cli", "polygpt.__main__"]),
]


def module_name(path: Path, pkg: Path) -> str:
    parts = path.relative_to(pkg.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, pkg: Path) -> list[tuple[str, bool]]:
    """(imported module, at module top?) for every import statement of a file."""
    tree = ast.parse(path.read_text())
    top = set(map(id, tree.body))
    for node in tree.body:  # `if sys.version_info ...:` / `try:` blocks at top level count as top
        if isinstance(node, (ast.If, ast.Try)):
            top |= {id(n) for n in ast.walk(node)}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, id(node) in top) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:  # `from polygpt import data` imports the module polygpt.data
                sub = f"{node.module}.{a.name}"
                name = sub if (pkg.parent / (sub.replace(".", "/") + ".py")).exists() else None
                name = name or (sub if (pkg.parent / sub.replace(".", "/")).is_dir() else None)
                out.append((name or node.module, id(node) in top))
    return out


def graph(pkg: Path = PKG) -> dict[str, list[tuple[str, bool]]]:
    return {module_name(p, pkg): imports(p, pkg) for p in sorted(pkg.rglob("*.py"))}


def find_cycle(pkg: Path = PKG) -> None:
    deps = graph(pkg)
    g = {m: sorted({i for i, _ in d if i.startswith("polygpt")}) for m, d in deps.items()}
    done, stack = set(), []

    def visit(m: str) -> None:
        if m in stack:
            raise AssertionError("import cycle: " + " -> ".join([*stack[stack.index(m) :], m]))
        if m in done:
            return
        stack.append(m)
        for dep in g.get(m, []):
            if dep != m and not m.startswith(dep + "."):  # a package's own __init__ is no cycle
                visit(dep)
        stack.pop()
        done.add(m)

    for m in g:
        visit(m)


def layer_of(mod: str, layers=LAYERS) -> int | None:
    """Index in `layers` of the longest entry naming `mod` or a package above it."""
    best, level = -1, None
    for i, (_, entries) in enumerate(layers):
        for e in entries:
            if (mod == e or mod.startswith(e + ".")) and len(e) > best:
                best, level = len(e), i
    return level


def arrows_up(pkg: Path = PKG, layers=LAYERS) -> list[str]:
    """Imports from a module to one in a higher layer, and modules the table does not place."""
    bad = []
    for mod, deps in graph(pkg).items():
        here = layer_of(mod, layers)
        if here is None:
            bad.append(f"{mod} is in no layer: add it to LAYERS")
            continue
        for dep in sorted({d for d, _ in deps if d.startswith("polygpt")}):
            there = layer_of(dep, layers)
            if there is not None and there > here:
                bad.append(f"{mod} ({layers[here][0]}) imports {dep} ({layers[there][0]})")
    return bad


def test_no_import_cycle():
    find_cycle()


def test_imports_point_down():
    bad = arrows_up()
    assert not bad, "\n".join(bad)


def test_frameworks_only_inside_their_backend():
    for mod, deps in graph().items():
        for name, _ in deps:
            fw = name.split(".")[0]
            if fw not in FRAMEWORKS and name != "safetensors.torch":
                continue
            fw = "torch" if name == "safetensors.torch" else fw
            inside = mod.startswith(f"polygpt.backends.{fw}_backend")
            assert inside or mod == "polygpt.convert", f"{mod} imports {name}"


def test_function_level_imports_are_optional_dependencies():
    for mod, deps in graph().items():
        if mod.startswith("polygpt.backends."):
            continue  # frameworks are imported on demand there (see backends/base.py)
        lazy = {name for name, top in deps if not top}
        extra = lazy - LAZY_ALLOWED.get(mod, set())
        assert not extra, f"{mod} imports {sorted(extra)} inside a function"


def _package(tmp_path: Path, **modules: str) -> Path:
    """A fake `polygpt` package of the given modules' sources."""
    pkg = tmp_path / "polygpt"
    pkg.mkdir()
    for name, source in {"__init__": "", **modules}.items():
        (pkg / f"{name}.py").write_text(source)
    return pkg


def test_the_check_sees_a_cycle(tmp_path):
    """The graph walk itself: a two-module cycle through a function-level import is found."""
    pkg = _package(tmp_path, a="from polygpt import b\n", b="def f():\n    from polygpt import a\n")
    with pytest.raises(AssertionError, match="polygpt.a -> polygpt.b -> polygpt.a"):
        find_cycle(pkg)


def test_the_check_sees_an_arrow_up(tmp_path):
    pkg = _package(
        tmp_path, low="from polygpt import high\n", high="from polygpt import low\n", odd=""
    )
    layers = [("ground", ["polygpt"]), ("low", ["polygpt.low"]), ("high", ["polygpt.high"])]
    assert arrows_up(pkg, layers) == ["polygpt.low (low) imports polygpt.high (high)"]
    assert layer_of("polygpt.odd", layers) == 0  # placed by the package above it
