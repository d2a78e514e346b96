"""Streaming text with stop strings, written once for `sample`, `serve` and the engine.

A row's tokens become text incrementally: `TextStream` finds stop strings and streams only text
that is final; `cut_at_stop` cuts a finished text before its first stop string.
"""

from __future__ import annotations

from collections.abc import Callable


def cut_at_stop(text: str, stops: list[str]) -> str:
    """`text` up to the first occurrence of any stop string (a BPE token may straddle one)."""
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return text[: min(hits)] if hits else text


class TextStream:
    """Incremental text of one row: finds stop strings and streams only text that is final.

    Text that could still become the start of a stop string, and a trailing incomplete UTF-8
    character (byte-level BPE), is held back until the next tokens decide it.
    """

    def __init__(
        self,
        decode: Callable[[list[int]], str],
        stops: list[str],
        emit: Callable[[str], None] | None,
    ):
        self.decode, self.stops, self.emit = decode, [s for s in stops if s], emit
        self.ids: list[int] = []
        self.anchor = 0  # ids[anchor:] decode to text of which `skip` chars are already out
        self.skip = 0
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.kept: int | None = None  # number of ids kept once a stop string was hit

    def push(self, token: int) -> bool:
        """Add a token; True when the row hit a stop string (and is finished)."""
        self.ids.append(token)
        pending = self.decode(self.ids[self.anchor :])
        new = pending[self.skip :]
        hits = [i for i in (new.find(s) for s in self.stops) if i >= 0]
        if hits:
            self._out(new[: min(hits)])
            self.kept = self._tokens_before_stop()
            return True
        safe = len(new) - self._held(new)
        if safe > 0:
            self._out(new[:safe])
            self.skip += safe
        if self.skip == len(pending):  # everything decoded so far is out: restart the window
            self.anchor, self.skip = len(self.ids), 0
        elif len(self.ids) - self.anchor > 2 * self.hold + 8:
            self._advance(pending)
        return False

    def _held(self, new: str) -> int:
        n = 0
        if new.endswith("\ufffd"):  # an incomplete multi-byte character: wait for its bytes
            n = len(new) - len(new.rstrip("\ufffd"))
            new = new[:-n]
        for k in range(min(self.hold, len(new)), 0, -1):
            if any(s.startswith(new[-k:]) for s in self.stops):
                return n + k
        return n

    def _advance(self, pending: str) -> None:
        """Drop leading tokens that are fully streamed out of the decode window."""
        while self.anchor < len(self.ids) - 1:
            rest = self.decode(self.ids[self.anchor + 1 :])
            cut = len(pending) - len(rest)
            if cut > self.skip or pending[cut:] != rest:
                return
            self.anchor, self.skip, pending = self.anchor + 1, self.skip - cut, rest

    def _out(self, text: str) -> None:
        if text and self.emit is not None:
            self.emit(text)

    def _tokens_before_stop(self) -> int:
        """How many tokens precede the first stop string entirely (a BPE token may straddle)."""
        text = self.decode(self.ids)
        cut = min(text.find(s) for s in self.stops if s in text)
        n = len(self.ids)
        while n and len(self.decode(self.ids[:n])) > cut:
            n -= 1
        return n
