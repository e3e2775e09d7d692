"""rerank: the core library of the re-ranking service (no Ray in here)."""

__version__ = "0.1.0"
