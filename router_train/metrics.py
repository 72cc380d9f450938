"""Quality–cost evaluation: curve points, the linear-interpolation hull, AUC and paired bootstrap intervals.

A method's curve has one `(mean cost, mean quality)` point per budget. Its AUC (method.md, "Evaluation")
is the trapezoid area over `[c_min, c_max]` (cheapest and most expensive single model's mean test cost)
divided by `c_max - c_min`, ×100: the curve starts from `(c_min, worst single model's quality)` unless a
point lies at or left of `c_min`, is extended flat to `c_max`, and is clipped by linear interpolation at
both ends. Bootstrap resamples are drawn as counts per query and shared by every method (paired).
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch


def _as_numpy(x: torch.Tensor | np.ndarray) -> np.ndarray:
    """A numpy array or a torch tensor (any device) as a float64 numpy array, without importing torch."""
    torch_module = sys.modules.get("torch")
    if torch_module is not None and isinstance(x, torch_module.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def single_model_points(quality: torch.Tensor | np.ndarray, cost: torch.Tensor | np.ndarray) -> np.ndarray:
    """(k, 2) array of (mean cost, mean quality) per model from (n, k) per-query matrices."""
    quality, cost = _as_numpy(quality), _as_numpy(cost)
    if quality.ndim != 2 or quality.shape != cost.shape:
        raise ValueError(f"quality and cost must be (n, k) matrices of one shape, got {quality.shape} and {cost.shape}")
    return np.stack([cost.mean(axis=0), quality.mean(axis=0)], axis=1)


def curve_points(cost: torch.Tensor | np.ndarray, quality: torch.Tensor | np.ndarray) -> np.ndarray:
    """(n_budgets, 2) curve from per-query (n, n_budgets) expected cost/quality matrices (column means)."""
    return single_model_points(quality, cost)


def upper_hull(points: np.ndarray) -> np.ndarray:
    """Upper-left convex hull (the linear-interpolation frontier) of (cost, quality) points, sorted by cost.

    It starts at the cheapest point (the best one among equally cheap points) and keeps only points that
    raise quality: a more expensive point with lower or equal quality than an earlier hull point is dropped,
    and so is a point on or below the segment joining its neighbours (collinear points are dropped).
    """
    points = _as_numpy(points)
    if points.ndim != 2 or points.shape[1] != 2 or len(points) == 0:
        raise ValueError(f"points must be a non-empty (m, 2) array, got shape {points.shape}")
    hull: list[np.ndarray] = []
    for point in points[np.lexsort((-points[:, 1], points[:, 0]))]:
        if hull and point[1] <= hull[-1][1]:
            continue  # dominated: not cheaper (sorted by cost) and no better
        while len(hull) >= 2:
            (c0, q0), (c1, q1) = hull[-2], hull[-1]
            if (c1 - c0) * (point[1] - q0) - (q1 - q0) * (point[0] - c0) < 0:
                break  # hull[-1] lies strictly above the chord from hull[-2] to point
            hull.pop()
        hull.append(point)
    return np.array(hull)


def auc_bounds(model_points: np.ndarray) -> tuple[float, float, float]:
    """`(c_min, c_max, q_left)` of the AUC from single-model (cost, quality) points: cheapest and most
    expensive model's mean cost, and the worst model's mean quality."""
    model_points = _as_numpy(model_points)
    return float(model_points[:, 0].min()), float(model_points[:, 0].max()), float(model_points[:, 1].min())


def _auc_batch(curves: np.ndarray, c_min: np.ndarray, c_max: np.ndarray, q_left: np.ndarray) -> np.ndarray:
    """AUC ×100 of R curves `(R, m, 2)` at once, each with its own bounds `(R,)`."""
    if np.any(c_max <= c_min):
        raise ValueError("the AUC needs c_max > c_min (single models of different mean costs)")
    order = np.lexsort((curves[..., 1], curves[..., 0]), axis=-1)
    cost = np.take_along_axis(curves[..., 0], order, axis=-1)
    quality = np.take_along_axis(curves[..., 1], order, axis=-1)
    # Left anchor (c_min, q_left) unless a point lies at or left of c_min; otherwise a zero-width copy of
    # the first point. Right: flat to c_max, or a zero-width copy of the last point if it already reaches it.
    needs_anchor = cost[:, 0] > c_min
    left_cost = np.where(needs_anchor, c_min, cost[:, 0])
    left_quality = np.where(needs_anchor, q_left, quality[:, 0])
    right_cost = np.maximum(cost[:, -1], c_max)
    cost = np.concatenate([left_cost[:, None], cost, right_cost[:, None]], axis=1)
    quality = np.concatenate([left_quality[:, None], quality, quality[:, -1:]], axis=1)

    x0, x1, y0, y1 = cost[:, :-1], cost[:, 1:], quality[:, :-1], quality[:, 1:]
    width = x1 - x0
    slope = np.divide(y1 - y0, width, out=np.zeros_like(width), where=width > 0)
    a = np.clip(x0, c_min[:, None], c_max[:, None])
    b = np.clip(x1, c_min[:, None], c_max[:, None])
    area = (b - a) * (y0 + slope * ((a - x0) + (b - x0)) / 2)  # trapezoid of the clipped segment
    return 100.0 * area.sum(axis=1) / (c_max - c_min)


def auc(curve: np.ndarray, c_min: float, c_max: float, q_left: float) -> float:
    """AUC ×100 of a (m, 2) curve of (cost, quality) points over `[c_min, c_max]`, per method.md."""
    curve = _as_numpy(curve)
    if curve.ndim != 2 or curve.shape[1] != 2 or len(curve) == 0:
        raise ValueError(f"curve must be a non-empty (m, 2) array, got shape {curve.shape}")
    return float(_auc_batch(curve[None], np.array([c_min]), np.array([c_max]), np.array([q_left]))[0])


def _padded_hulls(model_points: np.ndarray) -> np.ndarray:
    """Upper hulls of R point sets `(R, k, 2)`, each padded to k points by repeating its last point."""
    hulls = np.empty_like(model_points)
    for r, points in enumerate(model_points):
        hull = upper_hull(points)
        hulls[r, : len(hull)] = hull
        hulls[r, len(hull) :] = hull[-1]
    return hulls


def bootstrap_aucs(
    methods: dict[str, tuple[np.ndarray, np.ndarray]],
    model_quality: np.ndarray,
    model_cost: np.ndarray,
    *,
    n_resamples: int = 500,
    seed: int = 0,
    linear_name: str = "linear",
) -> dict[str, np.ndarray]:
    """AUC of every method on each of n_resamples paired bootstrap resamples of the test queries.

    methods: name -> (cost (n, m_b), quality (n, m_b)) per-query matrices for that method's budgets.
    model_quality/model_cost: (n, k) per-query single-model matrices (for c_min, c_max, q_left and the
    linear hull), recomputed on every resample. Returns name -> (n_resamples,) AUCs, including
    linear_name for the hull of single models.
    """
    if linear_name in methods:
        raise ValueError(f"method name {linear_name!r} is reserved for the linear-interpolation baseline")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    model_quality, model_cost = _as_numpy(model_quality), _as_numpy(model_cost)
    if model_quality.ndim != 2 or model_quality.shape != model_cost.shape:
        shapes = f"{model_quality.shape} and {model_cost.shape}"
        raise ValueError(f"model_quality and model_cost must be (n, k) of one shape, got {shapes}")
    n = model_quality.shape[0]
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n, size=(n_resamples, n))
    counts = np.bincount((draws + n * np.arange(n_resamples)[:, None]).ravel(), minlength=n_resamples * n)
    weights = counts.reshape(n_resamples, n) / n  # row r: how often each query is drawn in resample r, / n

    model_points = np.stack([weights @ model_cost, weights @ model_quality], axis=-1)  # (R, k, 2)
    c_min, c_max = model_points[..., 0].min(axis=1), model_points[..., 0].max(axis=1)
    q_left = model_points[..., 1].min(axis=1)

    result: dict[str, np.ndarray] = {}
    for name, (cost, quality) in methods.items():
        cost, quality = _as_numpy(cost), _as_numpy(quality)
        if cost.ndim != 2 or cost.shape != quality.shape or cost.shape[0] != n:
            shapes = f"{cost.shape} and {quality.shape}"
            raise ValueError(f"method {name!r}: cost and quality must both be ({n}, m), got {shapes}")
        curves = np.stack([weights @ cost, weights @ quality], axis=-1)  # (R, m, 2)
        result[name] = _auc_batch(curves, c_min, c_max, q_left)
    result[linear_name] = _auc_batch(_padded_hulls(model_points), c_min, c_max, q_left)
    return result


def confidence_interval(samples: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval holding the central `level` share of the bootstrap samples."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    low, high = np.quantile(_as_numpy(samples), [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def budget_grid(model_cost_means: np.ndarray, model_quality_means: np.ndarray, n: int) -> np.ndarray:
    """n budgets spread between the cheapest and the most expensive single model's mean cost.

    Like the reference, the budgets are placed along the cost/quality hull: the same share of the n
    points between each pair of consecutive hull models (and between the last hull model and the most
    expensive model, if that one is dominated). Both ends are included; the result is sorted, unique and
    of length exactly n (n >= 2). When n - 1 is a multiple of the number of segments, every hull model's
    cost is itself a budget.
    """
    costs, qualities = _as_numpy(model_cost_means), _as_numpy(model_quality_means)
    if n < 2:
        raise ValueError(f"budget_grid needs n >= 2 budgets, got {n}")
    if costs.ndim != 1 or costs.shape != qualities.shape or len(costs) == 0:
        raise ValueError(f"model means must be 1-d of one length, got {costs.shape} and {qualities.shape}")
    c_max = costs.max()
    knots = upper_hull(np.stack([costs, qualities], axis=1))[:, 0]
    if knots[-1] < c_max:
        knots = np.append(knots, c_max)
    if len(knots) < 2:
        raise ValueError("budget_grid needs single models of different mean costs")
    segments = len(knots) - 1
    return np.interp(np.linspace(0.0, segments, n), np.arange(segments + 1), knots)
