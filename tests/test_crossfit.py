"""Cross-fitting: every training query is estimated by the member that did not see it."""

from __future__ import annotations

import pytest
import torch

from estimators.base import Estimate, Features, QualityEstimator
from estimators.crossfit import CrossFitted, fold_of
from estimators.logreg import LogRegEstimator
from factories import random_table
from router_train.table import RoutingTable


class Memorizer(QualityEstimator):
    """Predicts a query's true quality if it was among its training queries, else 0.5: in-sample leaks show."""

    def fit(self, table: RoutingTable) -> "Memorizer":
        self.models = list(table.models)
        self.seen = {q: table.quality[i] for i, q in enumerate(table.query_ids)}
        return self

    def featurize(self, table: RoutingTable) -> Features:
        known = torch.stack([self.seen.get(q, torch.full((table.k,), 0.5, dtype=torch.float64)) for q in table.query_ids])
        return {"quality": known, "cost": table.cost.clone()}

    def predict(self, features: Features, rows: torch.Tensor, run: torch.Tensor) -> Estimate:
        return Estimate(quality=features["quality"][rows], cost=features["cost"][rows])


def test_folds_are_balanced_and_seeded():
    fold = fold_of(103, 5, seed=3)
    assert torch.bincount(fold).tolist() == [21, 21, 21, 20, 20]
    assert torch.equal(fold, fold_of(103, 5, seed=3)) and not torch.equal(fold, fold_of(103, 5, seed=4))


def test_every_row_is_estimated_out_of_fold():
    table = random_table(60, 4)
    cross = CrossFitted(Memorizer, folds=4, seed=0).fit(table)
    features = cross.featurize(table)
    rows = torch.randperm(table.n)  # any order, any subset
    run = torch.zeros(table.n, table.k, dtype=torch.bool)
    est = cross.predict(features, rows, run)
    assert torch.all(est.quality == 0.5)  # no member has seen the row it estimates
    assert torch.equal(est.cost, table.cost[rows])
    assert Memorizer().fit(table).predict(Memorizer().fit(table).featurize(table), rows, run).quality.ne(0.5).any()
    assert cross.predict(features, rows[:0], run[:0]).quality.shape == (0, table.k)


def test_members_match_estimators_fitted_on_the_other_folds():
    table = random_table(60, 4)
    cross = CrossFitted(lambda: LogRegEstimator(max_depth=2), folds=3, seed=1).fit(table)
    features = cross.featurize(table)
    rows = torch.arange(table.n)
    run = torch.zeros(table.n, table.k, dtype=torch.bool)
    run[:, 0] = True
    est = cross.predict(features, rows, run)
    for f in range(3):
        held = (cross.fold == f).nonzero().squeeze(1)
        alone = LogRegEstimator(max_depth=2).fit(table.subset(cross.fold != f))
        expected = alone.predict(alone.featurize(table.subset(held)), torch.arange(held.numel()), run[held])
        assert torch.allclose(est.quality[held], expected.quality)
        assert torch.allclose(est.cov[held], expected.cov)


def test_other_tables_and_bad_folds_are_refused():
    table = random_table(40, 3)
    with pytest.raises(ValueError, match="folds >= 2"):
        CrossFitted(Memorizer, folds=1)
    cross = CrossFitted(Memorizer, folds=2).fit(table)
    with pytest.raises(ValueError, match="only for the table"):
        cross.featurize(random_table(40, 3, seed=5).subset(torch.arange(30)))
