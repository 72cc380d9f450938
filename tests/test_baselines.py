"""Baseline estimators: cost model, training run sets, residual covariance, logistic regression, kNN."""

from __future__ import annotations

import math
import re
import zlib

import pytest
import torch

from estimators.cost import CostModel
from estimators.knn import KNNEstimator
from estimators.logreg import LogRegEstimator
from estimators.run_sets import sample_run_sets
from estimators.uncertainty import ResidualCovariance
from factories import random_table
from router_train.table import RoutingTable

NAN = float("nan")


def make_table(cost: torch.Tensor, *, sources: list[str] | None = None, queries: list[str] | None = None,
               tokens_in: torch.Tensor | None = None, tokens_out: torch.Tensor | None = None,
               quality: torch.Tensor | None = None) -> RoutingTable:
    """A RoutingTable built directly from tensors (no loader), with NaN quality unless given."""
    n, k = cost.shape
    return RoutingTable(
        models=[f"m{j}" for j in range(k)],
        query_ids=[f"q{i}" for i in range(n)],
        queries=queries if queries is not None else [f"query {i}" for i in range(n)],
        sources=sources if sources is not None else [""] * n,
        is_test=torch.zeros(n, dtype=torch.bool),
        quality=quality if quality is not None else torch.full((n, k), NAN, dtype=torch.float64),
        cost=cost,
        tokens_in=tokens_in,
        tokens_out=tokens_out,
    )


def serving_copy(table: RoutingTable, run: torch.Tensor) -> RoutingTable:
    """What serving knows: quality NaN, and answers/confidence/tokens_out/cost only for run models."""
    hide = ~run
    return RoutingTable(
        models=list(table.models),
        query_ids=list(table.query_ids),
        queries=list(table.queries),
        sources=list(table.sources),
        is_test=table.is_test.clone(),
        quality=torch.full_like(table.quality, NAN),
        cost=table.cost.masked_fill(hide, NAN),
        answers=[[a if r else None for a, r in zip(row, flags)] for row, flags in zip(table.answers, run.tolist())],
        confidence=table.confidence.masked_fill(hide, NAN),
        tokens_in=table.tokens_in.clone(),
        tokens_out=table.tokens_out.masked_fill(hide, NAN),
    )


def all_rows(table: RoutingTable, run: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    rows = torch.arange(table.n)
    return rows, torch.zeros(table.n, table.k, dtype=torch.bool) if run is None else run


# -- cost model ---------------------------------------------------------------------------------


def _priced(seed: int = 0, n: int = 60) -> tuple[list[str], torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Queries of 4 characters per input token, token counts, and costs from known per-token prices."""
    g = torch.Generator().manual_seed(seed)
    length = torch.randint(20, 400, (n,), generator=g)
    queries = ["word" * int(t) for t in length]
    tokens_in = length.double().unsqueeze(1).repeat(1, 3)
    tokens_out = torch.randint(1, 300, (n, 3), generator=g).double()
    prices = torch.tensor([[1e-7, 4e-7], [5e-7, 1.5e-6], [2.5e-6, 1e-5]], dtype=torch.float64)
    cost = prices[:, 0] * tokens_in + prices[:, 1] * tokens_out
    return queries, tokens_in, tokens_out, cost, prices


def test_cost_model_recovers_token_prices_and_prices_observed_usage() -> None:
    queries, tokens_in, tokens_out, cost, prices = _priced()
    model = CostModel().fit(make_table(cost, queries=queries, tokens_in=tokens_in, tokens_out=tokens_out))
    assert bool(model.has_price.all())
    torch.testing.assert_close(model.price[:, :2], prices, rtol=1e-6, atol=1e-15)
    assert float(model.price[:, 2].abs().max()) < 1e-12
    # serving: cost unknown, output tokens observed for the run models -> priced exactly
    live = make_table(torch.full_like(cost, NAN), queries=queries, tokens_out=tokens_out)
    rows, run = all_rows(live, torch.ones_like(cost, dtype=torch.bool))
    torch.testing.assert_close(model.predict(model.featurize(live), rows, run), cost, rtol=1e-6, atol=1e-15)


def test_cost_model_input_price_plus_constant_is_exact_ex_ante() -> None:
    queries, tokens_in, _, _, prices = _priced(seed=1)
    cost = prices[:, 0] * (tokens_in + 256)  # an LLMRouter-style table: price × (input + fixed output allowance)
    sources = [f"s{i % 3}" for i in range(cost.shape[0])]
    model = CostModel().fit(make_table(cost, queries=queries, tokens_in=tokens_in, sources=sources))
    # serving knows the query text, not its token count
    live = make_table(torch.full_like(cost, NAN), queries=queries, sources=["s0", "unseen"] * 30)
    estimate = model.predict(model.featurize(live), *all_rows(live))
    torch.testing.assert_close(estimate, cost, rtol=1e-9, atol=1e-15)
    assert not bool(model.has_price.any())


def test_cost_model_estimates_tokens_from_characters_when_tokens_in_is_missing() -> None:
    g = torch.Generator().manual_seed(2)
    chars = torch.randint(40, 800, (50,), generator=g)
    queries = ["x" * int(c) for c in chars]
    tokens_in = (chars.double() / 4).unsqueeze(1).repeat(1, 2)  # 4 characters per token
    cost = torch.tensor([2e-7, 3e-6]) * (tokens_in + 10)
    model = CostModel().fit(make_table(cost, tokens_in=tokens_in, queries=queries))
    torch.testing.assert_close(model.ratio, torch.full((2,), 0.25, dtype=torch.float64))
    live = make_table(torch.full_like(cost, NAN), queries=queries)  # no token counts at serving time
    estimate = model.predict(model.featurize(live), *all_rows(live))
    torch.testing.assert_close(estimate, cost, rtol=1e-9, atol=1e-15)


def test_cost_model_falls_back_to_source_mean_cost() -> None:
    g = torch.Generator().manual_seed(3)
    cost = torch.rand(40, 3, generator=g, dtype=torch.float64) * 1e-4
    sources = ["a" if i < 10 else "b" for i in range(40)]
    queries = ["same length"] * 40  # no tokens and no variation in length: nothing but the source to go on
    table = make_table(cost, sources=sources, queries=queries)
    exact = CostModel(prior_rows=0).fit(table)
    live = make_table(torch.full((3, 3), NAN, dtype=torch.float64), sources=["a", "b", "new"], queries=queries[:3])
    estimate = exact.predict(exact.featurize(live), *all_rows(live))
    torch.testing.assert_close(estimate[0], cost[:10].mean(0))
    torch.testing.assert_close(estimate[1], cost[10:].mean(0))
    torch.testing.assert_close(estimate[2], cost.mean(0))
    shrunk = CostModel(prior_rows=5).fit(table)
    estimate = shrunk.predict(shrunk.featurize(live), *all_rows(live))
    torch.testing.assert_close(estimate[0], (10 * cost[:10].mean(0) + 5 * cost.mean(0)) / 15)


def test_cost_model_uses_observed_costs_of_run_models_and_is_never_negative() -> None:
    table = random_table(60, 4, seed=1)
    model = CostModel().fit(table.train())
    features = model.featurize(table)
    rows = torch.arange(table.n)
    run = torch.rand(table.n, table.k, generator=torch.Generator().manual_seed(0)) < 0.5
    estimate = model.predict(features, rows, run)
    assert estimate.dtype == torch.float64 and bool((estimate >= 0).all())
    torch.testing.assert_close(estimate[run], table.cost[run])
    ante = model.predict(features, rows, torch.zeros_like(run))
    assert not torch.allclose(ante, table.cost)
    # a steep negative trend would extrapolate below zero: the slope is clipped at 0 and estimates at 0
    tokens = torch.arange(1.0, 21.0, dtype=torch.float64).unsqueeze(1)
    steep = make_table(1e-3 - 5e-5 * tokens, tokens_in=tokens)
    assert float(CostModel().fit(steep).slope[0]) == 0.0
    far = make_table(torch.full((1, 1), NAN, dtype=torch.float64), tokens_in=torch.full((1, 1), 1e6, dtype=torch.float64))
    fitted = CostModel().fit(steep)
    assert float(fitted.predict(fitted.featurize(far), *all_rows(far))) >= 0


def test_cost_model_never_reads_quality_and_round_trips_its_state() -> None:
    table = random_table(60, 4, seed=2)
    model = CostModel().fit(table.train())
    blind = make_table(table.cost, sources=table.sources, queries=table.queries, tokens_in=table.tokens_in,
                       tokens_out=table.tokens_out)
    blind.models = list(table.models)
    features = model.featurize(blind)
    reference = model.featurize(table)
    for name in features:
        torch.testing.assert_close(features[name], reference[name])
    restored = CostModel.from_config(model.config()).load_state_dict(model.state_dict())
    for name, value in restored.featurize(table).items():
        torch.testing.assert_close(value, reference[name])


# -- training run sets --------------------------------------------------------------------------


def test_sample_run_sets_has_prefixes_bounded_sizes_and_is_deterministic() -> None:
    n, k, depth, per_row = 7, 5, 3, 4
    rows, run = sample_run_sets(n, k, depth, per_row, torch.Generator().manual_seed(0))
    assert rows.shape == (n * (depth + 1 + per_row),) and run.shape == (rows.numel(), k) and run.dtype == torch.bool
    sizes = run.sum(1)
    assert int(sizes.max()) <= depth
    for i in range(n):
        states = {tuple(r) for r in run[rows == i].tolist()}
        for t in range(depth + 1):
            assert tuple(j < t for j in range(k)) in states
    random_part = run[n * (depth + 1):]
    assert bool((random_part.sum(1) >= 1).all())
    assert len({tuple(r) for r in random_part.tolist()}) > depth + 1  # not only prefixes
    again = sample_run_sets(n, k, depth, per_row, torch.Generator().manual_seed(0))
    assert torch.equal(again[0], rows) and torch.equal(again[1], run)
    other = sample_run_sets(n, k, depth, per_row, torch.Generator().manual_seed(1))
    assert not torch.equal(other[1], run)
    # depth beyond k caps at k; depth 0 gives the empty set only
    rows, run = sample_run_sets(2, 2, 5, 1, torch.Generator().manual_seed(0))
    assert int(run.sum(1).max()) <= 2 and rows.numel() == 2 * (3 + 1)
    rows, run = sample_run_sets(3, 4, 0, 2, torch.Generator().manual_seed(0))
    assert rows.numel() == 3 and not bool(run.any())


# -- residual covariance ------------------------------------------------------------------------


def test_residual_covariance_recovers_a_known_covariance() -> None:
    k, n = 4, 12000
    g = torch.Generator().manual_seed(0)
    a = torch.randn(k, k, generator=g, dtype=torch.float64)
    true = a @ a.T / k + 0.1 * torch.eye(k, dtype=torch.float64)
    noise = torch.randn(n, k, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(true).T
    truth = torch.rand(n, k, generator=g, dtype=torch.float64)
    size = torch.randint(0, 3, (n,), generator=g)
    run = torch.rand(n, k, generator=g).argsort(1).argsort(1) < size.unsqueeze(1)

    def predict(rows: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        scale = (1 + r.sum(1, keepdim=True)).double().sqrt()  # Σ_t = (1 + t) · true for the unrun entries
        return torch.where(r, truth[rows], truth[rows] - scale * noise[rows])

    model = ResidualCovariance().fit(predict, torch.arange(n), run, torch.ones(1, k, dtype=torch.bool))
    assert model.sigma.shape == (3, k, k)
    for t in range(3):
        torch.testing.assert_close(model.sigma[t], (1 + t) * true, atol=0.15 * (1 + t), rtol=0.0)

    query = torch.tensor([[False] * k, [True, False, False, True], [True, True, True, False]])
    cov = model.cov(query)
    assert cov.shape == (3, k, k) and cov.dtype == torch.float64
    assert bool((cov[query] == 0).all()) and bool((cov.transpose(1, 2)[query] == 0).all())
    torch.testing.assert_close(cov, cov.transpose(1, 2))
    assert float(torch.linalg.eigvalsh(cov).min()) > -1e-12
    # |run| = 3 is beyond the fitted sizes: the largest one (t = 2) is used
    torch.testing.assert_close(cov[2, 3, 3], model.sigma[2, 3, 3])
    torch.testing.assert_close(cov[0], model.sigma[0], atol=1e-12, rtol=0.0)  # already PSD: unchanged
    restored = ResidualCovariance().load_state_dict(model.state_dict())
    torch.testing.assert_close(restored.cov(query), cov)


def test_residual_covariance_clips_negative_eigenvalues() -> None:
    model = ResidualCovariance().load_state_dict({"sigma": torch.tensor([[[1.0, 2.0], [2.0, 1.0]]], dtype=torch.float64)})
    cov = model.cov(torch.zeros(1, 2, dtype=torch.bool))[0]
    torch.testing.assert_close(cov, torch.full((2, 2), 1.5, dtype=torch.float64))  # eigenvalue -1 clipped to 0


# -- logistic regression ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def logreg_setup() -> tuple[RoutingTable, LogRegEstimator]:
    table = random_table(240, 4, seed=3)
    return table, LogRegEstimator(max_depth=3, per_row=4, seed=0).fit(table.train())


def test_logreg_estimates_are_probabilities_with_psd_covariance(logreg_setup) -> None:
    table, estimator = logreg_setup
    features = estimator.featurize(table)
    rows, run = sample_run_sets(table.n, table.k, 3, 2, torch.Generator().manual_seed(5))
    estimate = estimator.predict(features, rows, run)
    assert estimate.quality.shape == (rows.numel(), table.k) and estimate.quality.dtype == torch.float64
    assert bool(((estimate.quality >= 0) & (estimate.quality <= 1)).all())
    assert estimate.cost.dtype == torch.float64 and bool((estimate.cost >= 0).all())
    assert estimate.cov.shape == (rows.numel(), table.k, table.k) and estimate.cov.dtype == torch.float64
    assert bool((estimate.cov[run] == 0).all())
    assert float(torch.linalg.eigvalsh(estimate.cov).min()) > -1e-10


def test_logreg_post_hoc_estimates_beat_ex_ante_on_held_out_rows(logreg_setup) -> None:
    table, estimator = logreg_setup
    test = table.test()
    features = estimator.featurize(test)
    rows = torch.arange(test.n)
    ante = estimator.predict(features, rows, torch.zeros(test.n, test.k, dtype=torch.bool)).quality
    post = estimator.predict(features, rows, torch.ones(test.n, test.k, dtype=torch.bool)).quality
    ante_error = (ante - test.quality).abs().mean()
    post_error = (post - test.quality).abs().mean()
    assert post_error < ante_error - 0.02, (float(post_error), float(ante_error))


def test_logreg_is_deterministic_and_reads_only_what_serving_knows(logreg_setup) -> None:
    table, estimator = logreg_setup
    again = LogRegEstimator(max_depth=3, per_row=4, seed=0).fit(table.train())
    rows, run = sample_run_sets(table.n, table.k, 2, 1, torch.Generator().manual_seed(6))
    first = estimator.predict(estimator.featurize(table), rows, run)
    second = again.predict(again.featurize(table), rows, run)
    for name in ("quality", "cost", "cov"):
        torch.testing.assert_close(getattr(first, name), getattr(second, name), rtol=0.0, atol=0.0)
    # a serving table per state: NaN quality, outputs of the run models only -> the same estimates
    for state in (0, 1, table.n + 3, rows.numel() - 1):
        r, flags = rows[state : state + 1], run[state : state + 1]
        live = serving_copy(table.subset(r), flags)
        estimate = estimator.predict(estimator.featurize(live), torch.zeros(1, dtype=torch.long), flags)
        torch.testing.assert_close(estimate.quality, first.quality[state : state + 1])
        torch.testing.assert_close(estimate.cost, first.cost[state : state + 1])
        torch.testing.assert_close(estimate.cov, first.cov[state : state + 1])


def test_logreg_source_one_hot_ignores_unseen_sources(logreg_setup) -> None:
    table, estimator = logreg_setup
    features = estimator.featurize(table)
    renamed = table.subset(torch.arange(table.n))
    renamed.sources = ["never seen"] * table.n
    unseen = estimator.featurize(renamed)
    assert bool((features["source"] >= 0).all()) and bool((unseen["source"] == -1).all())
    rows, run = all_rows(table)
    assert bool(torch.isfinite(estimator.predict(unseen, rows, run).quality).all())


# -- kNN ----------------------------------------------------------------------------------------


class HashEmbedder:
    """Bag of words hashed into 64 dimensions: a deterministic stand-in for a text encoder."""

    def encode(self, texts: list[str]) -> torch.Tensor:
        out = torch.zeros(len(texts), 64)
        for i, text in enumerate(texts):
            for word in re.findall(r"\w+", text.lower()):
                out[i, zlib.crc32(word.encode()) % 64] += 1.0
        return out

    def identity(self) -> dict:
        return {"encoder": "hash-bag-of-words", "dim": 64}


class AngleEmbedder:
    """Queries "angle <degrees>" as unit vectors in the plane, so cosine neighbours are known exactly."""

    def encode(self, texts: list[str]) -> torch.Tensor:
        radians = torch.tensor([math.radians(float(t.split()[1])) for t in texts])
        return torch.stack([radians.cos(), radians.sin()], 1)

    def identity(self) -> dict:
        return {"encoder": "angle"}


def test_knn_is_the_mean_of_the_nearest_training_queries() -> None:
    angles = [0, 10, 25, 45, 90, 180]
    quality = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 0.0], [1.0, 0.5], [0.2, 0.3]], dtype=torch.float64)
    train = make_table(torch.full((6, 2), 1e-5, dtype=torch.float64), quality=quality,
                       queries=[f"angle {a}" for a in angles])
    estimator = KNNEstimator(AngleEmbedder(), n_neighbors=2).fit(train)
    # a new query at 5°: neighbours 0° and 10°
    new = make_table(torch.full((2, 2), NAN, dtype=torch.float64), queries=["angle 5", "angle 100"])
    new.query_ids = ["fresh-1", "fresh-2"]
    features = estimator.featurize(new)
    torch.testing.assert_close(features["knn_quality"][0], quality[:2].mean(0))
    torch.testing.assert_close(features["knn_quality"][1], quality[[4, 3]].mean(0))  # 90° and 45°
    # a training query is not its own neighbour: 0° -> 10° and 25°
    own = estimator.featurize(train)["knn_quality"]
    torch.testing.assert_close(own[0], quality[[1, 2]].mean(0))
    torch.testing.assert_close(own[4], quality[[3, 2]].mean(0))
    # the estimate ignores the run set; Σ is diagonal, zero for run models
    run = torch.tensor([[True, False], [False, False]])
    estimate = estimator.predict(features, torch.arange(2), run)
    torch.testing.assert_close(estimate.quality, features["knn_quality"])
    assert float(estimate.cov[0, 0, 0]) == 0 and float(estimate.cov[0, 1, 1]) > 0
    assert float(estimate.cov[0, 0, 1]) == 0
    residual = quality - own
    torch.testing.assert_close(estimate.cov[1].diagonal(), residual.var(0, correction=0))


def test_knn_leave_one_out_on_a_random_table() -> None:
    table = random_table(50, 3, seed=4)
    train = table.train()
    estimator = KNNEstimator(HashEmbedder(), n_neighbors=train.n - 1).fit(train)
    own = estimator.featurize(train)["knn_quality"]
    expected = (train.quality.sum(0) - train.quality) / (train.n - 1)
    torch.testing.assert_close(own, expected)
    blind = serving_copy(table.test(), torch.zeros(table.test().n, table.k, dtype=torch.bool))
    estimate = estimator.predict(estimator.featurize(blind), *all_rows(blind))
    assert bool(torch.isfinite(estimate.quality).all()) and bool((estimate.cost > 0).all())
