"""polygpt: one GPT-2 spec, two frameworks (PyTorch and MLX), one safetensors checkpoint format."""

__version__ = "0.1.0"
