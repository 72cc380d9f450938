"""Tests of the quality–cost metrics (AUC, hull, bootstrap, budget grid) and of the PNG plot."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from router_train.metrics import (
    auc,
    auc_bounds,
    bootstrap_aucs,
    budget_grid,
    confidence_interval,
    curve_points,
    single_model_points,
    upper_hull,
)
from router_train.plotting import plot_curves


def test_flat_curve_is_its_quality() -> None:
    curve = np.array([[0.0, 0.7], [1.0, 0.7], [2.0, 0.7]])
    assert auc(curve, 0.0, 2.0, 0.1) == pytest.approx(70.0)
    # A single point at c_min extended flat to c_max: no left anchor.
    assert auc(np.array([[0.0, 0.4]]), 0.0, 2.0, 0.1) == pytest.approx(40.0)


def test_triangle() -> None:
    # Anchor (0, 0) to (1, 1): the triangle below the diagonal.
    assert auc(np.array([[1.0, 1.0]]), 0.0, 1.0, 0.0) == pytest.approx(50.0)
    # Anchor (0, 0) -> (0.5, 1) -> flat to (1, 1): 0.25 + 0.5.
    assert auc(np.array([[0.5, 1.0]]), 0.0, 1.0, 0.0) == pytest.approx(75.0)


def test_left_anchor_and_flat_extension() -> None:
    # (0, 0.1) -> (1, 0.5): 0.3; flat 0.5 over [1, 2]: 0.5; total 0.8 over a width of 2.
    assert auc(np.array([[1.0, 0.5]]), 0.0, 2.0, 0.1) == pytest.approx(40.0)


def test_clipping_outside_the_interval() -> None:
    # Left of c_min: interpolated at c_min (0.5) and the anchor is not used, whatever q_left.
    curve = np.array([[-1.0, 0.0], [1.0, 1.0], [3.0, 1.0]])
    assert auc(curve, 0.0, 2.0, 0.0) == pytest.approx(87.5)
    assert auc(curve, 0.0, 2.0, 0.9) == pytest.approx(87.5)
    # Right of c_max: interpolated at c_max (0.5): triangle of area 0.5 over a width of 2.
    assert auc(np.array([[0.0, 0.0], [4.0, 1.0]]), 0.0, 2.0, 0.3) == pytest.approx(25.0)
    # Every point outside on the right: the anchor's segment is clipped at c_max.
    assert auc(np.array([[2.0, 1.0]]), 0.0, 1.0, 0.0) == pytest.approx(25.0)


def test_auc_sorts_points_and_rejects_bad_bounds() -> None:
    curve = np.array([[0.5, 1.0], [0.25, 0.5], [1.0, 1.0]])
    assert auc(curve, 0.0, 1.0, 0.0) == pytest.approx(auc(curve[np.argsort(curve[:, 0])], 0.0, 1.0, 0.0))
    with pytest.raises(ValueError):
        auc(curve, 1.0, 1.0, 0.0)


def test_hull_drops_dominated_and_collinear_points() -> None:
    points = np.array(
        [
            [3.0, 0.9],  # dominated by (2, 0.9): equal quality, more expensive
            [1.0, 0.6],
            [2.0, 0.9],
            [0.0, 0.1],
            [1.5, 0.4],  # below the hull and dominated
            [4.0, 0.95],
        ]
    )
    hull = upper_hull(points)
    np.testing.assert_allclose(hull, [[0.0, 0.1], [1.0, 0.6], [2.0, 0.9], [4.0, 0.95]])
    collinear = np.array([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0], [0.5, 0.2]])
    np.testing.assert_allclose(upper_hull(collinear), [[0.0, 0.0], [2.0, 2.0]])


def test_hull_starts_at_cheapest_and_breaks_cost_ties_by_quality() -> None:
    points = np.array([[1.0, 0.2], [1.0, 0.6], [2.0, 0.5], [3.0, 0.8]])
    np.testing.assert_allclose(upper_hull(points), [[1.0, 0.6], [3.0, 0.8]])
    # The cheapest model is also the best: the hull is that one point.
    np.testing.assert_allclose(upper_hull(np.array([[2.0, 0.1], [1.0, 0.9]])), [[1.0, 0.9]])


def test_single_model_points_and_curve_points() -> None:
    quality = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    cost = np.array([[1.0, 4.0], [2.0, 5.0], [3.0, 6.0]])
    expected = [[2.0, 2 / 3], [5.0, 2 / 3]]
    np.testing.assert_allclose(single_model_points(quality, cost), expected)
    np.testing.assert_allclose(single_model_points(torch.tensor(quality), torch.tensor(cost)), expected)
    np.testing.assert_allclose(curve_points(cost, quality), expected)


def _random_problem(seed: int, n: int = 400, k: int = 4, budgets: int = 8):
    """Single models with rising cost and quality, and one method interpolating between them."""
    rng = np.random.default_rng(seed)
    model_quality = (rng.random((n, k)) < np.linspace(0.3, 0.8, k)).astype(float)
    model_cost = rng.gamma(2.0, np.geomspace(1e-4, 1e-2, k) / 2, size=(n, k))
    mix = np.linspace(0.0, 1.0, budgets)
    method_quality = np.maximum(model_quality[:, :1], model_quality[:, -1:]) * mix + model_quality[:, :1] * (1 - mix)
    method_cost = model_cost[:, :1] + model_cost[:, -1:] * mix
    return model_quality, model_cost, {"cascade": (method_cost, method_quality)}


def test_bootstrap_is_deterministic_and_covers_the_point_estimate() -> None:
    model_quality, model_cost, methods = _random_problem(0)
    first = bootstrap_aucs(methods, model_quality, model_cost, n_resamples=200, seed=3)
    again = bootstrap_aucs(methods, model_quality, model_cost, n_resamples=200, seed=3)
    other = bootstrap_aucs(methods, model_quality, model_cost, n_resamples=200, seed=4)
    assert set(first) == {"cascade", "linear"}
    for name in first:
        assert first[name].shape == (200,)
        np.testing.assert_array_equal(first[name], again[name])
        assert not np.array_equal(first[name], other[name])

    points = single_model_points(model_quality, model_cost)
    bounds = auc_bounds(points)
    estimates = {
        "cascade": auc(curve_points(*methods["cascade"]), *bounds),
        "linear": auc(upper_hull(points), *bounds),
    }
    for name, estimate in estimates.items():
        low, high = confidence_interval(first[name])
        assert low < estimate < high


def test_bootstrap_of_identical_queries_is_the_point_estimate() -> None:
    model_quality = np.tile([[0.2, 0.9, 0.6]], (50, 1))
    model_cost = np.tile([[1.0, 3.0, 5.0]], (50, 1))
    method = (np.tile([[1.0, 2.0, 4.0]], (50, 1)), np.tile([[0.2, 0.8, 0.9]], (50, 1)))
    samples = bootstrap_aucs({"m": method}, model_quality, model_cost, n_resamples=20, linear_name="hull")
    bounds = (1.0, 5.0, 0.2)
    np.testing.assert_allclose(samples["m"], auc(curve_points(*method), *bounds))
    # The hull (1, 0.2) -> (3, 0.9), flat to 5: (0.55 * 2 + 0.9 * 2) / 4.
    np.testing.assert_allclose(samples["hull"], 72.5)
    with pytest.raises(ValueError):
        bootstrap_aucs({"hull": method}, model_quality, model_cost, linear_name="hull")


def test_confidence_interval() -> None:
    low, high = confidence_interval(np.arange(1001.0), level=0.9)
    assert (low, high) == pytest.approx((50.0, 950.0))


def test_budget_grid() -> None:
    costs = np.array([1.0, 2.0, 3.0, 6.0])
    qualities = np.array([0.3, 0.6, 0.5, 0.8])  # model 3 (cost 3) is off the hull
    grid = budget_grid(costs, qualities, 7)
    assert len(grid) == 7
    assert grid[0] == 1.0 and grid[-1] == 6.0
    assert np.all(np.diff(grid) > 0)
    np.testing.assert_allclose(grid, [1.0, 4 / 3, 5 / 3, 2.0, 10 / 3, 14 / 3, 6.0])  # 3 per hull segment
    # The most expensive model is dominated: the grid still reaches its cost.
    grid = budget_grid(np.array([1.0, 2.0, 5.0]), np.array([0.3, 0.9, 0.8]), 5)
    assert grid[0] == 1.0 and grid[-1] == 5.0 and len(np.unique(grid)) == 5
    for n in (2, 3, 20, 51):
        grid = budget_grid(costs, qualities, n)
        assert len(grid) == n and np.all(np.diff(grid) > 0)
    with pytest.raises(ValueError):
        budget_grid(costs, qualities, 1)


def test_plot_writes_a_png(tmp_path) -> None:
    path = tmp_path / "plots" / "curves.png"
    curves = {"cascade": np.array([[2.0, 0.7], [1.0, 0.5], [3.0, 0.8]]), "linear": np.array([[1.0, 0.4], [3.0, 0.8]])}
    plot_curves(
        curves,
        path,
        model_points=np.array([[1.0, 0.4], [3.0, 0.8]]),
        model_names=["small", "large"],
        title="test",
        aucs={"cascade": 71.2},
    )
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert os.listdir(path.parent) == ["curves.png"]
