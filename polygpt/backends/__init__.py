"""Framework backends behind one protocol (see `base.py`)."""

from polygpt.backends.base import (
    Backend,
    available_backends,
    backend_class,
    get_backend,
    known_backends,
)

__all__ = ["Backend", "available_backends", "backend_class", "get_backend", "known_backends"]
