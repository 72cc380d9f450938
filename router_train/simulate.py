"""Simulate strategies over a table whose every model output is known: all queries in lock-step.

Every query starts with no model run; at each step the kernel picks the next model (or stop) for all
active queries at once, the picked model's real output is "observed" from the table, and the next
step follows. The estimates and the candidate supermodels of each visited state (query, run set) do
not depend on λ, so they are computed once, pruned to those some λ >= 0 can select, and turned into
the state's decision as a function of λ (`kernel.lambda_table`: the next model per interval of λ), which
is cached with the state's estimates and a pointer to each successor state: calibration then evaluates
hundreds of strategies at the cost of a few table reads per step each. The candidates themselves are
not kept (their width times the states was most of the memory): the rare λ within rounding distance of
a breakpoint rebuilds those states' candidates from the cached estimates and decides them with `choose`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from estimators.base import Estimate, Features, QualityEstimator

from .kernel import (
    Candidates, KernelConfig, answer_models, check_model_count, choose, factorize, run_masks, step_candidates,
)
from .kernel.decide import chunk_rows, scaled_cov, threshold_go
from .kernel.lambda_table import LambdaTable
from .kernel.prune import prune
from .strategy import Strategy
from .table import RoutingTable


@dataclass
class Outcome:
    """What a strategy did on each query: realized true cost and quality, answer model, models run."""

    cost: torch.Tensor  # (n,) float64
    quality: torch.Tensor  # (n,) float64
    answer: torch.Tensor  # (n,) long
    run: torch.Tensor  # (n, k) bool
    ranges: torch.Tensor | None = None  # if tracked, (multipliers, n, 2): per λ_t (or threshold θ_t) and query,
    # the open range around its value in which every decision of that query, hence its outcome, stays the same

    @staticmethod
    def cat(parts: list["Outcome"]) -> "Outcome":
        """The outcomes (without ranges) of consecutive blocks of queries as one."""
        return Outcome(*(torch.cat([getattr(p, f) for p in parts]) for f in ("cost", "quality", "answer", "run")))

    @property
    def mean_cost(self) -> float:
        return float(self.cost.mean())

    @property
    def mean_quality(self) -> float:
        return float(self.quality.mean())


class _Rows:
    """A tensor that grows by rows into spare capacity (×1.5), so appending is amortized in the new rows
    rather than a copy of everything so far; 2-D rows are padded to the widest seen (`_pad_to`). The
    first rows are stored without spare room: most stores get all their rows at once."""

    def __init__(self) -> None:
        self.buffer: torch.Tensor | None = None
        self.size = 0

    def append(self, value: torch.Tensor) -> None:
        m = value.shape[0]
        if self.buffer is None:
            self.buffer = torch.empty((m,) + tuple(value.shape[1:]), dtype=value.dtype)
        if value.dim() == 2 and value.shape[1] != self.buffer.shape[1]:
            width = max(value.shape[1], self.buffer.shape[1])
            value, self.buffer = _pad_to(value, width), _pad_to(self.buffer, width)
        if self.size + m > self.buffer.shape[0]:
            grown = torch.empty((max(3 * self.buffer.shape[0] // 2, self.size + m),) + tuple(self.buffer.shape[1:]),
                                dtype=self.buffer.dtype)
            grown[: self.size] = self.buffer[: self.size]
            self.buffer = grown
        self.buffer[self.size : self.size + m] = value
        self.size += m

    @property
    def data(self) -> torch.Tensor:
        """The rows appended so far (a view: writes go to the buffer)."""
        return self.buffer[: self.size]


class _LambdaRows:
    """The λ tables of a store's states, grown batch of states by batch into spare capacity (`_Rows`) and
    read as one `LambdaTable` of views: adding states costs their tables, not a copy of all so far."""

    def __init__(self) -> None:
        self.rows = {name: _Rows() for name in ("breaks", "offsets", "pick", "safe", "span")}
        self.rows["offsets"].append(torch.zeros(1, dtype=torch.long))

    def append(self, table: LambdaTable) -> None:
        breaks, intervals = self.rows["breaks"].size, self.rows["pick"].size
        self.rows["span"].append(table.span + torch.tensor([breaks, breaks, intervals]))
        self.rows["offsets"].append(table.offsets[1:] + breaks)
        for name in ("breaks", "pick", "safe"):
            self.rows[name].append(getattr(table, name))

    @property
    def table(self) -> LambdaTable:
        return LambdaTable(**{name: rows.data for name, rows in self.rows.items()})


class _StateStore:
    """Tensors cached per state (row, run set) for one step t, found by a sorted key lookup and, from
    a state of the previous step, by a pointer per next model."""

    def __init__(self, k: int, t: int, n_rows: int, compute) -> None:
        self.radix = math.comb(k, t)
        self.met: _RunSets | None = None
        if n_rows * self.radix >= 2**62:  # too many run sets to rank them all (an uncapped cascade over many
            # models): number the run sets met instead, which are few (one per step for a cascade)
            self.radix, self.met = 2**31, _RunSets()
        else:  # binom[i, m] = C(i, m): the rank of a run set in the combinatorial number system
            self.binom = torch.tensor([[math.comb(a, b) for b in range(k + 1)] for a in range(k)], dtype=torch.long)
        self.k, self.t = k, t
        self.compute = compute  # (rows, run) -> dict of per-state tensors
        self.size = 0  # states held
        self.levels: list[tuple[torch.Tensor, torch.Tensor]] = []  # sorted (keys, slots) runs, sizes shrinking
        self.rows: dict[str, _Rows] = {}  # per-state tensors by name
        self.children = _Rows()  # int32 slot in the next step's store after running model m; -1: not looked up
        self.root: torch.Tensor | None = None  # slots of (row, no model run) for every row, at t = 0
        self.tables = _LambdaRows()  # next model (-1: stop) as a function of λ, per state (candidate stores)

    @property
    def lambdas(self) -> LambdaTable:
        """The λ tables of the states so far, as one table."""
        return self.tables.table

    def key(self, rows: torch.Tensor, run: torch.Tensor) -> torch.Tensor:
        if self.met is not None:
            return rows * self.radix + self.met.number(run_masks(run))
        members = run.long()
        position = torch.arange(run.shape[1]).unsqueeze(0).expand_as(members)
        rank = (members * self.binom[position, members.cumsum(1)]).sum(1)
        return rows * self.radix + rank

    def find(self, keys: torch.Tensor) -> torch.Tensor:
        """Slot of each key, -1 where not cached: a binary search in each sorted run of keys."""
        slots = torch.full_like(keys, -1)
        for held, at in self.levels:
            pos = torch.searchsorted(held, keys).clamp(max=held.numel() - 1)
            slots = torch.where(held[pos] == keys, at[pos], slots)
        return slots

    def lookup(self, rows: torch.Tensor, run: torch.Tensor) -> torch.Tensor:
        """Slots of the states (rows, run), computing the missing ones (each once)."""
        keys = self.key(rows, run)
        slots = self.find(keys)
        missing = (slots < 0).nonzero().squeeze(1)
        if missing.numel():
            new_keys, first = _unique_first(keys[missing])
            sel = missing[first]
            self.add(new_keys, self.compute(rows[sel], run[sel]))
            slots = self.find(keys)
        return slots

    @property
    def data(self) -> dict[str, torch.Tensor]:
        """Per-state tensors by name, rows in slot order."""
        return {name: rows.data for name, rows in self.rows.items()}

    @property
    def child(self) -> torch.Tensor:
        """(S, k) slot of each state's successor per next model in the next step's store (-1: unknown)."""
        return self.children.data

    def add(self, keys: torch.Tensor, data: dict[str, torch.Tensor]) -> None:
        """Hold new states (keys not held yet) with their data. Their keys become a sorted run, merged with the
        last runs while those are at most twice as large (a log-structured merge: each key is merged
        O(log S) times, where merging into one sorted array cost O(S) per batch of new states)."""
        start = self.size
        if start + keys.numel() >= 2**31:  # the successor pointers are int32
            raise ValueError(f"more than 2^31 states cached at step {self.t}: simulate fewer queries at once")
        for name, value in data.items():
            self.rows.setdefault(name, _Rows()).append(value)
        self.children.append(torch.full((keys.numel(), self.k), -1, dtype=torch.int32))
        self.size += keys.numel()
        order = keys.argsort()
        self.levels.append((keys[order], start + order))
        while len(self.levels) > 1 and self.levels[-2][0].numel() <= 2 * self.levels[-1][0].numel():
            newer, older = self.levels.pop(), self.levels.pop()
            self.levels.append(_merge(older, newer))


class _RunSets:
    """Numbers the run sets (bitmasks) met so far 0, 1, 2, … in order of first meeting, for state keys where
    ranking every run set of a step would overflow int64."""

    def __init__(self) -> None:
        self.masks = torch.zeros(0, dtype=torch.long)  # sorted
        self.numbers = torch.zeros(0, dtype=torch.long)  # number of each sorted mask

    def number(self, masks: torch.Tensor) -> torch.Tensor:
        new = masks.unique()
        if self.masks.numel():
            pos = torch.searchsorted(self.masks, new).clamp(max=self.masks.numel() - 1)
            new = new[self.masks[pos] != new]
        if new.numel():
            if self.numbers.numel() + new.numel() > 2**31:
                raise ValueError("more than 2^31 distinct run sets at one step: simulate fewer queries at once")
            held = torch.cat([self.masks, new])
            numbers = torch.cat([self.numbers, self.numbers.numel() + torch.arange(new.numel())])
            order = held.argsort()
            self.masks, self.numbers = held[order], numbers[order]
        return self.numbers[torch.searchsorted(self.masks, masks)]


def _pad_to(x: torch.Tensor, width: int) -> torch.Tensor:
    """Pad an (N, M) tensor to `width` columns: bool with False (invalid), others repeating column 0."""
    extra = width - x.shape[1]
    if extra <= 0:
        return x
    tail = torch.zeros(x.shape[0], extra, dtype=x.dtype) if x.dtype == torch.bool else x[:, :1].expand(-1, extra)
    return torch.cat([x, tail], 1)


SIMULATION_BLOCK = 1 << 15
"""Queries simulated together: a block's per-step tensors (a few hundred KiB) stay in the CPU's caches, so
a simulation's time grows with the queries, without slowing down once they outgrow the caches."""
TABLE_STATES = 1 << 15
"""States whose candidates are built (and turned into λ tables) at once: bounds that transient memory."""

PREFIX_MODES = ("cascade", "threshold_cascade")
"""Modes whose run sets are prefixes of the model order: `Simulator` reads all their decisions at once."""


@dataclass
class _PrefixStates:
    """Every prefix state (row, first t models) of a cascade structure, by step t: their slots in the
    step's store; for the cascade per step a λ table of the rows whose picks are 1 (go on) / 0 (stop),
    and the answer model at each t <= depth; for the thresholding cascade the estimate of model t - 1 at t."""

    depth: int
    slots: list
    tables: list | None = None  # per step t < depth: LambdaTable with state r = query r
    answers: torch.Tensor | None = None  # (depth + 1, n)
    quality: torch.Tensor | None = None  # (depth - 1, n): at step t (1..depth-1), q̂ of model t - 1


class Simulator:
    """Runs strategies on a fully observed table with an estimator, caching the λ-independent work."""

    def __init__(
        self,
        table: RoutingTable,
        estimator: QualityEstimator,
        *,
        features: Features | None = None,
        kernel: KernelConfig = KernelConfig(),
        batch_size: int = 4096,
    ) -> None:
        check_model_count(table.k, "Simulator: the table")
        self.table = table
        self.estimator = estimator
        self.features = estimator.featurize(table) if features is None else features
        self.kernel = kernel
        self.batch_size = batch_size
        self.n, self.k = table.n, table.k
        self._stores: dict[tuple, _StateStore] = {}
        self._prefix: dict[tuple, _PrefixStates] = {}
        self._kept: dict[int, _StateStore] | None = None  # per step: the estimator's outputs, while kept

    @contextmanager
    def keeping_estimates(self) -> Iterator[None]:
        """Keep every state's estimates (q̂, ĉ, Σ) while inside: a sweep over Σ multipliers builds one
        candidate store per multiplier from the same states' estimates, which the estimator (a network
        per cross-fitting fold and ensemble member) then computes once. Dropped on leaving the outermost
        block (Σ is k² numbers per state)."""
        if self._kept is not None:
            yield
            return
        self._kept = {}
        try:
            yield
        finally:
            self._kept = None

    # -- cached state data ------------------------------------------------------------------
    def _predict(self, rows: torch.Tensor, run: torch.Tensor) -> Iterator[tuple[torch.Tensor, Estimate]]:
        """The estimator's outputs for states in batches of `batch_size`: yields (run, Estimate)."""
        for i in range(0, rows.numel(), self.batch_size):
            sl = slice(i, i + self.batch_size)
            yield run[sl], self.estimator.predict(self.features, rows[sl], run[sl])

    def _batches(self, rows: torch.Tensor, run: torch.Tensor, t: int) -> Iterator[tuple[torch.Tensor, Estimate]]:
        """Estimates for states with t models run, in batches: from the estimator, or from the kept ones."""
        if self._kept is None:
            yield from self._predict(rows, run)
            return
        if t not in self._kept:

            def compute(rows, run):
                parts = [(est.quality, est.cost, est.cov) for _, est in self._predict(rows, run)]
                data = {"quality": torch.cat([p[0] for p in parts]), "cost": torch.cat([p[1] for p in parts])}
                if parts[0][2] is not None:
                    data["cov"] = torch.cat([p[2] for p in parts])
                return data

            self._kept[t] = _StateStore(self.k, t, self.n, compute)
        store = self._kept[t]
        slots = store.lookup(rows, run)
        data = store.data
        for i in range(0, rows.numel(), self.batch_size):
            sl = slots[i : i + self.batch_size]
            yield run[i : i + self.batch_size], Estimate(quality=data["quality"][sl], cost=data["cost"][sl],
                                                         cov=data["cov"][sl] if "cov" in data else None)

    def _estimate_store(self, t: int) -> _StateStore:
        """Estimates (and answer models) of the states with t models run."""
        key = ("estimates", t)
        if key not in self._stores:

            def compute(rows, run):
                quality = torch.cat([est.quality.to(torch.float64) for _, est in self._batches(rows, run, t)])
                return {"quality": quality, "answer": answer_models(quality, run)}

            self._stores[key] = _StateStore(self.k, t, self.n, compute)
        return self._stores[key]

    def _candidate_key(self, strategy: Strategy, t: int) -> tuple:
        """What the candidates of step t depend on: the strategy's structure, not its multipliers."""
        return ("candidates", strategy.mode == "cascade", strategy.force_order, min(strategy.max_depth, self.k),
                strategy.sigma_scale, t)

    def _candidate_store(self, strategy: Strategy, t: int) -> _StateStore:
        """The states with t models run for the strategy's structure: their next model as a function of λ
        (the λ table of their pruned candidates), answer model, and the estimates the candidates are
        built from (`_candidates` rebuilds them where λ sits on a breakpoint)."""
        key = self._candidate_key(strategy, t)
        if key in self._stores:
            return self._stores[key]

        def compute(rows, run):
            states: dict[str, list[torch.Tensor]] = {"answer": [], "quality": [], "cost": [], "run": [], "factor": []}
            for part_run, est in self._batches(rows, run, t):
                states["answer"].append(answer_models(est.quality, part_run))
                factor = factorize(scaled_cov(est.cov, strategy.sigma_scale), dtype=self.kernel.dtype, validate=False)
                states["quality"].append(est.quality)
                states["cost"].append(est.cost)
                states["run"].append(part_run)
                if factor is not None:
                    states["factor"].append(factor)
            factors = states.pop("factor")
            data = {name: torch.cat(parts) for name, parts in states.items()}
            if factors:  # one layout per store: standard deviations while every Σ is diagonal, else full
                held = store.rows.get("factor")
                full = any(f.dim() == 3 for f in factors) or (held is not None and held.buffer.dim() == 3)
                if full:
                    factors = [torch.diag_embed(f) if f.dim() == 2 else f for f in factors]
                    if held is not None and held.buffer.dim() == 2:
                        held.buffer = torch.diag_embed(held.buffer)  # their rows stay flagged `diagonal`
                data["factor"] = torch.cat(factors)
                data["diagonal"] = torch.full((data["run"].shape[0],), not full)  # the layout their table used
            self._next_model_tables(strategy, data, store.tables)
            return data

        store = self._stores[key] = _StateStore(self.k, t, self.n, compute)
        return store

    def _candidates(self, strategy: Strategy, data: dict[str, torch.Tensor]) -> Candidates:
        """The pruned candidates of states from their cached estimates (`data` rows), widened to one width."""
        parts = []
        chunk = chunk_rows(self.k, int(data["run"][0].sum()) if len(data["run"]) else 0, strategy, self.kernel,
                           data["quality"].device)
        for j in range(0, data["run"].shape[0], chunk):
            sl = slice(j, j + chunk)
            factor = data["factor"][sl] if "factor" in data else None
            cands = step_candidates(data["quality"][sl], factor, data["cost"][sl], data["run"][sl], strategy, self.kernel)
            parts.append(prune(cands))
        width = max(p.value.shape[1] for p in parts)
        return Candidates.cat([_widen(p, width) for p in parts])

    def _next_model_tables(self, strategy: Strategy, data: dict[str, torch.Tensor], into: _LambdaRows) -> None:
        """Append to `into` the λ tables of states whose picks are next models (-1: stop) rather than candidate
        columns, built `TABLE_STATES` states at a time so that their candidates never all exist at once."""
        for i in range(0, data["run"].shape[0], TABLE_STATES):
            merged = self._candidates(strategy, {name: v[i : i + TABLE_STATES] for name, v in data.items()})
            table = LambdaTable.build(merged.value.to(torch.float64), merged.cost, merged.valid,
                                      tie_tol=self.kernel.tie_tol)
            first = merged.table.first[merged.index]
            nxt = torch.where(first >= 0, merged.comp.gather(1, first.clamp(min=0)), -1)
            counts = table.offsets[1:] - table.offsets[:-1] + 1  # intervals per state
            state = torch.repeat_interleave(torch.arange(counts.numel()), counts)
            pick = nxt[state.unsqueeze(1), table.pick.long()].to(torch.int16)
            into.append(LambdaTable(table.breaks, table.offsets, pick, table.safe))

    def _choose_next(self, strategy: Strategy, store: _StateStore, slots: torch.Tensor, lam: float,
                     expensive: torch.Tensor) -> torch.Tensor:
        """Next model of states by `choose` on their rebuilt candidates (for λ on a breakpoint), each rebuilt
        with the Σ factor layout its λ table was built with, so the values are the same."""
        data = {name: rows.data.index_select(0, slots) for name, rows in store.rows.items()}
        nxt = torch.empty(slots.numel(), dtype=torch.long)
        flags = data.get("diagonal", torch.ones(slots.numel(), dtype=torch.bool))
        for diagonal in (True, False):
            sel = (flags == diagonal).nonzero().squeeze(1)
            if sel.numel() == 0:
                continue
            part = {name: v.index_select(0, sel) for name, v in data.items()}
            if diagonal and "factor" in part and part["factor"].dim() == 3:
                part["factor"] = part["factor"].diagonal(dim1=1, dim2=2)
            cands = self._candidates(strategy, part)
            nxt[sel] = cands.next_model(choose(cands, lam, expensive[sel], tie_tol=self.kernel.tie_tol))
        return nxt

    def _step_store(self, strategy: Strategy, t: int) -> _StateStore:
        """The store a strategy reads at step t: candidates, or estimates for the thresholding cascade
        and at the depth cap (where every query stops)."""
        if strategy.mode == "threshold_cascade" or t >= min(strategy.max_depth, self.k):
            return self._estimate_store(t)
        return self._candidate_store(strategy, t)

    def _next_models(
        self, strategy: Strategy, store: _StateStore, slots: torch.Tensor, lam: float, expensive: torch.Tensor,
        track: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Next model (-1: stop) of each state at λ, from the λ table (rows whose λ is within rounding
        distance of a breakpoint are decided by `choose`), and, if `track`, per state the range of λ keeping
        its decision."""
        nxt, sure, stable = store.lambdas.lookup(slots, lam, expensive, stable=track)
        unsure = (~sure).nonzero().squeeze(1)
        if unsure.numel():
            nxt[unsure] = self._choose_next(strategy, store, slots[unsure], lam, expensive[unsure])
        return nxt, stable

    def _children(
        self, store: _StateStore, target: _StateStore, slots: torch.Tensor, nxt: torch.Tensor, rows: torch.Tensor,
        run: torch.Tensor, active: torch.Tensor,
    ) -> torch.Tensor:
        """Slots in `target` of the states reached from `slots` by running `nxt`; they belong to the queries
        `rows[active]`, whose new run sets are `run[active]`."""
        flat = slots * self.k + nxt
        child = store.child.view(-1).index_select(0, flat).long()
        missing = (child < 0).nonzero().squeeze(1)
        if missing.numel():
            at = active[missing]
            found = target.lookup(rows[at], run[at])
            child[missing] = found
            store.child.view(-1)[flat[missing]] = found.to(torch.int32)
        return child

    # -- running strategies -----------------------------------------------------------------
    def run(
        self, strategy: Strategy, expensive: bool | torch.Tensor = False, *, track: bool = False,
        rows: torch.Tensor | None = None,
    ) -> Outcome:
        """Run a strategy on every query (or the queries `rows`, in that order) with the given tie-break (all
        cheap, all expensive, or per query of the table); `track`: also find per query the ranges of the
        multipliers that keep its outcome (`Outcome.ranges`).

        Each query walks its states step by step: a state's decision comes from its cached λ table,
        the next state from its cached pointer; only states never visited before are computed. The work is
        in the queries run, so calibration can re-run just those whose outcome may change; they run in
        blocks of `SIMULATION_BLOCK`, whose per-step tensors stay in the CPU's caches."""
        n = self.n
        expensive = torch.as_tensor(expensive, dtype=torch.bool).expand(n)
        if rows is not None:
            if rows.dim() != 1 or rows.dtype != torch.long or (rows.numel() and not 0 <= int(rows.min()) <= int(rows.max()) < n):
                raise ValueError(f"rows must be a 1-D torch.long tensor of query indices in [0, {n}), got "
                                 f"{rows.dtype} of shape {tuple(rows.shape)}")
            expensive = expensive.index_select(0, rows)
        rows = torch.arange(n) if rows is None else rows
        walk = self._run_prefix if strategy.mode in PREFIX_MODES else self._run_states
        multipliers = len(strategy.thresholds if strategy.mode == "threshold_cascade" else strategy.lambdas)
        ranges = _unbounded(multipliers, rows.numel()) if track else None  # written block by block
        blocks = [
            walk(strategy, rows[i : i + SIMULATION_BLOCK], expensive[i : i + SIMULATION_BLOCK],
                 None if ranges is None else ranges[:, i : i + SIMULATION_BLOCK])
            for i in range(0, rows.numel(), SIMULATION_BLOCK)
        ]
        outcome = blocks[0] if len(blocks) == 1 else Outcome.cat(blocks)
        outcome.ranges = ranges
        return outcome

    def _run_states(self, strategy: Strategy, rows: torch.Tensor, expensive: torch.Tensor,
                    ranges: torch.Tensor | None) -> Outcome:
        """A run of the queries `rows` that walks each one's states (any mode but the cascades); where `ranges`
        is given, each query's range of every multiplier that keeps its decisions is written there."""
        n, k = self.n, self.k
        m = rows.numel()
        run = torch.zeros(m, k, dtype=torch.bool)
        active = torch.arange(m)  # positions in `rows` of the queries still running
        answer = torch.full((m,), -1, dtype=torch.long)
        depth = min(strategy.max_depth, k)
        track = ranges is not None
        store = self._step_store(strategy, 0)
        if store.root is None:
            store.root = store.lookup(torch.arange(n), torch.zeros(n, k, dtype=torch.bool))
        slots = store.root.index_select(0, rows)
        for t in range(depth + 1):
            if active.numel() == 0:
                break
            if t == depth:  # every query stops: the best estimated model run answers
                answer[active] = store.data["answer"].index_select(0, slots)
                break
            dear = expensive.index_select(0, active)
            nxt, rng = self._next_models(strategy, store, slots, strategy.lambdas[t], dear, track)
            if track:
                ranges[t, active] = rng
            stop = nxt < 0
            if stop.any():
                answer[active[stop]] = store.data["answer"][slots[stop]]
                go = (~stop).nonzero().squeeze(1)
                active, slots, nxt = active[go], slots[go], nxt[go]
            run[active, nxt] = True
            target = self._step_store(strategy, t + 1)
            slots = self._children(store, target, slots, nxt, rows, run, active)
            store = target
        return self._outcome(rows, run, answer)

    def _outcome(self, rows: torch.Tensor, run: torch.Tensor, answer: torch.Tensor) -> Outcome:
        """The realized cost and quality of the queries `rows` from the models they ran and their answers."""
        cost = (self.table.cost.index_select(0, rows) * run).sum(1)
        quality = self.table.quality.index_select(0, rows).gather(1, answer.clamp(min=0).unsqueeze(1)).squeeze(1)
        return Outcome(cost=cost, quality=quality, answer=answer, run=run)

    # -- the cascades: every query's run sets are prefixes of the model order ---------------------
    def _prefix_states(self, strategy: Strategy) -> _PrefixStates:
        """All prefix states (row, first t models) of the cascade's structure, t < depth, read at once."""
        depth = min(strategy.max_depth, self.k)
        threshold = strategy.mode == "threshold_cascade"
        key = ("prefix", threshold, depth) + (() if threshold else self._candidate_key(strategy, 0)[1:-1])
        if key in self._prefix:
            return self._prefix[key]
        n = self.n
        rows = torch.arange(n)
        order = torch.arange(self.k).unsqueeze(0)
        slots, answers, tables, estimates = [], [], [], []
        for t in range(depth + 1):
            run = (order < t).expand(n, -1)
            store = self._step_store(strategy, t)
            slot = store.lookup(rows, run)
            slots.append(slot)
            if threshold:
                if 0 < t < depth:
                    estimates.append(store.data["quality"][slot, t - 1])
                continue
            answers.append(store.data["answer"][slot])
            if t < depth:  # each interval's pick as "go on" (1) or "stop" (0)
                sub = store.lambdas.reorder(slot)  # state r = query r
                tables.append(LambdaTable(sub.breaks, sub.offsets, sub.pick.ge(0).to(torch.int16), sub.safe))
        states = _PrefixStates(depth=depth, slots=slots)
        if threshold:
            states.quality = torch.stack(estimates) if estimates else torch.empty(0, n, dtype=torch.float64)
        else:
            states.answers = torch.stack(answers)
            states.tables = tables
        self._prefix[key] = states
        return states

    def _run_prefix(self, strategy: Strategy, rows: torch.Tensor, expensive: torch.Tensor,
                    ranges: torch.Tensor | None) -> Outcome:
        """A cascade run: the state after t models is the same for every path, so each step reads the
        decisions of the queries still running from the stacked prefix states (as `run` step by step,
        without walking state pointers); a query's answer is read once it stops."""
        k = self.k
        states = self._prefix_states(strategy)
        depth = states.depth
        threshold = strategy.mode == "threshold_cascade"
        m = rows.numel()
        steps = torch.full((m,), depth, dtype=torch.long)  # models run per query
        active = torch.arange(m)  # positions in `rows` of the queries still running
        track = ranges is not None
        for t in range(depth):
            if active.numel() == 0:
                break
            dear = expensive.index_select(0, active)
            queries = rows.index_select(0, active)
            if threshold:
                if t == 0:
                    continue  # the first model always runs
                quality = states.quality[t - 1].index_select(0, queries)
                go = threshold_go(quality, strategy.thresholds[t - 1], dear, self.kernel.tie_tol)
                if track:
                    ranges[t - 1, active] = _threshold_ranges(quality, strategy.thresholds[t - 1], self.kernel.tie_tol)
            else:
                flags, sure, rng = states.tables[t].lookup(queries, strategy.lambdas[t], dear, stable=track)
                unsure = (~sure).nonzero().squeeze(1)
                if unsure.numel():  # λ within rounding distance of a breakpoint: `choose`
                    store = self._candidate_store(strategy, t)
                    slots = states.slots[t].index_select(0, queries[unsure])
                    flags[unsure] = self._choose_next(strategy, store, slots, strategy.lambdas[t], dear[unsure]).ge(0).long()
                go = flags.bool()
                if track:
                    ranges[t, active] = rng
            stop = (~go).nonzero().squeeze(1)
            if stop.numel():
                steps[active[stop]] = t
                active = active[go]
        run = torch.arange(k).unsqueeze(0) < steps.unsqueeze(1)
        if threshold:
            answer = steps - 1
        else:
            answer = states.answers.index_select(1, rows).gather(0, steps.unsqueeze(0)).squeeze(0)
        return self._outcome(rows, run, answer)

    def expected(self, strategy: Strategy) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-query expected (cost, quality) of a strategy that breaks ties expensively with probability γ."""
        cheap = self.run(strategy, False)
        if strategy.gamma == 0.0:
            return cheap.cost, cheap.quality
        dear = self.run(strategy, True)
        g = strategy.gamma
        return (1 - g) * cheap.cost + g * dear.cost, (1 - g) * cheap.quality + g * dear.quality


def _unbounded(multipliers: int, m: int) -> torch.Tensor:
    """Per multiplier and query the range (-inf, inf): a query that never reaches a step does not depend on it."""
    inf = float("inf")
    return torch.tensor([-inf, inf], dtype=torch.float64).expand(multipliers, m, 2).clone()


def _threshold_ranges(quality: torch.Tensor, theta: float, tie_tol: float) -> torch.Tensor:
    """Per row, the open range of θ around `theta` in which `threshold_go` decides it as at `theta`: its
    decision changes where q̂ - (1 - θ) crosses ±tie_tol (with a margin for rounding); (θ, θ) for a row
    within that margin of a change."""
    q = quality.to(torch.float64)
    ends = torch.stack([1.0 - q - tie_tol, 1.0 - q + tie_tol], 1)  # (m, 2), ascending
    margin = 1e-9 * (1.0 + ends.abs())
    inf = torch.tensor(float("inf"), dtype=torch.float64)
    low = torch.where(ends < theta, ends + margin, -inf).amax(1)
    high = torch.where(ends > theta, ends - margin, inf).amin(1)
    near = ((ends - theta).abs() <= margin).any(1)
    return torch.where(near.unsqueeze(1), theta, torch.stack([low, high], 1))


def _merge(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Two sorted runs of distinct (keys, slots) as one, in time linear in their sizes."""
    at = torch.searchsorted(a[0], b[0]) + torch.arange(b[0].numel())  # b's keys' positions in the merged run
    from_a = torch.ones(a[0].numel() + b[0].numel(), dtype=torch.bool)
    from_a[at] = False
    keys, slots = torch.empty(from_a.numel(), dtype=torch.long), torch.empty(from_a.numel(), dtype=torch.long)
    keys[at], slots[at] = b
    keys[from_a], slots[from_a] = a
    return keys, slots


def _unique_first(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unique keys and the position of each one's first occurrence."""
    unique, inverse = torch.unique(keys, return_inverse=True)
    first = torch.full((unique.numel(),), keys.numel(), dtype=torch.long)
    first.scatter_reduce_(0, inverse, torch.arange(keys.numel()), reduce="amin")
    return unique, first


def _widen(c: Candidates, width: int) -> Candidates:
    """Pad candidates to `width` columns with invalid copies of the first column."""
    index = c.index if c.index is not None else torch.arange(c.value.shape[1]).expand(len(c), -1)
    return Candidates(
        c.t, c.table, c.comp, c.run_mask, _pad_to(c.value, width), _pad_to(c.cost, width),
        _pad_to(c.valid, width), _pad_to(index, width),
    )
