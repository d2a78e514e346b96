"""The documentation is the user's manual: every command it quotes must exist.

README.md and docs/*.md are read without running anything. In code blocks and inline code:
- every `polygpt COMMAND [--option ...]` names a command of the click group and options of that
  command (placeholders such as NAME, CKPT or <...> are skipped);
- every `make TARGET` names a target of the Makefile;
- every repository path (configs/, scripts/, docs/, experiments/, polygpt/, tests/) exists, from
  the repository root or from the document's own folder; paths under weights/ or data/ are
  written at run time and are not checked.
Every relative Markdown link points at a file that exists, and its #anchor at one of its headings.
"""

from __future__ import annotations

import glob
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

REPO_DIRS = ("configs", "scripts", "docs", "experiments", "polygpt", "tests")
PATH_RE = re.compile(r"(?<![\w./~$-])((?:" + "|".join(REPO_DIRS) + r")/[\w./*{},-]*)")
MAKE_RE = re.compile(r"(?<![\w./-])make\s+([a-z][\w-]*)")
LINK_RE = re.compile(r"\]\(([^)\s]+)\)")
FENCE_RE = re.compile(r"^```[^\n]*\n(.*?)^```", re.M | re.S)
INLINE_RE = re.compile(r"`([^`]+)`")
# shell separators between commands; a bare `|` inside a token (torch|mlx) is a placeholder
SEPARATOR_RE = re.compile(r"\s(?:&&|\|\||\||;|&)(?=\s|$)|;")


def _cli_tree() -> dict[str, set[str]]:
    from polygpt.cli import main

    tree = {"": {o for p in main.params for o in (*p.opts, *p.secondary_opts)} | {"-h", "--help"}}
    for name, cmd in main.commands.items():
        opts = {o for p in cmd.params for o in (*p.opts, *p.secondary_opts) if o.startswith("-")}
        tree[name] = opts | {"-h", "--help"}
    return tree


def _make_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([A-Za-z][\w.-]*)\s*:(?!=)", text, re.M))
    for line in re.findall(r"^\.PHONY:(.*)$", text, re.M):
        targets |= set(line.split())
    return targets


def snippets(text: str) -> list[str]:
    """The code of a Markdown text: fenced blocks (continuation lines joined) and inline code."""
    out = []
    for block in FENCE_RE.findall(text):
        out.extend(block.replace("\\\n", " ").splitlines())
    prose = FENCE_RE.sub("", text)
    out.extend(INLINE_RE.findall(prose.replace("\n", " ")))  # inline code may wrap a line
    return out


def _tokens(segment: str) -> list[str]:
    lex = shlex.shlex(segment, posix=True)
    lex.whitespace_split = True
    lex.commenters = "#"
    try:
        return list(lex)
    except ValueError:  # an unbalanced quote: fall back to whitespace, comment dropped
        return re.sub(r"(^|\s)#.*", "", segment).split()


def _placeholder(word: str) -> bool:
    return not word or word[0] in "<[{$." or word.isupper() or "..." in word


def check_commands(lines: list[str], tree: dict[str, set[str]]) -> list[str]:
    """`polygpt COMMAND --option` uses that do not exist in the click tree."""
    problems = []
    for line in lines:
        for segment in SEPARATOR_RE.split(line):
            toks = _tokens(segment)
            for i, tok in enumerate(toks):
                if tok != "polygpt" and not tok.endswith("/polygpt"):
                    continue
                rest = toks[i + 1 :]
                if not rest or _placeholder(rest[0]):
                    continue
                cmd = rest[0]
                if cmd.startswith("-"):
                    cmd, args = "", rest
                elif not re.fullmatch(r"[a-z][a-z-]*", cmd):
                    continue  # prose such as "polygpt's" or a path
                else:
                    args = rest[1:]
                if cmd not in tree:
                    problems.append(f"unknown command `polygpt {cmd}` in: {line.strip()}")
                    continue
                for arg in args:
                    if arg == "--":
                        break
                    if re.match(r"--?[A-Za-z]", arg):
                        opt = arg.split("=", 1)[0]
                        if opt not in tree[cmd]:
                            problems.append(
                                f"unknown option {opt} of `polygpt {cmd}` in: {line.strip()}"
                            )
    return problems


def check_make(lines: list[str], targets: set[str]) -> list[str]:
    problems = []
    for line in lines:
        code = re.sub(r"(^|\s)#.*", "", line)
        for target in MAKE_RE.findall(code):
            if target not in targets:
                problems.append(f"no Makefile target `make {target}` in: {line.strip()}")
    return problems


def check_paths(lines: list[str], doc_dir: Path) -> list[str]:
    problems = []
    for line in lines:
        for path in PATH_RE.findall(line):
            path = path.rstrip(".,:;")
            if not path or any(c in path for c in "{}") or "..." in path:
                continue
            found = any(
                glob.glob(str(base / path)) if "*" in path else (base / path).exists()
                for base in (ROOT, doc_dir)
            )
            if not found:
                problems.append(f"no such file `{path}` in: {line.strip()}")
    return problems


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = FENCE_RE.sub("", path.read_text())
    return {slug(h) for h in re.findall(r"^#{1,6}\s+(.*)$", text, re.M)}


def check_links(doc: Path) -> list[str]:
    problems = []
    for target in LINK_RE.findall(doc.read_text()):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto
        file, _, anchor = target.partition("#")
        dest = (doc.parent / file).resolve() if file else doc
        if not dest.exists():
            problems.append(f"link to a missing file: {target}")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            problems.append(f"link to a missing heading: {target}")
    return problems


@pytest.fixture(scope="module")
def tree():
    return _cli_tree()


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_commands_exist(doc, tree):
    assert check_commands(snippets(doc.read_text()), tree) == []


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_make_targets_exist(doc):
    assert check_make(snippets(doc.read_text()), _make_targets()) == []


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_paths_exist(doc):
    assert check_paths(snippets(doc.read_text()), doc.parent) == []


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_resolve(doc):
    assert check_links(doc) == []


def test_the_checks_catch_mistakes(tree, tmp_path):
    text = "\n".join(
        [
            "```bash",
            "polygpt trian configs/shakespeare_char.toml",
            "polygpt sample weights/x --temprature 0 \\",
            "    --prompt 'ROMEO:'",
            "torchrun -m polygpt train configs/nope.toml --bakend torch",
            "make demoo",
            "```",
            "Then `polygpt sample CKPT --backend mlx`, `polygpt serve --nope` and `make test`;",
            '`polygpt bench CKPT --prompt "$(head -c 40 input.txt)"` quotes another tool\'s -c.',
        ]
    )
    lines = snippets(text)
    problems = check_commands(lines, tree)
    assert len(problems) == 5, problems
    assert any("polygpt trian" in p for p in problems)
    assert any("--temprature" in p for p in problems)
    assert any("--bakend" in p for p in problems)
    assert any("--nope of `polygpt serve`" in p for p in problems)
    assert any("--prompt of `polygpt bench`" in p for p in problems)
    assert check_make(lines, _make_targets()) == ["no Makefile target `make demoo` in: make demoo"]
    assert [p.split("`")[1] for p in check_paths(lines, ROOT)] == ["configs/nope.toml"]
    doc = tmp_path / "x.md"
    doc.write_text("# A title\n[ok](#a-title) [bad](#b-title) [gone](missing.md)\n")
    assert check_links(doc) == [
        "link to a missing heading: #b-title",
        "link to a missing file: missing.md",
    ]
