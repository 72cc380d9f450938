"""A fitted routing strategy: the mode, the depth cap and the calibrated multipliers, as plain data."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

MODES = ("routing", "threshold_cascade", "cascade", "cascade_routing")
"""routing: one model per query; threshold_cascade: run models in cost order while the last answer's
post-hoc quality is below `1 - θ_t`; cascade: the paper's optimal cascade (prefixes of the cost order);
cascade_routing: any supermodel containing the run set."""


@dataclass(frozen=True)
class Strategy:
    """What the kernel needs to decide for one budget.

    `lambdas[t]` is the cost multiplier at step t (t models run), `thresholds[t-1]` the threshold θ_t
    of the thresholding cascade after t models; `gamma` the probability of breaking ties towards the
    most expensive supermodel (ties towards the cheapest otherwise); `sigma_scale` multiplies the
    estimators' Σ (0: supermodels are valued by the max of point estimates, so cascade routing
    behaves as routing), a calibrated hedge against over-confident uncertainty.
    """

    mode: str
    max_depth: int
    lambdas: tuple[float, ...] = ()
    thresholds: tuple[float, ...] = ()
    gamma: float = 0.0
    force_order: bool = False
    sigma_scale: float = 1.0
    budget: float | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"strategy.mode must be one of {MODES}, got {self.mode!r}")
        if self.max_depth < 1:
            raise ValueError(f"strategy.max_depth must be >= 1, got {self.max_depth}")
        if self.mode == "routing" and self.max_depth != 1:
            raise ValueError("strategy.max_depth must be 1 for mode 'routing' (one model per query)")
        object.__setattr__(self, "lambdas", tuple(float(x) for x in self.lambdas))
        object.__setattr__(self, "thresholds", tuple(float(x) for x in self.thresholds))
        if self.mode == "threshold_cascade":
            if len(self.thresholds) != self.max_depth - 1:
                raise ValueError(
                    f"strategy.thresholds needs max_depth - 1 = {self.max_depth - 1} values, got {len(self.thresholds)}"
                )
        elif len(self.lambdas) != self.max_depth:
            raise ValueError(f"strategy.lambdas needs max_depth = {self.max_depth} values, got {len(self.lambdas)}")
        for name, values in (("lambdas", self.lambdas), ("thresholds", self.thresholds)):
            if any(not math.isfinite(v) for v in values):
                raise ValueError(f"strategy.{name} must be finite, got {values}")
        if any(v < 0 for v in self.lambdas):
            raise ValueError(f"strategy.lambdas must be >= 0, got {self.lambdas}")
        if not (math.isfinite(self.sigma_scale) and self.sigma_scale >= 0):
            raise ValueError(f"strategy.sigma_scale must be finite and >= 0, got {self.sigma_scale}")
        if not 0.0 <= self.gamma <= 1.0:
            raise ValueError(f"strategy.gamma must be in [0, 1], got {self.gamma}")

    def replace(self, **changes) -> "Strategy":
        """A copy with some fields changed."""
        data = asdict(self)
        data.update(changes)
        return Strategy(**data)

    def to_dict(self) -> dict:
        return asdict(self) | {"lambdas": list(self.lambdas), "thresholds": list(self.thresholds)}

    @classmethod
    def from_dict(cls, data: dict) -> "Strategy":
        return cls(**data)
