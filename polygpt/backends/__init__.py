"""Framework backends behind one protocol (see `base.py`)."""

from polygpt.backends.base import (
    Backend,
    available_backends,
    backend_class,
    backend_module,
    entry,
    get_backend,
    known_backends,
    launcher_backend,
)

__all__ = [
    "Backend",
    "available_backends",
    "backend_class",
    "backend_module",
    "entry",
    "get_backend",
    "known_backends",
    "launcher_backend",
]
