"""Inference weights prepared once for the machine: packed float, int8 and int4 matmuls.

Decode at GPT-2 scale is a few matrix-vector products per token, bound by reading the weights;
batching pays only when a 16-row product costs about what a 1-row one does. Plain `F.linear`
gives neither on every CPU, so an inference model holds its matrices in the form a maintained
kernel wants, made once (docs/BENCHMARKS.md, "GPT-2 124M and 350M", has the table behind each
choice and `scripts/bench_speed.py matmuls` measures it on the machine at hand):

- fp32 / bf16: oneDNN's packed layout (`mkldnn._reorder_linear_weight` + `_linear_pointwise`,
  what inductor's freezing pass emits), for matrices large enough that a call's fixed cost
  does not outweigh the better reads (`PACK_MIN_BYTES`).
- int8: weights int8 per output channel. Where oneDNN's int8 matmul runs (an x86 CPU with
  VNNI), activations are quantized per row on the fly to uint8 (as llama.cpp's q8_0 dot
  product quantizes its activations), so every row's result is exact integer arithmetic and
  independent of the other rows in the batch; elsewhere torch's weight-only
  `_weight_int8pack_mm` (bf16 activations).
- int4: MLX's affine groups (the checkpoint's own format) repacked for torch's weight-only
  `_weight_int4pack_mm_for_cpu` (bf16 activations): w = scale·q + bias is exactly
  scale·(q − 8) + (bias + 8·scale), torch's (scale, zero) form.

The tied head is prepared like any Linear; the embedding lookup keeps what it needs (the float
table for packed floats; int8 rows and their scales, or the checkpoint's 4-bit groups, for the
quantized models), so a quantized model holds no float copy of its matrices.

Prepared weights never go stale: a model that may still train is prepared as a copy that
shares its other tensors, remade when any parameter has changed (`for_generation`); a model
loaded for inference is prepared in place (`prepare`).
"""

from __future__ import annotations

import copy
import functools
import weakref

import torch
import torch.nn as nn
import torch.nn.functional as F

import polygpt.backends.torch_backend.quantize as quantize

# Float Linear weights smaller than this are stored transposed (TransposedLinear), larger ones
# packed: oneDNN's per-call cost outweighs its faster reads at the reference model's matrices.
PACK_MIN_BYTES = 1 << 20
INT4_ROWS = 64  # torch's CPU int4 layout packs blocks of 64 output rows: pad and convert by those


def kernels(device: str = "cpu") -> dict[str, str]:
    """The kernel each precision's matmuls run on this machine (for `info`, `bench`,
    `sample --stats`): the fastest that exists here, or the fallback taken."""
    if device != "cpu":
        return {"fp32": "aten", "bf16": "aten", "fp16": "aten"}
    packed = f"onednn-packed (matrices of {PACK_MIN_BYTES >> 20} MB or more)"
    packed = packed if available("packed") else "aten"
    return {
        "fp32": packed,
        "bf16": packed,
        "fp16": "aten",
        "int8": {
            "onednn-int8": "onednn-int8 (per-row activations)",
            "int8pack": "int8pack (weight-only, bf16 activations)",
        }.get(_int8_kernel(), "dequantized fp32 (no int8 kernel here)"),
        "int4": "int4pack (weight-only, bf16 activations)"
        if available("int4pack")
        else "dequantized fp32 (no int4 kernel here)",
    }


@functools.cache
def available(kernel: str) -> bool:
    """Whether `kernel` runs in this torch build on this CPU, tried once on a tiny matrix (a
    build or a CPU without it raises, and the next kernel down is taken)."""
    # (fixed values: a probe must not draw from torch's global random stream)
    w, x = torch.linspace(-1, 1, 64 * 64).reshape(64, 64), torch.ones(2, 64)
    q, s = int8_weights(w)
    try:
        if kernel == "packed":
            p = torch.ops.mkldnn._reorder_linear_weight(w)
            torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [], "")
        elif kernel == "onednn-int8":
            # oneDNN's u8·s8 products are exact with VNNI; without it x86 sums pairs in int16,
            # which can saturate on uint8 activations (why fbgemm had reduce_range)
            if not torch.cpu._is_vnni_supported():
                return False
            _qlinear(x, torch.ops.onednn.qlinear_prepack(q, None), s, torch.zeros(64).long())
        elif kernel == "int8pack":
            torch.ops.aten._weight_int8pack_mm(x.bfloat16(), q, s.bfloat16())
        elif kernel == "int4pack":
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.int().abs() % 16, 1)
            sz = torch.zeros(1, 64, 2, dtype=torch.bfloat16)
            torch.ops.aten._weight_int4pack_mm_for_cpu(x.bfloat16(), packed, 64, sz)
        return torch.backends.mkldnn.is_available() or kernel not in ("packed", "onednn-int8")
    except (RuntimeError, NotImplementedError, AttributeError):
        return False


def _int8_kernel() -> str:
    return next((k for k in ("onednn-int8", "int8pack") if available(k)), "float")


class Projection(nn.Module):
    """A prepared Linear: `forward(x)` is x·Wᵀ + b; `add_to(x, h)` is x += h·Wᵀ + b, the
    residual add of the model's blocks (model.add_linear), in place: prepared models are for
    inference only, and the residual stream's old value is not read again."""

    def add_to(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return x.add_(self.forward(h))


class TransposedLinear(Projection):
    """A small float Linear stored as Wᵀ (in, out), contiguous: a few-row product reads it in
    order, and the residual add fuses into the product (`torch.addmm(x, h, Wᵀ)`), where
    per-call cost, not reading the weights, sets the speed (docs/BENCHMARKS.md, "Figures
    behind the code")."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("wt", weight.detach().t().contiguous(), False)
        self.bias = None if bias is None else bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2:
            return self.forward(x.reshape(-1, self.in_features)).view(*x.shape[:-1], -1)
        wt = self._buffers["wt"]  # (a dict read: see model.py on nn.Module's __getattr__)
        return torch.mm(x, wt) if self.bias is None else torch.addmm(self.bias, x, wt)

    def add_to(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        x.addmm_(h, self._buffers["wt"])
        return x if self.bias is None else x.add_(self.bias)


class PackedLinear(Projection):
    """A float Linear in oneDNN's packed layout (fp32 or bf16, as the weight is)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        w = weight.detach()
        self.register_buffer("packed", torch.ops.mkldnn._reorder_linear_weight(w), False)
        self.bias = None if bias is None else bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


class Int8Linear(Projection):
    """y = x·(s ⊙ q)ᵀ + b with q int8 (out, in) and one scale per output channel."""

    def __init__(self, q: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.kernel = _int8_kernel()
        if self.kernel == "onednn-int8":
            self.register_buffer("packed", torch.ops.onednn.qlinear_prepack(q, None), False)
            self.register_buffer("zeros", torch.zeros(q.shape[0], dtype=torch.int64), False)
            self.register_buffer("scales", scales.float(), False)
        elif self.kernel == "int8pack":
            self.register_buffer("packed", q, False)
            self.register_buffer("scales", scales.to(torch.bfloat16), False)
        else:  # no int8 kernel in this build: the rounded weights in fp32
            self.register_buffer("packed", q.float() * scales.float()[:, None], False)
        self.bias = None if bias is None else bias.detach().float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1]).float()
        if self.kernel == "onednn-int8":
            y = _qlinear(x, self.packed, self.scales, self.zeros, self.bias)
        elif self.kernel == "int8pack":
            y = torch.ops.aten._weight_int8pack_mm(x.bfloat16(), self.packed, self.scales).float()
            y = y if self.bias is None else y.add_(self.bias)
        else:
            y = F.linear(x, self.packed, self.bias)
        return y.view(*shape[:-1], self.out_features)


def _qlinear(x, packed, scales, zeros, bias=None) -> torch.Tensor:
    """x (rows, in) fp32 through oneDNN's u8·s8 matmul, each row quantized by itself: x ≈
    a·(u − 128) with a = max|x|/127; at x_scale 1 the kernel returns Σ(u − 128)·s·q, which
    the row's a multiplies after (so no row's result depends on another's)."""
    a = torch.linalg.vector_norm(x, float("inf"), dim=1, keepdim=True).clamp_(min=1e-12)
    a = a.div_(127.0)
    u = torch.div(x, a).round_().add_(128.0).to(torch.uint8)
    y = torch.ops.onednn.qlinear_pointwise(
        u, 1.0, 128, packed, scales, zeros, None, 1.0, 0, torch.float32, "none", [], ""
    )
    return y.mul_(a) if bias is None else torch.addcmul(bias, y, a)


class Int4Linear(Projection):
    """MLX's affine 4-bit groups on torch's int4 kernel (bf16 activations, fp32 out)."""

    def __init__(self, packed, qscale_zeros, group_size: int, out_features: int, bias):
        super().__init__()
        self.register_buffer("packed", packed, False)
        self.register_buffer("qscale_zeros", qscale_zeros, False)
        self.group_size, self.out_features = group_size, out_features
        self.bias = None if bias is None else bias.detach().float()

    @classmethod
    def from_affine(cls, packed, scales, biases, group_size: int, bias=None) -> nn.Module:
        """From the checkpoint's tensors (packed uint32 (out, in/8), scales and biases
        (out, in/group)), 64 rows at a time: nothing float or int32 is ever whole. Where this
        torch has no int4 kernel: the rounded weights in fp32, a plain Linear."""
        if not available("int4pack"):
            w = quantize.affine_dequantize(packed, scales.float(), biases.float(), 4, group_size)
            linear = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, device="meta")
            linear.weight = nn.Parameter(w, requires_grad=False)
            linear.bias = None if bias is None else nn.Parameter(bias.detach().float(), False)
            return linear
        rows = packed.shape[0]
        pad = -rows % INT4_ROWS  # zero rows: torch's layout wants whole 64-row blocks
        out = torch.empty(rows + pad, packed.shape[1] * 4, dtype=torch.uint8)
        for a in range(0, rows + pad, INT4_ROWS):
            q = _nibbles(packed[a : a + INT4_ROWS])
            if q.shape[0] < INT4_ROWS:
                q = F.pad(q, (0, 0, 0, INT4_ROWS - q.shape[0]))
            out[a : a + INT4_ROWS] = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        sz = torch.zeros(scales.shape[1], rows + pad, 2, dtype=torch.bfloat16)
        sz[:, :rows, 0] = scales.t()  # (in/group, out, 2): scale, zero = bias + 8·scale
        sz[:, :rows, 1] = (biases.float() + 8 * scales.float()).t()
        return cls(out, sz, group_size, rows, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x.reshape(-1, shape[-1]).bfloat16(), self.packed, self.group_size, self.qscale_zeros
        )
        y = y[:, : self.out_features].float()
        if self.bias is not None:
            y = y.add_(self.bias)
        return y.view(*shape[:-1], self.out_features)


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    """uint32 words of 4-bit values, low bits first -> int32 (rows, in)."""
    b = packed.contiguous().view(torch.uint8)
    return torch.stack((b & 0x0F, b >> 4), dim=-1).reshape(packed.shape[0], -1).to(torch.int32)


class Embedding(nn.Module):
    """The token table of a prepared model: `forward(idx)` looks rows up, `as_linear(x)` is
    the tied head (mlx-lm's `wte.as_linear`) on its prepared matrix."""

    def __init__(self, lookup, head: nn.Module):
        super().__init__()
        self.lookup, self.head = lookup, head

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.lookup(idx)

    def as_linear(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x)


class _FloatRows(nn.Module):
    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = weight

    def forward(self, idx):
        return F.embedding(idx, self.weight)


class _Int8Rows(nn.Module):
    def __init__(self, q: torch.Tensor, scales: torch.Tensor):
        super().__init__()
        self.register_buffer("q", q, False)
        self.register_buffer("scales", scales.float()[:, None], False)

    def forward(self, idx):
        return self.q[idx].float().mul_(self.scales[idx])


class _AffineRows(nn.Module):
    """Rows of the checkpoint's affine-quantized table, dequantized as they are looked up."""

    def __init__(self, packed, scales, biases, bits: int, group_size: int):
        super().__init__()
        for name, t in (("packed", packed), ("scales", scales), ("biases", biases)):
            self.register_buffer(name, t, False)
        self.bits, self.group_size = bits, group_size

    def forward(self, idx):
        flat = idx.reshape(-1)
        rows = quantize.affine_dequantize(
            self.packed[flat], self.scales[flat], self.biases[flat], self.bits, self.group_size
        )
        return rows.float().view(*idx.shape, -1)


# ---- building prepared models -------------------------------------------------------------


def int8_weights(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) float -> int8 per output channel (symmetric) and its scales (out,)."""
    scales = w.float().abs().amax(1).clamp_(min=1e-12) / 127.0
    return torch.round(w.float() / scales[:, None]).to(torch.int8), scales


def int8_rows_of(read, rows: int, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 per channel of a matrix read `chunk` rows at a time by `read(a, b)` (a float
    block): the float matrix is never whole."""
    q, s = None, None
    for a in range(0, rows, chunk):
        qa, sa = int8_weights(read(a, min(rows, a + chunk)))
        if q is None:
            q, s = torch.empty(rows, qa.shape[1], dtype=torch.int8), torch.empty(rows)
        q[a : a + len(qa)], s[a : a + len(qa)] = qa, sa
    return q, s


def quantize_model(model: nn.Module, precision: str, group_size: int) -> nn.Module:
    """A float model's matrices quantized in place to int8 / int4 (the load path's result,
    from weights already in memory)."""
    model = model.float()
    for name, m in list(model.named_modules()):
        if type(m) is nn.Linear:
            swap(model, name, _quantized(m.weight.detach(), m.bias, precision, group_size))
    tr = model.transformer
    tr.wte = _quantized(tr.wte.weight.detach(), None, precision, group_size, table=True)
    model.prepared = True
    return model


def _quantized(w: torch.Tensor, bias, precision: str, group_size: int, table=False) -> nn.Module:
    if precision == "int8":
        return int8_matrix(*int8_weights(w), bias, table)
    return int4_matrix(*quantize.affine_quantize(w, 4, group_size), group_size, bias, table)


def int8_matrix(q: torch.Tensor, scales: torch.Tensor, bias, table: bool) -> nn.Module:
    """An int8 matrix's module; the tied token `table`: int8 rows to look up, and the head."""
    if table:
        return Embedding(_Int8Rows(q, scales), Int8Linear(q, scales, None))
    return Int8Linear(q, scales, bias)


def int4_matrix(packed, scales, biases, group_size: int, bias, table: bool) -> nn.Module:
    """A 4-bit matrix's module from MLX's affine groups; the tied token `table`: its groups
    to look rows up in, and the head."""
    head = Int4Linear.from_affine(packed, scales, biases, group_size, bias)
    if table:
        return Embedding(_AffineRows(packed, scales, biases, 4, group_size), head)
    return head


class _AsLinear:
    """The token table seen as the head's Linear, for `packable`."""

    def __init__(self, weight: torch.Tensor):
        self.weight = weight


def packable(m) -> bool:
    return (
        type(m) in (nn.Linear, _AsLinear)
        and m.weight.device.type == "cpu"
        and m.weight.dtype in (torch.float32, torch.bfloat16)
        and m.weight.nbytes >= PACK_MIN_BYTES
        and available("packed")
    )


def transposable(m) -> bool:
    """A float Linear on the CPU too small to pack: kept as Wᵀ (TransposedLinear)."""
    return (
        type(m) is nn.Linear
        and m.weight.device.type == "cpu"
        and m.weight.is_floating_point()
        and m.weight.nbytes < PACK_MIN_BYTES
    )


def prepare(model: nn.Module) -> nn.Module:
    """Pack the float model's large matrices for this machine and transpose its small ones,
    in place (the model is for inference from here: its prepared Linear layers no longer hold
    trainable weights)."""
    if getattr(model, "prepared", False):
        return model
    for name, m in list(model.named_modules()):
        if packable(m):
            swap(model, name, PackedLinear(m.weight, m.bias))
        elif transposable(m):
            swap(model, name, TransposedLinear(m.weight, m.bias))
    tr = model.transformer
    if isinstance(tr.wte, nn.Embedding) and packable(_AsLinear(tr.wte.weight)):
        tr.wte = Embedding(_FloatRows(tr.wte.weight), PackedLinear(tr.wte.weight, None))
    model.prepared = True
    return model


def swap(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` where the submodule `name` is."""
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, new)


_COPIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> (stamp, copy)


def weights_changed(model: nn.Module) -> None:
    """Say that the model's weights were updated (the backend's train step does, after the
    optimizer: a fused optimizer's kernels leave torch's version counters as they were)."""
    model.weight_updates = getattr(model, "weight_updates", 0) + 1


def _stamp(model: nn.Module) -> tuple:
    """Changes whenever a parameter is replaced, written in place (torch's version counter)
    or updated by a train step."""
    versions = tuple((id(p), p._version) for p in model.parameters())
    return getattr(model, "weight_updates", 0), versions


def for_generation(model: nn.Module) -> nn.Module:
    """The model to generate with: a prepared model as it is; else a prepared copy sharing
    the model's tensors, remade whenever the model's weights have changed."""
    if getattr(model, "prepared", False) or not any(
        packable(m) or transposable(m) for m in model.modules()
    ):
        return model
    stamp = _stamp(model)
    got = _COPIES.get(model)
    if got is None or got[0] != stamp:
        got = _COPIES[model] = (stamp, prepare(_structure_copy(model)))
    return got[1]


def _structure_copy(module: nn.Module) -> nn.Module:
    """A new module tree over the same parameter tensors (no weight is copied)."""
    new = copy.copy(module)
    new._parameters = dict(module._parameters)
    new._buffers = dict(module._buffers)
    new._modules = {k: v if v is None else _structure_copy(v) for k, v in module._modules.items()}
    return new
