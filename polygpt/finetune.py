"""Starting a run from existing weights (nanoGPT's `init_from`): fine-tuning.

`polygpt train CONFIG init_from=CKPT` takes the model spec and weights from a polygpt
checkpoint (trained, converted from Hugging Face GPT-2 or nanoGPT, in either backend; or a
Hugging Face GPT-2 id such as "gpt2", as nanoGPT's init_from takes one) and starts
a fresh run: a new optimizer, step 0, the config's data, schedule and output directory. Only
`model.dropout` is taken from the config (nanoGPT's finetune_shakespeare sets it); the rest of
[model] describes a model to initialise and is ignored.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from polygpt import checkpoints, hub
from polygpt.errors import PolygptError
from polygpt.spec import ModelSpec


def load_init(
    backend: Any, path: str, tokenizer: Any, dropout: float = 0.0
) -> tuple[ModelSpec, Any]:
    """(spec, fp32 model) from checkpoint `path` (a directory, or a Hugging Face GPT-2 id
    such as "gpt2-medium", converted once into polygpt's cache), checked against the data's
    tokenizer."""
    ckpt = checkpoints.read(hub.checkpoint(path))
    ours, theirs = tokenizer.to_dict(), dict(ckpt.tokenizer)
    if ours != theirs:
        raise PolygptError(
            f"init_from={path} uses another vocabulary ({_describe(theirs)}) than the data "
            f"({_describe(ours)}): prepare the data with the checkpoint's tokenizer"
        )
    spec = dataclasses.replace(ckpt.spec, dropout=dropout)
    # a quantized checkpoint loads dequantized: training continues from its rounded weights
    return spec, backend.load_model(dataclasses.replace(ckpt.model, spec=spec), "fp32")


def _describe(t: dict) -> str:
    if t.get("type") == "tiktoken":
        return f"BPE {t.get('name')}"
    return f"{t.get('type')}, {t.get('vocab_size')} tokens"
