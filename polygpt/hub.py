"""Pretrained GPT-2 by name: a Hugging Face model id (`gpt2`, `gpt2-medium`,
`openai-community/gpt2-xl`, `owner/name@revision`) wherever a checkpoint directory is accepted.

Fetching is huggingface_hub's: its cache (HF_HOME / HF_HUB_CACHE), its offline mode
(HF_HUB_OFFLINE=1), its revision pinning and progress bars. Only config.json, model.safetensors
and the tokenizer's JSON/text files are fetched, never a pickle, and config.json comes first, so
a model that is not GPT-2 is refused before its weights are downloaded.

A model sampled, served or fine-tuned by name is converted once into polygpt's cache,
`$POLYGPT_CACHE/hub/<owner>--<name>--<commit>` (default `~/.cache/polygpt`), a plain checkpoint
directory the user may inspect or delete; it is written atomically, like every checkpoint.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from polygpt import checkpoints, jsonfile
from polygpt import convert as convert_mod
from polygpt.errors import PolygptError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no flock
    fcntl = None

CACHE_ENV = "POLYGPT_CACHE"
CONFIG = "config.json"
WEIGHTS = "model.safetensors"
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json")
# huggingface_hub's allow_patterns (fnmatch on the path in the repo): these names at its root
# only, so never pytorch_model.bin, tf_model.h5, flax or onnx files
FILES = [CONFIG, WEIGHTS, *TOKENIZER_FILES]
INSTALL = "pip install 'polygpt[hub]'"
_COMMIT = re.compile(r"[0-9a-f]{40}")


@dataclass(frozen=True)
class ModelId:
    """`repo` (a Hugging Face model id) at `revision` (a branch, tag or commit; None: main)."""

    repo: str
    revision: str | None = None

    def __str__(self) -> str:
        return self.repo + (f"@{self.revision}" if self.revision else "")


def parse(source: str | Path) -> ModelId | None:
    """The model id `source` names, or None when it is (or can only be) a local path: an
    existing path always wins, and an id has at most one `/` and no leading `.`, `/` or `~`."""
    text = str(source)
    if not text or Path(text).exists() or text[0] in "./~" or text.endswith("/"):
        return None
    repo, _, revision = text.partition("@")
    if repo.count("/") > 1 or (revision == "" and "@" in text):
        return None
    if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", repo) or "--" in repo or ".." in repo:
        return None
    return ModelId(repo, revision or None)


def cache_root() -> Path:
    """polygpt's own cache (converted checkpoints), beside huggingface_hub's."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg).expanduser() / "polygpt"


def converted_dir(model: ModelId, commit: str) -> Path:
    return cache_root() / "hub" / f"{model.repo.replace('/', '--')}--{commit}"


def _hf():
    try:
        import huggingface_hub
        from huggingface_hub import constants
        from huggingface_hub import utils as hf_utils
    except ImportError:
        raise PolygptError(f"fetching a model by name needs huggingface_hub: {INSTALL}") from None
    return huggingface_hub, constants, hf_utils


def fetch(model: ModelId, with_weights: bool = True) -> Path:
    """The local snapshot directory of `model` (huggingface_hub's cache), fetched if needed:
    config.json, then (`with_weights`) model.safetensors and the tokenizer files at the same
    commit. Every failure is one PolygptError naming the id."""
    hf, _, _ = _hf()
    snap = _download(hf, model, model.revision, [CONFIG])
    _check_gpt2_config(model, snap / CONFIG)
    if with_weights:
        # the commit config.json came from (its snapshot directory's name), so a branch that
        # moves between the two calls cannot mix files of two revisions
        snap = _download(hf, model, snap.name, FILES)
        if not (snap / WEIGHTS).is_file():
            raise PolygptError(
                f"{model}: no {WEIGHTS} in the snapshot at {snap} (polygpt reads safetensors "
                "only, never pickled weights; a download that was cut off is completed by "
                "running the command again with a network)"
            )
    return snap


def _download(hf, model: ModelId, revision: str | None, patterns: list[str]) -> Path:
    try:
        if revision and _COMMIT.fullmatch(revision):
            # a commit never changes, so what the cache holds of it needs no Hub call (one
            # that, without a network, huggingface_hub retries a while before it gives up)
            snap = _cached(hf, model, revision, patterns)
            if snap is not None:
                return snap
        return Path(hf.snapshot_download(model.repo, revision=revision, allow_patterns=patterns))
    except Exception as e:  # noqa: BLE001 - huggingface_hub's errors, mapped to one line each
        raise PolygptError(_fetch_error(model, e)) from None


def _cached(hf, model: ModelId, commit: str, patterns: list[str]) -> Path | None:
    """The cached snapshot of `commit` if it holds the config and weights asked for (the
    tokenizer files are optional in a repository), else None: fetch."""
    try:
        kw = {"revision": commit, "allow_patterns": patterns, "local_files_only": True}
        snap = Path(hf.snapshot_download(model.repo, **kw))
    except (OSError, ValueError):  # not cached, or incomplete by its tree listing
        return None
    needed = [p for p in patterns if p in (CONFIG, WEIGHTS)]
    return snap if all((snap / p).is_file() for p in needed) else None


def _fetch_error(model: ModelId, e: Exception) -> str:
    _, constants, u = _hf()
    from huggingface_hub import errors as hf_errors

    local = "or convert a local directory: polygpt convert DIR OUT --from hf"
    if isinstance(e, u.GatedRepoError):
        return (
            f"{model} is gated on the Hugging Face Hub: accept its terms at "
            f"https://huggingface.co/{model.repo} and log in (hf auth login)"
        )
    if isinstance(e, u.RepositoryNotFoundError):
        return (
            f"no model {model.repo!r} on the Hugging Face Hub (if it is private, log in with "
            f"hf auth login), and no local directory of that name"
        )
    if isinstance(e, u.RevisionNotFoundError):
        return f"{model.repo} has no revision {model.revision!r} on the Hugging Face Hub"
    incomplete = getattr(hf_errors, "IncompleteSnapshotError", ())  # newer huggingface_hub
    if incomplete and isinstance(e, incomplete):
        return (
            f"the cached copy of {model} is incomplete (a download was cut off): run the "
            f"command again with a network to finish it, {local}"
        )
    if isinstance(e, u.LocalEntryNotFoundError):
        where = constants.HF_HUB_CACHE
        if constants.HF_HUB_OFFLINE:
            return (
                f"{model} is neither a local directory nor in the Hugging Face cache ({where}), "
                f"and HF_HUB_OFFLINE is set: fetch it once with a network, {local}"
            )
        return (
            f"{model} is not a local directory, and the Hugging Face Hub cannot be reached to "
            f"fetch it (it is not in the cache, {where}): fetch it once with a network, {local}"
        )
    if isinstance(e, u.HFValidationError):
        return f"{model} is not a valid Hugging Face model id, nor a local directory"
    first = str(e).splitlines()[0] if str(e) else type(e).__name__
    return f"fetching {model} from the Hugging Face Hub failed: {first}"


def _check_gpt2_config(model: ModelId, path: Path) -> None:
    """Refuse a model that is not GPT-2 before its weights are fetched."""
    if not path.is_file():
        raise PolygptError(f"{model} has no {CONFIG}: it is not a transformers GPT-2 model")
    cfg = jsonfile.read_json(path)
    if cfg.get("model_type") != "gpt2":
        arch = ", ".join(cfg.get("architectures") or []) or "no architectures"
        raise PolygptError(
            f"{model} is not a GPT-2 model (model_type {cfg.get('model_type')!r}, {arch}): "
            "polygpt converts GPT-2 checkpoints only"
        )


def checkpoint(source: str | Path) -> Path:
    """A polygpt checkpoint directory for `source`: itself when it is a local path (or no model
    id), else the model it names, fetched and converted into polygpt's cache once."""
    model = parse(source)
    if model is None:
        return Path(source)
    if model.revision and _COMMIT.fullmatch(model.revision):
        done = converted_dir(model, model.revision)
        if done.is_dir():  # a pinned commit already converted: no Hub call at all
            return done
    commit = fetch(model, with_weights=False).name
    done = converted_dir(model, commit)
    with _one_converter(done):
        checkpoints.clean_stale(done)  # what a converter killed mid-write left (we hold the lock)
        if done.is_dir():
            return done
        snap = fetch(ModelId(model.repo, commit))
        return convert_mod.from_hf(snap, done, source_name=f"{model.repo}@{commit}")


@contextmanager
def _one_converter(done: Path) -> Iterator[None]:
    """Processes that convert at once (the ranks of one run) take turns on a lock of the cache
    directory itself (no lock file left behind): the first converts, the others find its
    result, so none swaps the directory under another's reader."""
    done.parent.mkdir(parents=True, exist_ok=True)
    if fcntl is None:  # pragma: no cover - Windows
        yield
        return
    fd = os.open(done.parent, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # released on close, or when the process dies
        yield
    finally:
        os.close(fd)


def convert(
    src: str | Path,
    out: str | Path,
    src_format: str = "auto",
    dst_format: str | None = None,
    tokenizer_dir: str | Path | None = None,
) -> tuple[Path, str]:
    """convert.convert, where `src` may also be a Hugging Face model id (an hf source)."""
    model = parse(src) if src_format in ("auto", "hf") else None
    if model is None:
        return convert_mod.convert(src, out, src_format, dst_format, tokenizer_dir)
    if dst_format not in (None, "polygpt"):
        raise PolygptError(f"no conversion from hf to {dst_format}")
    snap = fetch(model)
    name = f"{model.repo}@{snap.name}"
    return convert_mod.from_hf(snap, out, tokenizer_dir, source_name=name), "polygpt"


def converted_models() -> list[Path]:
    """The checkpoints in polygpt's hub cache (for `polygpt info`)."""
    d = cache_root() / "hub"
    if not d.is_dir():
        return []
    return sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith("."))
