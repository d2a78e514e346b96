"""The PyTorch backend (CPU, CUDA, Apple MPS)."""

from polygpt.backends.torch_backend.backend import Backend

__all__ = ["Backend"]
