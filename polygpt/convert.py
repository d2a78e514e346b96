"""Conversion between polygpt checkpoints and other formats (torch-only, imported lazily).

- nanoGPT `ckpt.pt` -> polygpt: read with `torch.load(weights_only=True)`, which refuses to run
  code from the file. nanoGPT stores a pickled dict; only its tensors and plain values are used.
- Hugging Face GPT-2 directory (config.json + model.safetensors) <-> polygpt. HF's GPT-2 uses
  Conv1D layers whose weights are stored (in, out): the four matmul weights per block are
  transposed on the way in and out. GPT-2 always has biases, so a bias-free polygpt model is
  exported with zero biases (the same function). polygpt's `gelu_tanh` is HF's `gelu_new`.

Parameter names are the same in all three (nanoGPT copied OpenAI's), so everything else is a
name-for-name copy, checked against the spec before anything is written.
"""

from __future__ import annotations

import json
from pathlib import Path

from polygpt import __version__, weights
from polygpt import tokenizer as tok
from polygpt.errors import PolygptError
from polygpt.spec import LAYER_NORM_EPS, ModelSpec

CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
HF_ACT = {"gelu_tanh": "gelu_new", "gelu": "gelu"}
_DROP = ("lm_head.weight", ".attn.bias", ".attn.masked_bias")  # tied head; causal-mask buffers


def _torch():
    # torch is imported here, not at module top: convert is the one module above backends/
    # that needs it (torch.load of nanoGPT pickles, safetensors.torch), and only when called.
    try:
        import torch
        from safetensors.torch import load_file, save_file
    except ImportError:
        raise PolygptError("conversion needs torch: pip install 'polygpt[torch]'") from None
    return torch, load_file, save_file


def _check_state(state: dict, spec: ModelSpec, source: str) -> None:
    expected = spec.param_shapes()
    for name, shape in expected.items():
        if name not in state:
            raise PolygptError(f"{source}: missing tensor {name!r}")
        if tuple(state[name].shape) != shape:
            raise PolygptError(
                f"{source}: {name} has shape {list(state[name].shape)}, expected {list(shape)}"
            )
    extra = sorted(set(state) - set(expected))
    if extra:
        raise PolygptError(f"{source}: unexpected tensor {extra[0]!r}")


def _write(out, spec, state, tokenizer: dict, extra: dict, save_file) -> Path:
    state = {k: state[k].contiguous() for k in spec.param_shapes()}
    config = {
        "polygpt_version": __version__,
        "spec": spec.to_dict(),
        "tokenizer": {k: v for k, v in tokenizer.items() if k != "chars"},
        "step": 0,
        "precision": "fp32",
        **extra,
    }
    meta = weights.model_metadata(spec)
    return weights.write_checkpoint(
        out,
        config=config,
        tokenizer=tokenizer,
        save_model=lambda p: save_file(state, str(p), metadata=meta),
    )


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
    torch, _, save_file = _torch()
    p = Path(ckpt_pt)
    if not p.exists():
        raise PolygptError(f"{p} does not exist")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)  # never executes code
    except Exception as e:  # noqa: BLE001 - torch raises many types for a bad or unsafe file
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise PolygptError(f"cannot read {p} as a nanoGPT checkpoint: {msg}") from None
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
        state[k] = v.float()
    _check_state(state, spec, str(p))
    extra = {"converted_from": f"nanoGPT {p.name}", "nanogpt_iter_num": obj.get("iter_num")}
    if isinstance(obj.get("best_val_loss"), (int, float)) or hasattr(
        obj.get("best_val_loss"), "item"
    ):
        extra["metrics"] = {"val_loss": float(obj["best_val_loss"])}
    return _write(
        out, spec, state, _tokenizer_for(spec.vocab_size, tokenizer_dir), extra, save_file
    )


def from_hf(hf_dir: str | Path, out: str | Path, tokenizer_dir: str | Path | None = None) -> Path:
    torch, load_file, save_file = _torch()
    d = Path(hf_dir)
    cfg = weights.read_json(d / "config.json")
    if cfg.get("model_type") != "gpt2":
        raise PolygptError(f"{d}: model_type is {cfg.get('model_type')!r}, expected 'gpt2'")
    act = {v: k for k, v in HF_ACT.items()}.get(cfg.get("activation_function", "gelu_new"))
    if act is None:
        raise PolygptError(f"{d}: unsupported activation {cfg.get('activation_function')!r}")
    if abs(float(cfg.get("layer_norm_epsilon", 1e-5)) - LAYER_NORM_EPS) > 1e-12:
        raise PolygptError(f"{d}: layer_norm_epsilon must be {LAYER_NORM_EPS}")
    if cfg.get("n_inner") not in (None, 4 * cfg["n_embd"]):
        raise PolygptError(f"{d}: n_inner must be 4 * n_embd")
    spec = ModelSpec(
        vocab_size=cfg["vocab_size"],
        block_size=cfg["n_positions"],
        n_layer=cfg["n_layer"],
        n_head=cfg["n_head"],
        n_embd=cfg["n_embd"],
        bias=True,
        dropout=0.0,
        activation=act,
    )
    if not (d / "model.safetensors").exists() and (d / "pytorch_model.bin").exists():
        raise PolygptError(
            f"{d} holds pytorch_model.bin, a pickle, which can run code when loaded: polygpt "
            "reads model.safetensors only (transformers' save_pretrained writes it by default)"
        )
    weights.read_header(d / "model.safetensors")  # a clear error for a bad file
    raw = load_file(str(d / "model.safetensors"), device="cpu")
    state = {}
    for k, v in raw.items():
        if k == _DROP[0] or k.endswith(_DROP[1:]):
            continue
        k = k if k.startswith("transformer.") else f"transformer.{k}"
        state[k] = (v.t() if k.endswith(CONV1D) else v).float()
    _check_state(state, spec, str(d))
    return _write(
        out,
        spec,
        state,
        _tokenizer_for(spec.vocab_size, tokenizer_dir),
        {"converted_from": f"Hugging Face GPT-2 {d.name}"},
        save_file,
    )


def to_hf(ckpt_dir: str | Path, out: str | Path) -> Path:
    """Export a polygpt checkpoint as a directory `GPT2LMHeadModel.from_pretrained` loads."""
    torch, load_file, save_file = _torch()
    ckpt = weights.read_checkpoint(ckpt_dir)
    spec = ckpt.spec
    weights.check_model_file(ckpt.model_file, spec)
    state = load_file(str(ckpt.model_file), device="cpu")
    hf = {}
    C = spec.n_embd
    for k, v in state.items():
        hf[k] = (v.t() if k.endswith(CONV1D) else v).float().contiguous()
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
                hf[f"transformer.h.{i}.{name}.bias"] = torch.zeros(n)
        hf["transformer.ln_f.bias"] = torch.zeros(C)
    bpe = ckpt.tokenizer.get("type") == "tiktoken"
    config = {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": spec.vocab_size,
        "n_positions": spec.block_size,
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
    with weights.atomic_directory(out) as tmp:
        save_file(hf, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (tmp / "polygpt_tokenizer.json").write_text(json.dumps(ckpt.tokenizer))
    return Path(out)


FORMATS = ("nanogpt", "hf", "polygpt")


def detect_format(src: str | Path) -> str:
    """What `src` is: a nanoGPT ckpt.pt, a polygpt checkpoint or a Hugging Face GPT-2 dir."""
    src = Path(src)
    if src.is_file() and src.suffix in (".pt", ".pth"):
        return "nanogpt"
    if (src / weights.TOKENIZER_FILE).exists() and (src / weights.MODEL_FILE).exists():
        return "polygpt"
    if (src / "config.json").exists():
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
