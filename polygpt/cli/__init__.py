"""The `polygpt` command line: parse, call a workflow, format. No model code here.

app.py holds the click group and the shared options; one module per command family registers
its commands on it (training, generation, measuring, files); views.py draws the events that
workflows report (they print nothing). A bar is drawn only when stderr is a terminal.
"""

from polygpt.cli import files, generation, measuring, training  # noqa: F401 - registers commands
from polygpt.cli.app import main

__all__ = ["main"]
