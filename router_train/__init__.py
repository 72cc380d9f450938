"""router-train: cascade routing for pools of LLMs."""

__version__ = "0.1.0"
