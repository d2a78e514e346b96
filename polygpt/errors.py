"""User-facing errors.

Anything a user can cause (bad file, bad config, missing framework, ...) raises `PolygptError`
with a one-line message; the CLI prints it and exits non-zero instead of showing a traceback.
"""


class PolygptError(Exception):
    """An error caused by user input, reported as one line without a traceback."""
