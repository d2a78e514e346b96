"""The MLX backend (Apple Silicon GPU; CPU, and CUDA, on Linux)."""

from polygpt.backends.mlx_backend.backend import Backend

__all__ = ["Backend"]
