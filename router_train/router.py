"""Serving: decide the next step for a batch of in-flight queries with an exported checkpoint.

    router = CascadeRouter.load("checkpoints/default", device="cpu", budget=1e-4)
    decisions = router.route_batch(["What is 2 + 2?"], observed=[[]])
    decisions[0].next_model            # the model to call next, or None to stop
    decisions[0].answer_model          # when stopping: the run model whose answer to return

A serving stack calls `route_batch` once per step with every query in flight and what each has seen so
far; the router runs the exported estimator and the kernel for all of them at once.
"""

from __future__ import annotations

import hashlib
import math
import numbers
import sys
import threading
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from estimators.learned import LearnedEstimator

from .kernel import KernelConfig, decide
from .manifest import read_manifest
from .strategy import Strategy
from .table import RoutingTable

SERVING_MODES = ("routing", "cascade", "cascade_routing", "threshold_cascade")
OBSERVATION_FIELDS = ("model", "answer", "confidence", "tokens_out", "cost")


@dataclass
class Decision:
    """What to do next for one query."""

    next_model: str | None  # the model to call next, None to stop
    answer_model: str | None  # the run model whose answer to return when stopping (None if none ran)
    step: int  # number of models run so far
    quality: dict[str, float] = field(default_factory=dict)  # estimated quality per model
    cost: dict[str, float] = field(default_factory=dict)  # estimated cost per model
    plan: list[str] = field(default_factory=list)  # the chosen supermodel: models run plus to run

    def to_dict(self) -> dict:
        return asdict(self)


class CascadeRouter:
    """An exported estimator plus the calibrated strategies of its budget sweep, ready to route batches."""

    def __init__(
        self,
        estimator: LearnedEstimator,
        manifest: dict,
        *,
        budget: float | None = None,
        mode: str = "cascade_routing",
        device: str = "cpu",
        seed: int | None = None,
        cache_size: int = 100_000,
    ) -> None:
        self.estimator = estimator
        self.manifest = manifest
        self.path: Path | None = None  # the checkpoint directory when loaded from one
        self.models: list[str] = list(manifest["models"])
        self._index = {m: j for j, m in enumerate(self.models)}
        self.max_depth = int(manifest["max_depth"])
        self.budgets = [float(b) for b in manifest["budgets"]]
        self.kernel = KernelConfig(
            n_samples=int(manifest["kernel"]["n_samples"]), seed=int(manifest["kernel"]["seed"])
        )
        self.seed = self.kernel.seed if seed is None else seed
        self.device = device
        self._check_mode(mode)
        self.mode = mode
        self.budget = self._check_budget(budget if budget is not None else self.budgets[len(self.budgets) // 2])
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    @classmethod
    def load(
        cls,
        path: str | Path,
        *,
        device: str = "cpu",
        budget: float | None = None,
        mode: str = "cascade_routing",
        seed: int | None = None,
        cache_size: int = 100_000,
        quantize: str | None = None,
    ) -> "CascadeRouter":
        """Load an export (`checkpoints/<run>`); fails at once on missing or changed files (their SHA-256 in
        the manifest), wrong shapes or versions. `quantize="int8"`: a dynamically int8-quantized encoder
        (CPU only), faster on new queries (docs/benchmarks.md gives its speed and AUC)."""
        manifest = read_manifest(path)
        estimator = LearnedEstimator.load(path, device=device, quantize=quantize)
        if estimator.models != list(manifest["models"]):
            raise ValueError(f"{path}: estimator.json and manifest.json list different models; export it again")
        router = cls(estimator, manifest, budget=budget, mode=mode, device=device, seed=seed, cache_size=cache_size)
        router.path = Path(path)
        return router

    # -- strategies ---------------------------------------------------------------------------
    @property
    def budget_range(self) -> tuple[float, float]:
        return self.budgets[0], self.budgets[-1]

    def _check_mode(self, mode: str) -> None:
        if mode not in SERVING_MODES:
            raise ValueError(f"mode must be one of {SERVING_MODES}, got {mode!r}")
        if mode not in self.manifest["strategies"]:
            raise ValueError(
                f"mode {mode!r} was not calibrated in this checkpoint; available: {sorted(self.manifest['strategies'])}"
            )

    def _check_budget(self, budget: float) -> float:
        lo, hi = self.budget_range
        if isinstance(budget, bool) or not isinstance(budget, numbers.Real):
            raise ValueError(
                f"budget must be a number in the calibrated range [{lo:.6g}, {hi:.6g}] (USD per query), got "
                f"{type(budget).__name__} {budget!r}"
            )
        if not lo <= budget <= hi or not math.isfinite(budget):  # the comparisons first: exact for huge integers
            raise ValueError(
                f"budget {budget!r} is outside the calibrated range [{lo:.6g}, {hi:.6g}] (USD per query); "
                "choose a budget inside it or recalibrate with other budgets"
            )
        return float(budget)

    def strategy(self, budget: float | None = None, mode: str | None = None) -> Strategy:
        """The calibrated strategy for a budget: λs, thresholds and γ interpolated linearly between the
        two nearest calibrated budgets (exactly the calibrated one at a calibrated budget)."""
        mode = self.mode if mode is None else mode
        self._check_mode(mode)
        budget = self.budget if budget is None else self._check_budget(budget)
        fits = [Strategy.from_dict(s) for s in self.manifest["strategies"][mode]]
        budgets = self.budgets
        i = max(j for j in range(len(budgets)) if budgets[j] <= budget)
        if i == len(budgets) - 1 or budgets[i] == budget:
            return fits[i].replace(budget=budget)
        w = (budget - budgets[i]) / (budgets[i + 1] - budgets[i])
        a, b = fits[i], fits[i + 1]

        def mix(x, y):
            return [(1 - w) * u + w * v for u, v in zip(x, y)]

        return a.replace(
            lambdas=mix(a.lambdas, b.lambdas),
            thresholds=mix(a.thresholds, b.thresholds),
            gamma=(1 - w) * a.gamma + w * b.gamma,
            budget=budget,
        )

    # -- inputs ------------------------------------------------------------------------------
    def check(self, queries, observed=None, sources=None) -> list[list[dict]]:
        """Validate a batch; returns `observed` normalized (one list per query). Raises ValueError naming
        the query index and field."""
        if not isinstance(queries, (list, tuple)):
            raise ValueError(f"queries must be a list of strings, got {type(queries).__name__}")
        for i, q in enumerate(queries):
            if not isinstance(q, str):
                raise ValueError(f"queries[{i}] must be a string, got {type(q).__name__}")
            try:
                q.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError(f"queries[{i}] is not valid Unicode text (it holds a lone surrogate)") from None
        n = len(queries)
        if observed is None:
            observed = [[] for _ in range(n)]
        if not isinstance(observed, (list, tuple)) or len(observed) != n:
            got = len(observed) if isinstance(observed, (list, tuple)) else type(observed).__name__
            raise ValueError(f"observed must have one list per query: {n} queries, got {got}")
        if sources is not None and (not isinstance(sources, (list, tuple)) or len(sources) != n):
            raise ValueError(f"sources must be None or one string per query ({n})")
        for i, source in enumerate(sources or []):
            if not isinstance(source, str):
                raise ValueError(f"sources[{i}] must be a string, got {type(source).__name__}")
        for i, seen in enumerate(observed):
            if not isinstance(seen, (list, tuple)):
                raise ValueError(f"observed[{i}] must be a list of {{model, answer, ...}} objects")
            names = set()
            for j, item in enumerate(seen):
                where = f"observed[{i}][{j}]"
                if not isinstance(item, dict):
                    raise ValueError(f"{where} must be an object with a 'model' field, got {type(item).__name__}")
                unknown = sorted(set(item) - set(OBSERVATION_FIELDS))
                if unknown:
                    raise ValueError(f"{where} has unknown field(s) {unknown}; allowed: {list(OBSERVATION_FIELDS)}")
                model = item.get("model")
                if not isinstance(model, str) or model not in self._index:
                    raise ValueError(f"{where}.model {model!r} is not in the checkpoint; models: {self.models}")
                if model in names:
                    raise ValueError(f"observed[{i}]: model {model!r} is observed twice")
                names.add(model)
                answer = item.get("answer")
                if answer is not None and not isinstance(answer, str):
                    raise ValueError(f"{where}.answer must be a string or null, got {type(answer).__name__}")
                for key, low in (("confidence", None), ("tokens_out", 0.0), ("cost", 0.0)):
                    value = item.get(key)
                    if value is None:
                        continue
                    if isinstance(value, bool) or not isinstance(value, (int, float)):
                        raise ValueError(f"{where}.{key} must be a number, got {value!r}")
                    if isinstance(value, int) and abs(value) > sys.float_info.max:
                        raise ValueError(f"{where}.{key} is an integer beyond any float; pass a finite number")
                    if math.isnan(value) or value == math.inf or (key != "confidence" and not math.isfinite(value)):
                        raise ValueError(f"{where}.{key} is {value}; pass a finite number or leave it out")
                    if low is not None and value < low:
                        raise ValueError(f"{where}.{key} must be >= {low}, got {value}")
        return [list(seen) for seen in observed]

    def _table(self, queries: list[str], observed: list[list[dict]], sources) -> tuple[RoutingTable, torch.Tensor]:
        """The batch as a routing table of what is known (qualities unknown), and the run matrix."""
        n, k = len(queries), len(self.models)
        nan = torch.full((n, k), math.nan, dtype=torch.float64)
        confidence, tokens_out, cost = nan.clone(), nan.clone(), nan.clone()
        answers: list[list[str | None]] = [[None] * k for _ in range(n)]
        run = torch.zeros(n, k, dtype=torch.bool)
        for i, seen in enumerate(observed):
            for item in seen:
                j = self._index[item["model"]]
                run[i, j] = True
                answers[i][j] = item.get("answer")
                if item.get("confidence") is not None:
                    confidence[i, j] = max(float(item["confidence"]), -100.0)  # -inf: an underflowed log-prob
                if item.get("tokens_out") is not None:
                    tokens_out[i, j] = float(item["tokens_out"])
                if item.get("cost") is not None:
                    cost[i, j] = float(item["cost"])
        table = RoutingTable(
            models=list(self.models),
            query_ids=[str(i) for i in range(n)],
            queries=list(queries),
            sources=[str(s) for s in sources] if sources is not None else [""] * n,
            is_test=torch.ones(n, dtype=torch.bool),
            quality=nan.clone(),
            cost=cost,
            answers=answers,
            confidence=confidence,
            tokens_out=tokens_out,
        )
        return table, run

    def _embeddings(self, queries: list[str]) -> torch.Tensor:
        """Embeddings from the bounded in-memory cache; each new text is encoded once, in one batch."""
        missing = list(dict.fromkeys(q for q in queries if q not in self._cache))
        if missing:
            fresh = self.estimator._encoder().encode(missing)
            for text, vector in zip(missing, fresh):
                self._cache[text] = vector
        for q in queries:
            self._cache.move_to_end(q)
        vectors = torch.stack([self._cache[q] for q in queries]) if queries else torch.empty(0, 0)
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return vectors

    def _expensive(self, queries: list[str], gamma: float) -> torch.Tensor:
        """Per-query tie-break: towards the most expensive supermodel with probability γ, the same draw at
        every step of a query (a hash of the seed and the query text)."""
        draws = [
            int.from_bytes(hashlib.sha256(f"{self.seed}\0{q}".encode()).digest()[:8], "big") / 2**64 for q in queries
        ]
        return torch.tensor(draws, dtype=torch.float64) < gamma

    # -- routing -----------------------------------------------------------------------------
    def route_batch(
        self,
        queries: list[str],
        observed: list[list[dict]] | None = None,
        budget: float | None = None,
        *,
        mode: str | None = None,
        sources: list[str] | None = None,
    ) -> list[Decision]:
        """Next step for every query: `observed[i]` lists what query i has seen, each
        `{"model", "answer", "confidence"?, "tokens_out"?, "cost"?}`; `budget` (USD per query) and `mode`
        default to the router's; `sources` optionally tags each query's task as in the training table."""
        observed = self.check(queries, observed, sources)
        strategy = self.strategy(budget, mode)
        if not queries:
            return []
        with self._lock:
            table, run = self._table(list(queries), observed, sources)
            features = self.estimator.featurize(table, embeddings=self._embeddings(list(queries)))
            estimate = self.estimator.predict(features, torch.arange(len(queries)), run)
            out = decide(
                estimate.quality.to(self.device),
                estimate.cost.to(self.device),
                run.to(self.device),
                strategy,
                cov=None if estimate.cov is None else estimate.cov.to(self.device),
                expensive=self._expensive(list(queries), strategy.gamma).to(self.device),
                config=self.kernel,
            )
        return self._decisions(out, run, estimate)

    def _decisions(self, out, run: torch.Tensor, estimate) -> list[Decision]:
        names = self.models
        decisions = []
        for i, (nxt, ans, plan) in enumerate(
            zip(out.next_model.tolist(), out.answer_model.tolist(), out.supermodel.tolist())
        ):
            decisions.append(
                Decision(
                    next_model=names[nxt] if nxt >= 0 else None,
                    answer_model=names[ans] if ans >= 0 else None,
                    step=int(run[i].sum()),
                    quality=dict(zip(names, estimate.quality[i].tolist())),
                    cost=dict(zip(names, estimate.cost[i].tolist())),
                    plan=[names[j] for j in range(len(names)) if (plan >> j) & 1],
                )
            )
        return decisions
