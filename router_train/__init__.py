"""router-train: cascade routing for pools of LLMs.

`CascadeRouter` (serving) is imported lazily: it pulls in the text encoder.
"""

__version__ = "0.1.0"

__all__ = ["CascadeRouter", "Decision", "__version__"]


def __getattr__(name: str):
    if name in ("CascadeRouter", "Decision"):
        from . import router

        return getattr(router, name)
    raise AttributeError(f"module 'router_train' has no attribute {name!r}")
