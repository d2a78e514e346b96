"""User-facing errors.

Anything a user can cause (bad file, bad config, missing framework, ...) raises `PolygptError`
with a one-line message; the CLI prints it and exits non-zero instead of showing a traceback.
"""


class PolygptError(Exception):
    """An error caused by user input, reported as one line without a traceback."""

    def __init__(self, message: str = "", *args) -> None:
        # a library's message quoted in ours may span lines: keep the promise of one
        super().__init__(" ".join(str(message).splitlines()), *args)


def short_repr(v: object) -> str:
    """A value quoted in a one-line message, cut to 60 characters."""
    r = repr(v)
    return r if len(r) <= 60 else r[:57] + "..."
