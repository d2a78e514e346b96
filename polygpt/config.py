"""Typed run configuration: TOML files plus `key=value` overrides, never exec().

A run config has four sections, each a dataclass: [model] (a ModelSpec minus the vocabulary,
which comes from the data), [data], [train] and [sample]. Overrides name a field either fully
(`train.max_iters=500`) or by its bare name when that is unambiguous (`max_iters=500`); values
are parsed as TOML literals and type-checked against the field, so a typo is a one-line error
naming the key instead of a silently ignored setting.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from polygpt.errors import PolygptError
from polygpt.spec import ModelSpec


@dataclass
class ModelConfig:
    vocab_size: int = 0  # 0: take it from the prepared data's tokenizer
    block_size: int = 64
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    bias: bool = False
    dropout: float = 0.0
    activation: str = "gelu_tanh"

    def to_spec(self, vocab_size: int | None = None) -> ModelSpec:
        d = dataclasses.asdict(self)
        d["vocab_size"] = self.vocab_size or vocab_size or 0
        return ModelSpec(**d)


@dataclass
class DataConfig:
    dir: str = "data/shakespeare_char"  # holds train.bin, val.bin, tokenizer.json


@dataclass
class TrainConfig:
    out: str = "weights/shakespeare_char"
    backend: str = "torch"
    device: str = "auto"
    # auto (bf16 where the device computes it natively: Backend.auto_dtype, else fp32), fp32,
    # or bf16 (autocast / bf16 compute, fp32 master weights)
    dtype: str = "auto"
    compile: bool = False  # torch.compile / mx.compile of the train step
    threads: int = 0  # torch CPU threads; 0: pick 1 or all by timing steps (float-level changes)
    seed: int = 1337
    batch_size: int = 12
    grad_accum: int = 1
    max_iters: int = 2000
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_iters: int = 100
    lr_decay_iters: int = 2000
    beta1: float = 0.9
    beta2: float = 0.99
    weight_decay: float = 0.1
    grad_clip: float = 1.0  # 0 disables clipping
    eval_interval: int = 250
    eval_iters: int = 200
    eval_dtype: str = "auto"  # the loss estimates' forward: auto (as the training step), fp32, bf16
    log_interval: int = 10
    save_checkpoints: bool = True  # save at every eval (and at the end)
    init_from: str = ""  # a checkpoint to fine-tune: its spec and weights, a fresh optimizer


@dataclass
class SampleConfig:
    prompt: str = "\n"
    max_new_tokens: int = 500
    temperature: float = 0.8
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    seed: int = 1337
    num_samples: int = 1


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def set(self, section: str, key: str, value: Any) -> None:
        """Set one key, type-checked (a one-line PolygptError naming a bad key or value)."""
        _apply(self, section, key, value)


_SECTION_TYPES = {
    "model": ModelConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "sample": SampleConfig,
}


def _coerce(key: str, value: Any, typ: Any) -> Any:
    is_bool = isinstance(value, bool)  # bool is an int subclass: keep true/false out of numbers
    if typ is bool and is_bool or typ is str and isinstance(value, str):
        return value
    if typ is int and isinstance(value, int) and not is_bool:
        return value
    if typ is float and isinstance(value, (int, float)) and not is_bool:
        return float(value)
    tname = getattr(typ, "__name__", str(typ))
    raise PolygptError(f"config key {key!r} expects {tname}, got {value!r}")


def _apply(cfg: RunConfig, section: str, key: str, value: Any) -> None:
    if section not in _SECTION_TYPES:
        raise PolygptError(
            f"unknown config section {section!r} (expected one of {', '.join(_SECTION_TYPES)})"
        )
    obj = getattr(cfg, section)
    hints = get_type_hints(type(obj))
    if key not in hints:
        raise PolygptError(f"unknown config key {section}.{key}")
    setattr(obj, key, _coerce(f"{section}.{key}", value, hints[key]))


# Keys earlier versions had and that never changed a run (read from old files, then dropped),
# with the value they always held: sweep.fingerprint hashes them, so old runs keep their hash.
REMOVED_KEYS = {("data", "dataset"): "shakespeare_char"}


def from_dict(d: dict, cfg: RunConfig | None = None) -> RunConfig:
    cfg = cfg or RunConfig()
    for section, values in d.items():
        if not isinstance(values, dict):
            raise PolygptError(f"config key {section!r} must be a [section] table")
        for key, value in values.items():
            if (section, key) not in REMOVED_KEYS:
                _apply(cfg, section, key, value)
    return cfg


def read_toml(path: str | Path, what: str = "config") -> dict:
    """Parse a TOML file; a missing or malformed file is a one-line PolygptError."""
    p = Path(path)
    if p.exists() and not p.is_file():  # a directory, or /dev/zero named in a sweep file
        raise PolygptError(f"{what} {p} is not a file")
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise PolygptError(f"cannot read {what} {p}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise PolygptError(f"{what} {p} is not UTF-8 text: {e}") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise PolygptError(f"{what} {p} is not valid TOML: {e}") from None


def load(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Load a TOML run config (or the defaults when `path` is None) and apply overrides."""
    cfg = RunConfig()
    if path is not None:
        from_dict(read_toml(path), cfg)
    for item in overrides:
        apply_override(cfg, item)
    return cfg


def apply_override(cfg: RunConfig, item: str) -> None:
    cfg.set(*parse_override(item))


def parse_override(item: str) -> tuple[str, str, Any]:
    """`key=value` -> (section, key, value); a bare key must belong to one section only."""
    if "=" not in item:
        raise PolygptError(f"override {item!r} must look like key=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    value = _parse_value(raw.strip())
    if "." in key:
        section, name = key.split(".", 1)
    else:
        owners = [s for s, t in _SECTION_TYPES.items() if key in get_type_hints(t)]
        if not owners:
            raise PolygptError(f"unknown config key {key!r}")
        if len(owners) > 1:
            opts = " or ".join(f"{s}.{key}" for s in owners)
            raise PolygptError(f"config key {key!r} is ambiguous: write {opts}")
        section, name = owners[0], key
    return section, name, value


def _parse_value(raw: str) -> Any:
    """A TOML literal (1e-3, true, "text"); anything unparseable is taken as a bare string."""
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw
