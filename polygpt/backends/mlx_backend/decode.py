"""The KV-cached decode step in MLX: `GPT.__call__` itself, compiled (mx.compile).

`CompiledStep` traces the model's one forward over `StepCache`s (the fixed-shape form of the
per-layer cache: the new key/value written at a traced position, attention over every slot
with the later slots and the rows' padding masked out), once per batch size, and then runs it
as one fused graph: LayerNorms, GELU, residual adds and the mask are fused and no Python runs
per op. On the 2-core Linux CPU this halved the time per token at batch 1 against the eager
call. Quantized models (nn.quantize) run the same step through their QuantizedLinear layers.
The torch twin is backends/torch_backend/decode.py (there a lean eager step: torch.compile
takes too long to start for sampling).
"""

from __future__ import annotations

import mlx.core as mx

from polygpt.backends.mlx_backend.model import GPT, KVCache


class StepCache:
    """A KVCache for one decode step under mx.compile, whose shapes must not depend on the
    offset: the new key/value is written at a traced position `pos` (an array) and attention
    runs over every slot, with the slots past `pos` (and each row's padding) masked out. Masked
    slots get exactly zero weight, so this equals the KVCache step to float rounding."""

    def __init__(self, keys: mx.array, values: mx.array, pos: mx.array, pad: mx.array):
        self.keys, self.values, self.pos, self.pad = keys, values, pos, pad

    def update_and_fetch(self, k: mx.array, v: mx.array) -> tuple[mx.array, mx.array]:
        self.keys = mx.slice_update(self.keys, k, self.pos.reshape(1), axes=(2,))
        self.values = mx.slice_update(self.values, v, self.pos.reshape(1), axes=(2,))
        return self.keys, self.values

    def positions(self, t: int) -> mx.array:
        return mx.maximum(self.pos - self.pad, 0)[:, None]  # (B, 1)

    def mask(self, t: int) -> mx.array:
        keys = mx.arange(self.keys.shape[2])
        valid = (keys[None, :] <= self.pos) & (keys[None, :] >= self.pad[:, None])  # (B, L)
        return valid[:, None, None, :]  # (B, 1, 1, L)


class CompiledStep:
    """`step(cache, tokens)`: append tokens (B,) to a KVCache list, return logits (B, V)."""

    def __init__(self, model: GPT):
        # the model's weights are constants of the compiled graph: a CompiledStep lives for
        # one generation (a model that trains on gets a new one)
        self.model = model
        self._step = mx.compile(self._graph)

    def _graph(self, tokens, pos, pad, keys, values):
        cache = [StepCache(k, v, pos, pad) for k, v in zip(keys, values)]
        logits = self.model(tokens[:, None], cache)[:, -1]
        return logits, [c.keys for c in cache], [c.values for c in cache]

    def __call__(self, cache: list[KVCache], tokens: mx.array) -> mx.array:
        first = cache[0]
        if first.offset >= first.max_len:
            raise RuntimeError("KV cache is full: the caller must slide the window first")
        logits, keys, values = self._step(
            tokens,
            mx.array(first.offset, dtype=mx.int32),
            first.rows.pad,
            [c.keys for c in cache],
            [c.values for c in cache],
        )
        for c, k, v in zip(cache, keys, values):
            c.keys, c.values, c.offset = k, v, c.offset + 1
        return logits
