"""The serving loop example: replaying through route_batch does exactly what the offline simulator
does with the same per-query tie draws, and the script reports against the offline evaluation."""

import json
import sys
from pathlib import Path

import torch

from router_train import CascadeRouter
from router_train.simulate import Simulator

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import serving_loop  # noqa: E402


def test_replay_equals_the_simulator(tiny_export):
    router = CascadeRouter.load(tiny_export)
    manifest = json.loads((tiny_export / "manifest.json").read_text())
    table = serving_loop.test_split(manifest, None)
    for mode in ("cascade_routing", "cascade", "routing"):
        budget = router.budgets[2]
        cost, quality, run = serving_loop.replay(router, table, budget, mode)
        strategy = router.strategy(budget, mode)
        expensive = router._expensive(list(table.queries), strategy.gamma)
        offline = Simulator(table, router.estimator, kernel=router.kernel).run(strategy, expensive)
        assert torch.equal(run, offline.run), mode
        assert torch.equal(quality, offline.quality) and torch.allclose(cost, offline.cost)


def test_script_reports_realized_and_offline_figures(tiny_export, capsys):
    result = serving_loop.main(["--checkpoint", str(tiny_export)])
    out = capsys.readouterr().out
    assert "realized: mean cost" in out and "offline evaluation at this budget" in out
    assert result["queries"] > 0 and result["mean_cost"] > 0 and "offline_cost" in result
