"""The engine: plain Python + PyTorch + transformers; no orchestration or tracking imports."""

__version__ = "0.1.0"
