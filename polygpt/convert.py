"""Conversion between polygpt checkpoints and other formats (torch-only, imported lazily).

- nanoGPT `ckpt.pt` -> polygpt: read with `torch.load(weights_only=True)`, which refuses to run
  code from the file. nanoGPT stores a pickled dict; only its tensors and plain values are used.
- Hugging Face GPT-2 directory (config.json + model.safetensors) <-> polygpt. HF's GPT-2 uses
  Conv1D layers whose weights are stored (in, out): the four matmul weights per block are
  transposed on the way in and out. GPT-2 always has biases, so a bias-free polygpt model is
  exported with zero biases (the same function). polygpt's `gelu_tanh` is HF's `gelu_new`.

Parameter names are the same in all three (nanoGPT copied OpenAI's), so everything else is a
name-for-name copy, checked against the spec (from the headers, before a tensor is read).

Conversion streams: the target file is written tensor by tensor (tensorfile.write_tensors), each
read from the source just before it is written (safetensors: plain reads of that tensor;
nanoGPT: `torch.load(weights_only=True, mmap=True)`, which maps the pickle's tensors instead
of reading them all), so no whole copy of the weights is ever built in memory.
"""

from __future__ import annotations

import json
from pathlib import Path

from polygpt import (
    __version__,
    atomic,
    checkpoints,
    hf_tokenizer,
    jsonfile,
    modelfile,
    quantized,
    tensorfile,
)
from polygpt import tokenizer as tok
from polygpt.errors import PolygptError
from polygpt.spec import LAYER_NORM_EPS, ModelSpec

CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
HF_ACT = {"gelu_tanh": "gelu_new", "gelu": "gelu"}
_DROP = ("lm_head.weight", ".attn.bias", ".attn.masked_bias")  # tied head; causal-mask buffers


def _torch():
    # torch is imported here, not at module top: convert is the one module above backends/
    # that needs it (torch.load of nanoGPT pickles, the torch backend's tensor reader), and
    # only when called.
    try:
        import torch

        from polygpt.backends.torch_backend import loading
    except ImportError:
        raise PolygptError("conversion needs torch: pip install 'polygpt[torch]'") from None
    return torch, loading


def _check_shapes(shapes: dict, spec: ModelSpec, source: str) -> None:
    expected = spec.param_shapes()
    for name, shape in expected.items():
        if name not in shapes:
            raise PolygptError(f"{source}: missing tensor {name!r}")
        if tuple(shapes[name]) != shape:
            raise PolygptError(
                f"{source}: {name} has shape {list(shapes[name])}, expected {list(shape)}"
            )
    extra = sorted(set(shapes) - set(expected))
    if extra:
        raise PolygptError(f"{source}: unexpected tensor {extra[0]!r}")


def _write_f32(path: Path, shapes: dict, tensor, metadata: dict[str, str]) -> None:
    """Write the tensors `shapes` lists as fp32, each made by `tensor(name)` just in time."""

    torch, _ = _torch()

    def data(name: str):
        t = tensor(name).float().contiguous()
        return t.view(-1).view(torch.uint8).numpy()  # its bytes; the array keeps t alive

    tensorfile.write_tensors(path, [(n, "F32", s) for n, s in shapes.items()], data, metadata)


def _write(out, spec, tensor, tokenizer: dict, extra: dict) -> Path:
    """A polygpt checkpoint of `spec` whose weights come from `tensor(name)`, one at a time."""
    config = {
        "polygpt_version": __version__,
        "spec": spec.to_dict(),
        "tokenizer": {k: v for k, v in tokenizer.items() if k != "chars"},
        "step": 0,
        "precision": "fp32",
        **extra,
    }
    meta = modelfile.metadata(spec)
    shapes = spec.param_shapes()
    out = checkpoints.write(
        out,
        config=config,
        tokenizer=tokenizer,
        save_model=lambda p: _write_f32(p, shapes, tensor, meta),
    )
    modelfile.check(out / checkpoints.MODEL_FILE, spec)  # what we wrote reads back
    return out


def _tokenizer_for(vocab_size: int, tokenizer_dir: str | Path | None) -> dict:
    if tokenizer_dir is not None:
        t = tok.load(Path(tokenizer_dir) / "tokenizer.json")
        if t.vocab_size > vocab_size:
            raise PolygptError(
                f"the tokenizer in {tokenizer_dir} has {t.vocab_size} tokens, "
                f"the model only {vocab_size}"
            )
        return t.to_dict()
    if vocab_size >= 50257:
        return {"type": "tiktoken", "name": "gpt2", "vocab_size": 50257}
    raise PolygptError("a character-level model needs --tokenizer DATA_DIR (with tokenizer.json)")


def from_nanogpt(
    ckpt_pt: str | Path, out: str | Path, tokenizer_dir: str | Path | None = None
) -> Path:
    torch, _ = _torch()
    p = Path(ckpt_pt)
    if not p.exists():
        raise PolygptError(f"{p} does not exist")
    obj = _load_nanogpt(torch, p)
    if not isinstance(obj, dict) or "model" not in obj or "model_args" not in obj:
        raise PolygptError(f"{p} is not a nanoGPT checkpoint (no 'model' / 'model_args')")
    args = obj["model_args"]
    try:
        spec = ModelSpec(
            vocab_size=int(args["vocab_size"]),
            block_size=int(args["block_size"]),
            n_layer=int(args["n_layer"]),
            n_head=int(args["n_head"]),
            n_embd=int(args["n_embd"]),
            bias=bool(args.get("bias", True)),
            dropout=0.0,
            activation="gelu",  # nanoGPT's nn.GELU() is the exact erf form
        )
    except KeyError as e:
        raise PolygptError(f"{p}: model_args lacks {e.args[0]!r}") from None
    state = {}
    for k, v in obj["model"].items():
        k = k.removeprefix("_orig_mod.")  # torch.compile'd models
        if k.endswith(_DROP[1:]) or k == _DROP[0]:
            continue
        state[k] = v  # mapped, not read: each is read (and made fp32) as it is written
    _check_shapes({k: tuple(v.shape) for k, v in state.items()}, spec, str(p))
    extra = {"converted_from": f"nanoGPT {p.name}", "nanogpt_iter_num": obj.get("iter_num")}
    if isinstance(obj.get("best_val_loss"), (int, float)) or hasattr(
        obj.get("best_val_loss"), "item"
    ):
        extra["metrics"] = {"val_loss": float(obj["best_val_loss"])}
    tokenizer = _tokenizer_for(spec.vocab_size, tokenizer_dir)
    return _write(out, spec, state.__getitem__, tokenizer, extra)


def _load_nanogpt(torch, p: Path) -> object:
    """torch.load with weights_only=True (it refuses to run code from the file), memory-mapped
    where the file allows it (the zip format torch.save writes since 1.6): the optimizer state
    beside the model is then never read at all."""
    try:
        try:
            return torch.load(p, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            return torch.load(p, map_location="cpu", weights_only=True)  # the legacy format
    except Exception as e:  # noqa: BLE001 - torch raises many types for a bad or unsafe file
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise PolygptError(f"cannot read {p} as a nanoGPT checkpoint: {msg}") from None


def from_hf(
    hf_dir: str | Path,
    out: str | Path,
    tokenizer_dir: str | Path | None = None,
    source_name: str | None = None,
) -> Path:
    """A Hugging Face GPT-2 directory (or hub snapshot, `source_name` its id@commit) -> polygpt."""
    torch, loading = _torch()
    d = Path(hf_dir)
    spec = _hf_spec(jsonfile.read_json(d / "config.json"), d)
    if not (d / "model.safetensors").exists() and (d / "pytorch_model.bin").exists():
        raise PolygptError(
            f"{d} holds pytorch_model.bin, a pickle, which can run code when loaded: polygpt "
            "reads model.safetensors only (transformers' save_pretrained writes it by default)"
        )
    tensorfile.read_header(d / "model.safetensors")  # a clear error for a bad file
    with tensorfile.TensorFile(d / "model.safetensors") as f:
        source, shapes = {}, {}  # polygpt name -> HF name, polygpt shape
        for k, e in f.entries.items():
            if k == _DROP[0] or k.endswith(_DROP[1:]):
                continue
            name = k if k.startswith("transformer.") else f"transformer.{k}"
            source[name] = k
            shapes[name] = e.shape[::-1] if name.endswith(CONV1D) else e.shape
        _check_shapes(shapes, spec, str(d))
        _check_float(f, source.values(), d)

        def tensor(name: str):
            e = f.entries[source[name]]
            t = loading.read_tensor(f, e.name, e.shape, torch.float32)
            return t.t() if name.endswith(CONV1D) else t

        tokenizer = _tokenizer_for(spec.vocab_size, tokenizer_dir)
        if tokenizer_dir is None:
            _check_hf_tokenizer(d, source_name or str(d))
        name = source_name or d.name
        return _write(out, spec, tensor, tokenizer, {"converted_from": f"Hugging Face {name}"})


def _hf_spec(cfg: dict, d: Path) -> ModelSpec:
    """The spec of a transformers GPT-2 config.json; what polygpt's GPT-2 would compute
    differently (activation, LayerNorm eps, MLP width, attention scaling) is refused."""
    if cfg.get("model_type") != "gpt2":
        raise PolygptError(f"{d}: model_type is {cfg.get('model_type')!r}, expected 'gpt2'")
    try:
        act = {v: k for k, v in HF_ACT.items()}.get(cfg.get("activation_function", "gelu_new"))
        if act is None:
            raise PolygptError(f"{d}: unsupported activation {cfg.get('activation_function')!r}")
        eps = float(cfg.get("layer_norm_epsilon", 1e-5))
        if abs(eps - LAYER_NORM_EPS) > 1e-12:
            raise PolygptError(f"{d}: layer_norm_epsilon must be {LAYER_NORM_EPS}")
        if cfg.get("n_inner") not in (None, 4 * cfg["n_embd"]):
            raise PolygptError(f"{d}: n_inner must be 4 * n_embd")
        if not cfg.get("scale_attn_weights", True) or cfg.get("scale_attn_by_inverse_layer_idx"):
            raise PolygptError(f"{d}: attention scaled other than by 1/sqrt(head size)")
        return ModelSpec(
            vocab_size=cfg["vocab_size"],
            block_size=cfg["n_positions"],
            n_layer=cfg["n_layer"],
            n_head=cfg["n_head"],
            n_embd=cfg["n_embd"],
            bias=True,
            dropout=0.0,
            activation=act,
        )
    except KeyError as e:
        raise PolygptError(f"{d / 'config.json'} lacks {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        raise PolygptError(f"{d / 'config.json'}: {e}") from None


def _hf_vocabs(d: Path) -> dict[str, object]:
    """The vocabularies a Hugging Face directory's tokenizer files hold, by file name."""
    found: dict[str, object] = {}
    if (d / "vocab.json").is_file():
        found["vocab.json"] = jsonfile.read_json(d / "vocab.json")
    if (d / "tokenizer.json").is_file():
        tj = jsonfile.read_json(d / "tokenizer.json")
        model = tj.get("model") if isinstance(tj.get("model"), dict) else {}
        vocab = model.get("vocab") if model.get("type", "BPE") == "BPE" else None
        vocab = dict(vocab) if isinstance(vocab, dict) else {}
        for t in tj.get("added_tokens") or []:
            if isinstance(t, dict):
                vocab[t.get("content")] = t.get("id")
        found["tokenizer.json"] = vocab
    return found


def _check_hf_tokenizer(d: Path, name: str) -> None:
    """The model's own tokenizer, where its files are present, must be GPT-2's BPE as polygpt
    ships it: a model trained with another vocabulary would read and write the wrong text.
    (A directory without tokenizer files is taken at its word: vocab 50257 is GPT-2's.)"""
    vocabs = _hf_vocabs(d)
    if not vocabs:
        return
    gpt2 = tok.gpt2_hf_vocab()
    for file, vocab in vocabs.items():
        if vocab == gpt2:
            continue
        odd = sorted(str(k) for k in set(vocab) ^ set(gpt2))
        odd += [k for k in gpt2 if vocab.get(k) != gpt2[k]]
        raise PolygptError(
            f"{name}: its tokenizer ({file}, {len(vocab):,} tokens) is not GPT-2's BPE "
            f"(first difference: {odd[0]!r}); polygpt converts models that use GPT-2's "
            "tokenizer (or a char-level one with --tokenizer DATA_DIR)"
        )


def _check_float(f: tensorfile.TensorFile, names, source) -> None:
    for n in names:
        if f.entries[n].dtype not in tensorfile.FLOAT_DTYPES:
            raise PolygptError(f"{source}: {n} has dtype {f.entries[n].dtype}, expected a float")


def to_hf(ckpt_dir: str | Path, out: str | Path) -> Path:
    """Export a polygpt checkpoint as a directory `GPT2LMHeadModel.from_pretrained` loads
    (fp32; a quantized checkpoint is dequantized), with a tokenizer.json `AutoTokenizer` loads
    that encodes as polygpt does (hf_tokenizer.py)."""
    torch, loading = _torch()
    ckpt = checkpoints.read(ckpt_dir)
    spec = ckpt.spec
    C = spec.n_embd
    shapes = {k: s[::-1] if k.endswith(CONV1D) else s for k, s in spec.param_shapes().items()}
    if not spec.bias:  # GPT-2 has biases everywhere: zeros compute the same function
        zeros = {
            "ln_1": C,
            "ln_2": C,
            "attn.c_attn": 3 * C,
            "attn.c_proj": C,
            "mlp.c_fc": 4 * C,
            "mlp.c_proj": C,
        }
        for i in range(spec.n_layer):
            for name, n in zeros.items():
                shapes[f"transformer.h.{i}.{name}.bias"] = (n,)
        shapes["transformer.ln_f.bias"] = (C,)
    bpe = ckpt.tokenizer.get("type") == "tiktoken"
    config = {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": spec.vocab_size,
        "n_positions": spec.block_size,
        "n_ctx": spec.block_size,  # older readers (mlx-lm's gpt2) still require it
        "n_embd": C,
        "n_layer": spec.n_layer,
        "n_head": spec.n_head,
        "n_inner": None,
        "activation_function": HF_ACT[spec.activation],
        "layer_norm_epsilon": LAYER_NORM_EPS,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "tie_word_embeddings": True,
        "bos_token_id": 50256 if bpe else None,
        "eos_token_id": 50256 if bpe else None,
    }
    params = spec.param_shapes()
    with tensorfile.TensorFile(ckpt.model_file) as f:
        q = f.metadata.get("quantization")
        quant = quantized.Quantization.from_json(q) if q else None

        def tensor(name: str):
            if name not in params:
                return torch.zeros(shapes[name])
            t = loading.read_tensor(f, name, params[name], torch.float32, quant)
            return t.t() if name.endswith(CONV1D) else t

        with atomic.atomic_directory(out) as tmp:
            _write_f32(tmp / "model.safetensors", shapes, tensor, {"format": "pt"})
            (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
            (tmp / "polygpt_tokenizer.json").write_text(json.dumps(ckpt.tokenizer))
            hf_tokenizer.write(tmp, ckpt.tokenizer, spec.block_size)
    return Path(out)


FORMATS = ("nanogpt", "hf", "polygpt")


def detect_format(src: str | Path) -> str:
    """What `src` is: a nanoGPT ckpt.pt, or a directory whose config.json says whether it is a
    polygpt checkpoint (a 'spec') or a transformers model (model_type, architectures); the
    files beside the weights do not tell (both may hold a tokenizer.json)."""
    src = Path(src)
    if src.is_file() and src.suffix in (".pt", ".pth"):
        return "nanogpt"
    if (src / "config.json").is_file():
        cfg = jsonfile.read_json(src / "config.json")
        if isinstance(cfg.get("spec"), dict):
            return "polygpt"
        if "model_type" in cfg or "architectures" in cfg:
            return "hf"
    raise PolygptError(f"cannot tell what {src} is: pass --from nanogpt|hf|polygpt")


def convert(
    src: str | Path,
    out: str | Path,
    src_format: str = "auto",
    dst_format: str | None = None,
    tokenizer_dir: str | Path | None = None,
) -> tuple[Path, str]:
    """Convert `src` to `out`; returns (out, the format written). Default target: polygpt, or
    hf when the source is a polygpt checkpoint."""
    if src_format == "auto":
        src_format = detect_format(src)
    dst_format = dst_format or ("hf" if src_format == "polygpt" else "polygpt")
    if src_format == "polygpt" and dst_format == "hf":
        return to_hf(src, out), dst_format
    if src_format == "nanogpt" and dst_format == "polygpt":
        return from_nanogpt(src, out, tokenizer_dir), dst_format
    if src_format == "hf" and dst_format == "polygpt":
        return from_hf(src, out, tokenizer_dir), dst_format
    raise PolygptError(f"no conversion from {src_format} to {dst_format}")
