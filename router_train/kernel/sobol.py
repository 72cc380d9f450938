"""Shared quasi-Monte-Carlo normal samples: scrambled Sobol points mapped through the normal quantile.

Each column is centred (its sample mean subtracted): a model's samples then average exactly to its
estimate q̂, so a one-model supermodel is never valued above or below q̂ by sampling error (with 100
points, not a power of 2, the raw columns' means reach ±0.01).
"""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=32)
def _normal_samples_cpu(n_samples: int, k: int, seed: int) -> torch.Tensor:
    engine = torch.quasirandom.SobolEngine(dimension=k, scramble=True, seed=seed)
    u = engine.draw(n_samples, dtype=torch.float64)
    # Keep the quantile finite: a scrambled point is never exactly 0 or 1, but guard anyway.
    u = u.clamp(1e-12, 1.0 - 1e-12)
    z = torch.special.ndtri(u)
    return z - z.mean(0)


def normal_samples(
    n_samples: int,
    k: int,
    seed: int = 0,
    *,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Return `(n_samples, k)` standard-normal QMC points with zero column means, identical for the same
    (n_samples, k, seed)."""
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    if k < 1:
        raise ValueError(f"k (number of models) must be >= 1, got {k}")
    return _normal_samples_cpu(int(n_samples), int(k), int(seed)).to(device=device, dtype=dtype)
