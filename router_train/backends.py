"""The backends file: where each model of the pool is served and what its calls cost.

A YAML file (`configs/backends.example.yaml`) names, per model of the checkpoint, an OpenAI-compatible
endpoint (vLLM, TGI, llama.cpp server, OpenAI, ...), the model id it serves, the environment variable
holding its API key, its prices in USD per million input and output tokens, a timeout and a limit on
calls in flight; `defaults` fills what a model leaves out, and `extractor` says how the final answer is
read from a response (the same for collecting tables and for serving, so features match). The gateway
and the collector load it with `load_backends`, which fails at start-up on any mistake, including
model names that differ from the checkpoint's.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import yaml

from .dataclass_dicts import from_dict

EXTRACTORS = ("choice", "number", "last_line", "whole")
"""How the final answer is read from a response (router_train.live): the multiple-choice letter, the last
number, the last non-empty line, or the whole text."""


@dataclass
class BackendSettings:
    """Per-model settings; every field may also be given once under `defaults`."""

    base_url: str | None = None  # OpenAI-compatible API root, e.g. http://127.0.0.1:8001/v1
    model: str | None = None  # the model id the endpoint serves (default: the pool's name for it)
    api_key_env: str | None = None  # environment variable holding the API key; None: no key (local servers)
    price_in: float | None = None  # USD per million input (prompt) tokens
    price_out: float | None = None  # USD per million output (completion) tokens
    timeout: float | None = None  # seconds per call
    concurrency: int | None = None  # calls in flight to this model at most
    max_tokens: int | None = None  # completion length cap sent with every call
    temperature: float | None = None  # sampling temperature sent with every call


@dataclass
class BackendsFile:
    """The YAML document as written."""

    models: dict | None = None
    defaults: BackendSettings | None = None
    extractor: str = "last_line"


@dataclass(frozen=True)
class Backend:
    """One model of the pool, fully resolved."""

    name: str  # the model's name in the checkpoint and routing tables
    base_url: str
    model: str
    api_key_env: str | None
    price_in: float
    price_out: float
    timeout: float
    concurrency: int
    max_tokens: int
    temperature: float

    def api_key(self) -> str:
        """The API key from the environment ("EMPTY" for endpoints without one, as vLLM expects)."""
        return os.environ[self.api_key_env] if self.api_key_env else "EMPTY"

    def cost(self, tokens_in: int, tokens_out: int) -> float:
        """USD of one call."""
        return (tokens_in * self.price_in + tokens_out * self.price_out) / 1e6


@dataclass(frozen=True)
class Backends:
    """Every model of the pool, in the file's order, and the answer extractor."""

    models: dict[str, Backend]
    extractor: str

    @property
    def names(self) -> list[str]:
        return list(self.models)


DEFAULTS = BackendSettings(timeout=60.0, concurrency=32, max_tokens=512, temperature=0.0)


def load_backends(path: str | os.PathLike, models: list[str] | None = None) -> Backends:
    """Read and check a backends file; with `models` (the checkpoint's), its models must be exactly those."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"backends file {path} not found; start from configs/backends.example.yaml")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"{path} is not valid YAML: {e}") from None
    raw = from_dict(BackendsFile, data or {}, where=str(path))
    if raw.extractor not in EXTRACTORS:
        raise ValueError(f"{path}: extractor must be one of {list(EXTRACTORS)}, got {raw.extractor!r}")
    if not isinstance(raw.models, dict) or not raw.models:
        raise ValueError(f"{path}: 'models' must map each model name of the pool to its settings")
    defaults = raw.defaults or BackendSettings()
    pool = {}
    for name, settings in raw.models.items():
        where = f"{path}: models.{name}"
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"{path}: model names must be non-empty strings, got {name!r}")
        pool[name] = _resolve(name, from_dict(BackendSettings, settings or {}, where=where), defaults, where)
    if models is not None and set(models) != set(pool):
        missing, extra = sorted(set(models) - set(pool)), sorted(set(pool) - set(models))
        raise ValueError(
            f"{path} does not list the checkpoint's models: missing {missing}, not in the checkpoint {extra}; "
            f"the checkpoint routes between {list(models)}: name each of them under 'models'"
        )
    return Backends(models=pool, extractor=raw.extractor)


def _resolve(name: str, own: BackendSettings, defaults: BackendSettings, where: str) -> Backend:
    """One model's settings over the file's defaults over DEFAULTS, checked."""

    def pick(field: str):
        for layer in (own, defaults, DEFAULTS):
            if getattr(layer, field) is not None:
                return getattr(layer, field)
        return None

    values = {field: pick(field) for field in BackendSettings.__dataclass_fields__}
    url = urlparse(values["base_url"] or "")
    if url.scheme not in ("http", "https") or not url.netloc:
        raise ValueError(f"{where}.base_url must be an http(s) URL such as http://127.0.0.1:8001/v1, "
                         f"got {values['base_url']!r}")
    for field in ("price_in", "price_out"):
        if values[field] is None or not math.isfinite(values[field]) or values[field] < 0:
            raise ValueError(f"{where}.{field} must be a price >= 0 in USD per million tokens, got {values[field]!r}")
    if not values["timeout"] > 0 or not math.isfinite(values["timeout"]):
        raise ValueError(f"{where}.timeout must be a positive number of seconds, got {values['timeout']!r}")
    for field in ("concurrency", "max_tokens"):
        if values[field] < 1:
            raise ValueError(f"{where}.{field} must be an integer >= 1, got {values[field]!r}")
    if not 0 <= values["temperature"] <= 2:
        raise ValueError(f"{where}.temperature must be in [0, 2], got {values['temperature']!r}")
    key = values["api_key_env"]
    if key is not None and not os.environ.get(key):
        raise ValueError(f"{where}.api_key_env: the environment variable {key} is not set; export it, or set "
                         "api_key_env: null for an endpoint without a key")
    return Backend(name=name, base_url=values["base_url"].rstrip("/"), model=values["model"] or name,
                   api_key_env=key, price_in=float(values["price_in"]), price_out=float(values["price_out"]),
                   timeout=float(values["timeout"]), concurrency=int(values["concurrency"]),
                   max_tokens=int(values["max_tokens"]), temperature=float(values["temperature"]))
