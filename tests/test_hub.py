"""Pretrained GPT-2 by name, offline: a local Hugging Face cache laid out as huggingface_hub
writes it (`models--<owner>--<name>/snapshots/<commit>/` and `refs/main`) holds a tiny GPT-2
saved by transformers; with HF_HUB_OFFLINE=1, convert, sample, serve and init_from by name give
what the snapshot directory gives. Each failure is one `error:` line, a non-zero exit and nothing
left in polygpt's cache or at OUT. The Hub itself is a local HTTP server speaking the part of
its API huggingface_hub uses (a download; unknown and gated models), so huggingface_hub's real
client code runs."""

from __future__ import annotations

import hashlib
import http.server
import json
import re
import threading

import numpy as np
import pytest
from click.testing import CliRunner

from polygpt import checkpoints, convert, finetune, hub, inference
from polygpt.cli import main
from polygpt.errors import PolygptError
from polygpt.generate import GenerationConfig

from .conftest import backends_under_test, requires

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
hf_constants = pytest.importorskip("huggingface_hub.constants")

REPO, COMMIT = "tiny-owner/gpt2-tiny", "0123456789abcdef0123456789abcdef01234567"
WEIGHTS = "model.safetensors"
X = np.random.default_rng(0).integers(0, 50257, size=(2, 40))


def gpt2_vocab_json() -> dict[str, int]:
    """GPT-2's vocab.json built as Hugging Face builds it, independently of polygpt: tiktoken's
    parser on the local gpt2.tiktoken, transformers' byte-to-unicode table."""
    from tiktoken.load import load_tiktoken_bpe
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    from polygpt import tokenizer as tk

    try:
        tk.TiktokenTokenizer("gpt2")
    except PolygptError as e:
        pytest.skip(str(e))
    path = next(p for p in tk.gpt2_vocab_candidates() if p.exists())
    table = bytes_to_unicode()
    ranks = load_tiktoken_bpe(str(path))
    return {**{"".join(table[b] for b in t): r for t, r in ranks.items()}, "<|endoftext|>": 50256}


def put(cache, repo: str, files: dict, commit: str = COMMIT):
    """A snapshot in huggingface_hub's cache layout; `files`: name -> bytes, or a directory
    saved by save_pretrained to copy."""
    root = cache / f"models--{repo.replace('/', '--')}"
    snap = root / "snapshots" / commit
    snap.mkdir(parents=True)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(commit)
    for name, data in files.items():
        (snap / name).write_bytes(data)
    return snap


@pytest.fixture(scope="module")
def hf_cache(tmp_path_factory):
    """(cache dir, the tiny GPT-2's snapshot dir, the transformers model)."""
    cache = tmp_path_factory.mktemp("hf") / "hub"
    torch.manual_seed(0)
    shape = dict(n_layer=2, n_head=2, n_embd=32, n_positions=64, initializer_range=0.5)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**shape)).eval()
    saved = tmp_path_factory.mktemp("saved")
    model.save_pretrained(saved)
    files = {n: (saved / n).read_bytes() for n in ("config.json", "model.safetensors")}
    vocab = gpt2_vocab_json()
    snap = put(cache, REPO, {**files, "vocab.json": json.dumps(vocab).encode()})
    other = dict(vocab, **{"Ġthe": vocab["Ġand"], "Ġand": vocab["Ġthe"]})  # two ids swapped
    put(cache, "tiny-owner/other-tokens", {**files, "vocab.json": json.dumps(other).encode()})
    llama = json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]})
    put(cache, "tiny-owner/llama", {**files, "config.json": llama.encode()})
    put(cache, "tiny-owner/partial", {"config.json": files["config.json"]})
    put(cache, "tiny-owner/gguf", {"model.gguf": b"GGUF"})
    return cache, snap, model


@pytest.fixture
def offline(hf_cache, tmp_path, monkeypatch):
    """HF_HUB_OFFLINE=1 and the local cache, for this process (huggingface_hub read its
    environment at import) and for subprocesses; polygpt's cache in tmp_path."""
    cache = hf_cache[0]
    for k, v in {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv(hub.CACHE_ENV, str(tmp_path / "polygpt-cache"))
    return hf_cache


def cli(*args: str):
    return CliRunner().invoke(main, list(args))


def logits(path, backend: str = "torch"):
    lm = inference.load(path, backend=backend, device="cpu")
    return lm.backend.logits(lm.model, X)


# ---- names ---------------------------------------------------------------------------------


def test_parse_tells_model_ids_from_paths(tmp_path, monkeypatch):
    assert hub.parse("gpt2") == hub.ModelId("gpt2")
    assert hub.parse("openai-community/gpt2-xl@main") == hub.ModelId(
        "openai-community/gpt2-xl", "main"
    )
    for path in ("./gpt2", "/abs/gpt2", "~/gpt2", "a/b/c", "gpt2/", "gpt2@", "a--b", ""):
        assert hub.parse(path) is None, path
    monkeypatch.chdir(tmp_path)
    (tmp_path / "gpt2").mkdir()
    assert hub.parse("gpt2") is None  # an existing local path always wins


def test_only_safetensors_and_json_are_fetched(offline, monkeypatch):
    """What fetch asks huggingface_hub for, through its own filter over the files the Hub's
    gpt2 repository lists."""
    import huggingface_hub
    from huggingface_hub.utils import filter_repo_objects

    asked, real = [], huggingface_hub.snapshot_download
    monkeypatch.setattr(
        huggingface_hub, "snapshot_download", lambda *a, **k: asked.append(k) or real(*a, **k)
    )
    hub.fetch(hub.ModelId(REPO))
    assert [k["allow_patterns"] for k in asked] == [["config.json"], hub.FILES]
    assert asked[1]["revision"] == COMMIT  # the weights at the commit config.json came from

    listing = [
        *(".gitattributes", "64-8bits.tflite", "README.md", "config.json", "flax_model.msgpack"),
        *("generation_config.json", "merges.txt", "model.safetensors", "onnx/config.json"),
        *("onnx/decoder_model.onnx", "pytorch_model.bin", "rust_model.ot", "tf_model.h5"),
        *("tokenizer.json", "tokenizer_config.json", "vocab.json"),
    ]
    fetched = set(filter_repo_objects(listing, allow_patterns=hub.FILES))
    assert fetched == {"config.json", "model.safetensors", "merges.txt", "vocab.json"} | {
        "tokenizer.json",
        "tokenizer_config.json",
    }


def test_auto_detects_a_transformers_folder_by_its_config(hf_cache, random_ckpt, tmp_path):
    d = tmp_path / "hf"
    d.mkdir()
    for f in ("config.json", "model.safetensors"):
        (d / f).write_bytes((hf_cache[1] / f).read_bytes())
    (d / "tokenizer.json").write_text("{}")  # the hub serves one beside the weights
    assert convert.detect_format(d) == "hf"
    assert convert.detect_format(random_ckpt) == "polygpt"


# ---- by name equals by directory ----------------------------------------------------------


def test_convert_by_name_equals_the_directory(offline, tmp_path):
    _, snap, model = offline
    r = cli("convert", REPO, str(tmp_path / "by_name"))
    assert r.exit_code == 0 and "(polygpt)" in r.output, r.output
    by_dir = convert.from_hf(snap, tmp_path / "by_dir")
    np.testing.assert_array_equal(logits(tmp_path / "by_name"), logits(by_dir))
    with torch.no_grad():
        ref = model(torch.from_numpy(X)).logits.numpy()
    assert np.abs(logits(by_dir) - ref).max() <= 1e-4
    ck = checkpoints.read(tmp_path / "by_name")
    assert ck.config["converted_from"] == f"Hugging Face {REPO}@{COMMIT}"
    assert ck.tokenizer["type"] == "tiktoken"
    assert not (tmp_path / "polygpt-cache").exists()  # convert writes OUT only


def test_sample_by_name_converts_once_into_the_cache(offline, tmp_path, monkeypatch):
    _, snap, _ = offline
    by_dir = convert.from_hf(snap, tmp_path / "by_dir")
    args = ["-t", "0", "-n", "30", "--prompt", "ROMEO:", "-b", "torch", "-d", "cpu"]
    expected = cli("sample", str(by_dir), *args)
    assert expected.exit_code == 0, expected.output
    r = cli("sample", REPO, *args)
    assert r.exit_code == 0 and r.output == expected.output, r.output
    done = tmp_path / "polygpt-cache" / "hub" / f"tiny-owner--gpt2-tiny--{COMMIT}"
    assert [p.name for p in done.parent.iterdir()] == [done.name]
    stamp = (done / "model.safetensors").stat().st_mtime_ns
    for name in (REPO, f"{REPO}@main", f"{REPO}@{COMMIT}"):  # again: the converted copy
        assert cli("sample", name, *args).output == expected.output
    assert (done / "model.safetensors").stat().st_mtime_ns == stamp
    info = cli("info")
    assert f"in {done.parent}" in info.output and done.name in info.output, info.output
    # huggingface_hub's copy gone, offline: the pinned commit is still the converted copy
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "emptied"))
    assert cli("sample", f"{REPO}@{COMMIT}", *args).output == expected.output
    assert cli("sample", REPO, *args).exit_code == 1  # `main` cannot be resolved offline


def test_processes_asking_at_once_convert_once(offline, monkeypatch):
    """The ranks of one run ask for the model together: one converts, the others wait for it
    (flock on separate opens excludes threads of one process as it does processes)."""
    from concurrent.futures import ThreadPoolExecutor

    calls, real = [], convert.from_hf
    monkeypatch.setattr(convert, "from_hf", lambda *a, **k: calls.append(a) or real(*a, **k))
    with ThreadPoolExecutor(3) as pool:
        dirs = list(pool.map(hub.checkpoint, [REPO] * 3))
    assert len(calls) == 1 and len(set(dirs)) == 1 and checkpoints.read(dirs[0])


def test_a_conversion_killed_mid_write_leaves_nothing_used(offline, tmp_path):
    """kill -9 skips every cleanup: the next use removes the temporary and converts again."""
    hub_dir = tmp_path / "polygpt-cache" / "hub"
    stale = hub_dir / f".tiny-owner--gpt2-tiny--{COMMIT}.tmp-x1y2"
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"half")
    done = hub.checkpoint(REPO)
    assert [p.name for p in hub_dir.iterdir()] == [done.name]
    assert checkpoints.read(done).spec.n_embd == 32


@pytest.mark.parametrize("backend", backends_under_test())
def test_init_from_by_name_loads_the_same_weights(offline, tmp_path, backend):
    from polygpt import tokenizer as tk
    from polygpt.backends import get_backend

    be = get_backend(backend, "cpu")
    bpe = tk.TiktokenTokenizer("gpt2")
    spec, model = finetune.load_init(be, REPO, bpe)
    ref_spec, ref = finetune.load_init(be, str(convert.from_hf(offline[1], tmp_path / "d")), bpe)
    assert spec == ref_spec
    np.testing.assert_array_equal(be.logits(model, X), be.logits(ref, X))
    with pytest.raises(PolygptError, match="another vocabulary"):  # char data: refused
        finetune.load_init(be, REPO, tk.CharTokenizer(list("abc")))


@pytest.fixture(scope="module")
def bpe_data(tmp_path_factory, shakespeare_text):
    from polygpt import data

    d = tmp_path_factory.mktemp("bpe")
    (d / "in.txt").write_text(shakespeare_text[:20000])
    return data.prepare_text([d / "in.txt"], d / "data").dir


@requires("torch")
def test_finetune_config_with_init_from_by_name(offline, tmp_path, bpe_data):
    from polygpt.train import train

    from .conftest import tiny_config

    cfg = tiny_config(
        bpe_data,
        tmp_path / "ft",
        f"init_from={REPO!r}",
        "max_iters=2",
        "eval_interval=2",
        "eval_iters=1",
        "block_size=64",
    )
    train(cfg)
    ft = checkpoints.read(tmp_path / "ft")
    assert ft.step == 2 and ft.spec.n_embd == 32 and ft.spec.vocab_size == 50257
    assert ft.config["run"]["train"]["init_from"] == REPO


@requires("torch")
def test_eval_by_name_equals_the_directory(offline, tmp_path, bpe_data):
    by_dir = convert.from_hf(offline[1], tmp_path / "by_dir")
    args = ["--data", str(bpe_data), "-b", "torch", "-d", "cpu", "--max-tokens", "300", "--json"]
    want = cli("eval", str(by_dir), *args)
    got = cli("eval", REPO, *args)
    assert want.exit_code == 0 and got.exit_code == 0, got.output
    assert json.loads(got.output)["perplexity"] == json.loads(want.output)["perplexity"]


# ---- failures: one line, a non-zero exit, nothing written ------------------------------------


def assert_refused(r, phrase: str, tmp_path) -> None:
    assert r.exit_code == 1, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and phrase in lines[0], r.output
    assert not (tmp_path / "out").exists()
    cache = tmp_path / "polygpt-cache" / "hub"
    assert not cache.exists() or not any(cache.iterdir()), list(cache.iterdir())


@pytest.mark.parametrize(
    ("name", "phrase"),
    [
        ("nobody/nothing", "is neither a local directory nor in the Hugging Face cache"),
        ("tiny-owner/llama", "is not a GPT-2 model (model_type 'llama', LlamaForCausalLM)"),
        ("tiny-owner/partial", "no model.safetensors"),
        ("tiny-owner/gguf", "has no config.json: it is not a transformers GPT-2 model"),
        ("tiny-owner/other-tokens", "is not GPT-2's BPE (first difference: 'Ġthe')"),
        (f"{REPO}@{'f' * 40}", "is neither a local directory nor in the Hugging Face cache"),
    ],
)
@pytest.mark.parametrize("command", ["convert", "sample"])
def test_offline_failures(offline, tmp_path, name, phrase, command):
    args = [name, str(tmp_path / "out")] if command == "convert" else [name, "-b", "torch"]
    assert_refused(cli(command, *args), phrase, tmp_path)


class FakeHub(http.server.BaseHTTPRequestHandler):
    """The Hub's HTTP API as huggingface_hub uses it, for the repositories in `repos` (path ->
    bytes): a revision's commit, the tree listing, HEAD and GET of a file at a commit. Others
    answer as the Hub does: 404 with X-Error-Code RepoNotFound, or 403 GatedRepo for a gated
    one (what hf_raise_for_status reads). `asked` records every path requested."""

    repos: dict[str, dict[str, bytes]] = {}
    asked: list[str] = []

    def do_GET(self):  # noqa: N802 - http.server's name
        self.asked.append(self.path)
        path = self.path.split("?")[0]
        m = re.match(r"/api/models/([^/]+/[^/]+)/(revision|tree)/[^/]+", path)
        repo = m.group(1) if m else "/".join(path.split("/")[1:3])
        files = self.repos.get(repo)
        if files is None:
            gated = "/gated" in path
            return self.answer(403 if gated else 404, b"", GatedRepo=gated)
        if m and m.group(2) == "revision":
            return self.answer(200, json.dumps({"id": repo, "sha": COMMIT}).encode())
        if m:
            tree = [
                {"type": "file", "path": n, "size": len(b), "oid": hashlib.sha1(b).hexdigest()}
                for n, b in files.items()
            ]
            return self.answer(200, json.dumps(tree).encode())
        name = path.split(f"/resolve/{COMMIT}/", 1)[-1]
        body = files.get(name)
        self.answer(200 if body is not None else 404, body or b"", ETag=f'"{name}"')

    do_HEAD = do_GET  # answer() sends a HEAD the headers only

    def answer(self, status: int, body: bytes, GatedRepo=False, **headers) -> None:  # noqa: N803
        self.send_response(status)
        if status >= 400:
            self.send_header("X-Error-Code", "GatedRepo" if GatedRepo else "RepoNotFound")
            self.send_header("X-Error-Message", "Access restricted" if GatedRepo else "missing")
        self.send_header("X-Repo-Commit", COMMIT)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def online(offline, monkeypatch):
    """The Hub at a local endpoint: the fake one, or (`url`) a closed port."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(FakeHub, "asked", [])

    def at(url: str | None):
        url = url or f"http://127.0.0.1:{server.server_address[1]}"
        monkeypatch.setattr(hf_constants, "ENDPOINT", url)
        template = url + "/{repo_id}/resolve/{revision}/{filename}"
        monkeypatch.setattr(hf_constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)

    yield at
    server.shutdown()


def test_download_fetches_safetensors_never_a_pickle(online, offline, tmp_path, monkeypatch):
    """A real download through huggingface_hub from the local Hub into an empty cache: the
    weights and tokenizer arrive, the pickle, TF and ONNX files are never asked for, and the
    model samples as the snapshot directory does."""
    snap = offline[1]
    files = {n: (snap / n).read_bytes() for n in ("config.json", "model.safetensors")}
    files |= {"vocab.json": (snap / "vocab.json").read_bytes(), "pytorch_model.bin": b"pickle"}
    files |= {"tf_model.h5": b"tf", "onnx/model.onnx": b"onnx"}
    monkeypatch.setattr(FakeHub, "repos", {"net-owner/gpt2-tiny": files})
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "empty-hf"))
    online(None)
    args = ["-t", "0", "-n", "20", "--prompt", "ROMEO:", "-b", "torch", "-d", "cpu"]
    r = cli("sample", "net-owner/gpt2-tiny", *args)
    assert r.exit_code == 0, r.output
    want = cli("sample", str(convert.from_hf(snap, tmp_path / "by_dir")), *args)
    assert r.stdout == want.stdout
    files_asked = [p.split("/resolve/")[-1] for p in FakeHub.asked if "/resolve/" in p]
    assert "model.safetensors" in "".join(files_asked), FakeHub.asked
    assert not [p for p in files_asked if p.endswith((".bin", ".h5", ".onnx"))], files_asked
    got = tmp_path / "empty-hf" / "models--net-owner--gpt2-tiny"
    assert (got / "refs" / "main").read_text() == COMMIT
    assert (got / "snapshots" / COMMIT / "model.safetensors").read_bytes() == files[WEIGHTS]


@pytest.mark.parametrize(
    ("name", "phrase"),
    [
        ("nobody/nothing", "no model 'nobody/nothing' on the Hugging Face Hub"),
        ("tiny-owner/gated", "tiny-owner/gated is gated on the Hugging Face Hub"),
    ],
)
def test_hub_answers(online, tmp_path, name, phrase):
    online(None)
    assert_refused(cli("convert", name, str(tmp_path / "out")), phrase, tmp_path)


def test_no_network(online, tmp_path):
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there: connection refused, as without a network
    online(f"http://127.0.0.1:{port}")
    r = cli("sample", "nobody/nothing", "-b", "torch")
    assert_refused(
        r,
        "nobody/nothing is not a local directory, and the Hugging Face Hub cannot be reached",
        tmp_path,
    )
    assert "polygpt convert DIR OUT --from hf" in r.output
    # a model already in the cache needs no network
    r = cli("sample", REPO, "-b", "torch", "-t", "0", "-n", "5", "--prompt", "a")
    assert r.exit_code == 0, r.output


def test_serve_by_name(offline, tmp_path):
    """`polygpt serve NAME` (a subprocess: the environment above is all it is told)."""
    openai = pytest.importorskip("openai")
    pytest.importorskip("fastapi")
    from polygpt.bench.serving import ServerProcess

    by_dir = convert.from_hf(offline[1], tmp_path / "by_dir")
    lm = inference.load(by_dir, backend="torch", device="cpu")
    want = lm.generate(["ROMEO:"], GenerationConfig(max_new_tokens=20, temperature=0.0))[0]
    s = ServerProcess(REPO, "torch", "-d", "cpu")
    try:
        client = openai.OpenAI(base_url=s.url, api_key="unused", max_retries=0)
        res = client.completions.create(model="m", prompt="ROMEO:", max_tokens=20, temperature=0)
    finally:
        s.close()
    assert res.choices[0].text == want
