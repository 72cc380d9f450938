"""The candidate supermodels of one step for a group of queries, and the choice among them.

`build_candidates` does the expensive, λ-independent part (expected max of every candidate);
`choose` applies the cost multiplier and the tie rule. Splitting them lets calibration evaluate
many λs on cached candidates.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from . import fused
from .expected_max import absolute_masks, expected_max, sample_qualities
from .subsets import SubsetTable, prefix_table, run_masks, subset_table

TIE_TOL = 1e-6
"""Two supermodels tie when their values `E[max] - λ cost` differ by at most this much."""
COST_RTOL = 1e-9
"""Among tied supermodels, costs within this relative tolerance count as equal (then: first listed)."""


@dataclass
class Candidates:
    """The supermodels `R ∪ T` that B queries, all with `t` models run, may choose at this step.

    Column j of a row is the table's subset `index[row, j]` (or subset j when `index` is None):
    pruning may keep different subsets per row.
    """

    t: int
    table: SubsetTable
    comp: torch.Tensor  # (B, k - t) long: models not yet run, ascending
    run_mask: torch.Tensor  # (B,) long bitmask of R
    value: torch.Tensor  # (B, M) E[max]
    cost: torch.Tensor  # (B, M) float64 estimated cost of the supermodel
    valid: torch.Tensor  # (B, M) bool: allowed by the mode and depth cap
    index: torch.Tensor | None = None  # (B, M) long: table subset of each column

    def __len__(self) -> int:
        return int(self.value.shape[0])

    def rows(self, rows: torch.Tensor) -> "Candidates":
        """The candidates of a subset of the queries."""
        index = None if self.index is None else self.index[rows]
        return replace(
            self, comp=self.comp[rows], run_mask=self.run_mask[rows], value=self.value[rows],
            cost=self.cost[rows], valid=self.valid[rows], index=index,
        )

    @staticmethod
    def cat(parts: list["Candidates"]) -> "Candidates":
        """Concatenate candidates of the same step and width along the query dimension."""
        first = parts[0]
        index = None if first.index is None else torch.cat([p.index for p in parts])
        fields = ("comp", "run_mask", "value", "cost", "valid")
        return Candidates(first.t, first.table, *(torch.cat([getattr(p, f) for p in parts]) for f in fields), index)

    def subsets(self, pick: torch.Tensor) -> torch.Tensor:
        """Table subset index of the picked column per row."""
        if self.index is None:
            return pick
        return self.index.gather(1, pick.unsqueeze(1)).squeeze(1)

    def next_model(self, pick: torch.Tensor) -> torch.Tensor:
        """Model to run next for the picked column: the lowest-index model of T, -1 when T is empty."""
        first = self.table.first.to(pick.device)[self.subsets(pick)]
        return torch.where(first >= 0, self.comp.gather(1, first.clamp(min=0).unsqueeze(1)).squeeze(1), -1)

    def mask(self, pick: torch.Tensor) -> torch.Tensor:
        """Bitmask of the picked supermodel `R ∪ T`."""
        bits = self.table.bits.to(pick.device)[self.subsets(pick)]  # (B, n)
        weights = torch.ones_like(self.comp) << self.comp
        return self.run_mask | (weights * bits).sum(1)


def free_models(run: torch.Tensor) -> torch.Tensor:
    """Each row's models not yet run, ascending, `(B, k - t)`; all rows must have the same t."""
    t = int(run[0].sum()) if run.shape[0] else 0
    order = torch.argsort(run.to(torch.int8), dim=1, stable=True)
    return order[:, : run.shape[1] - t]


def build_candidates(
    quality: torch.Tensor,
    factor: torch.Tensor | None,
    cost: torch.Tensor,
    run: torch.Tensor,
    z: torch.Tensor,
    *,
    max_depth: int,
    prefix_only: bool = False,
    force_order: bool = False,
    method: str = "auto",
) -> Candidates:
    """Value and cost of every allowed supermodel for B queries with the same number t < max_depth of run models.

    `factor` is a Cholesky factor `(B, k, k)`, standard deviations `(B, k)` for a diagonal Σ, or None
    (then the value of a supermodel is the max of its point estimates). A one-model supermodel is
    valued at that model's estimate exactly, as without Σ. `prefix_only` restricts the candidates to
    prefixes `{m_0..m_j}` of the model order (the paper's optimal cascade; the run set must be a prefix),
    enumerated on their own so the work is linear in k; `force_order` to supermodels whose added models
    all come after the last run one. `method`: `fused` (the C kernel, `fused.py`: the `levels` values
    without their `(B, M, samples)` intermediate; CPU), `levels`, `zeta`, or `auto` (fused on CPU where it
    compiled, else the cheaper torch backend).
    """
    b, k = quality.shape
    device = quality.device
    t = int(run[0].sum()) if b else 0
    table = (prefix_table if prefix_only else subset_table)(k - t, max_depth - t)
    comp = free_models(run)
    x = sample_qualities(quality, factor, z)
    if fused.applies(method, device, x.dtype):
        value, total_cost = fused.candidate_values(x, None if factor is None else quality, cost, run, table)
        run_mask = run_masks(run)
    else:
        if t == 0:  # the same candidates for every row: compute their masks once
            masks = absolute_masks(run[:1], comp[:1], table).expand(b, -1)
        else:
            masks = absolute_masks(run, comp, table)
        value = expected_max(x, run, comp, table, method, masks)
        if factor is not None:
            exact_singletons(value, quality, run, comp, table, t)
        total_cost = supermodel_costs(cost, run, comp, table)
        run_mask = masks[:, 0]

    structural = torch.ones(table.count, dtype=torch.bool, device=device)
    if t == 0:
        structural[0] = False
    valid = structural.expand(b, -1)
    if force_order and t > 0:
        first = table.first.to(device)
        last_run = torch.where(run, torch.arange(k, device=device), -1).amax(1)
        lowest_allowed = (last_run + 1 - t).unsqueeze(1)  # position in comp of the first model after it
        valid = valid & ((first.unsqueeze(0) >= lowest_allowed) | (first.unsqueeze(0) < 0))
    return Candidates(t, table, comp, run_mask, value, total_cost, valid)


def exact_singletons(
    value: torch.Tensor, quality: torch.Tensor, run: torch.Tensor, comp: torch.Tensor, table: SubsetTable, t: int
) -> None:
    """Set the value of every one-model supermodel to that model's estimate, in place: its expected max
    is exactly q̂, and the samples' average would add their rounding error."""
    if t == 0:
        single = table.level(1)
        value[:, single] = quality.gather(1, comp.index_select(1, table.first[single].to(comp.device)))
    elif t == 1:
        value[:, 0] = quality[run]


def supermodel_costs(cost: torch.Tensor, run: torch.Tensor, comp: torch.Tensor, table: SubsetTable) -> torch.Tensor:
    """Estimated cost (float64) of every candidate `R ∪ T`: cost(T) = cost(parent(T)) + cost of its added model."""
    cost64 = cost.to(torch.float64)
    free_cost = cost64.gather(1, comp)
    out = torch.empty(cost.shape[0], table.count, dtype=torch.float64, device=cost.device)
    out[:, 0] = (cost64 * run).sum(1)
    for s in range(1, table.max_size + 1):
        sl = table.level(s)
        parent = table.parent[sl].to(cost.device)
        added = table.added[sl].to(cost.device)
        out[:, sl] = out.index_select(1, parent) + free_cost.index_select(1, added)
    return out


def choose(
    candidates: Candidates,
    lam: torch.Tensor | float,
    expensive: torch.Tensor | bool,
    *,
    tie_tol: float = TIE_TOL,
    cost_rtol: float = COST_RTOL,
) -> torch.Tensor:
    """Column of the chosen supermodel per query: the best `E[max] - λ cost`, ties within `tie_tol` broken
    to the cheapest (or, where `expensive`, the most expensive), equal costs to the first listed."""
    device = candidates.value.device
    cost = candidates.cost
    value = candidates.value.to(torch.float64)
    if isinstance(lam, torch.Tensor) and lam.dim() == 1:
        tau = value - lam.to(device=device, dtype=torch.float64).unsqueeze(1) * cost
    else:
        tau = torch.sub(value, cost, alpha=float(lam))
    tau.masked_fill_(~candidates.valid, float("-inf"))
    tied = tau >= tau.amax(1, keepdim=True) - tie_tol
    return break_ties(tied, cost, expensive, cost_rtol=cost_rtol)


def break_ties(
    tied: torch.Tensor, cost: torch.Tensor, expensive: torch.Tensor | bool, *, cost_rtol: float = COST_RTOL
) -> torch.Tensor:
    """Column per row among the `tied` ones (B, M): the cheapest (or, where `expensive`, the most
    expensive) by `cost`, costs within `cost_rtol` counting as equal, then the first listed."""
    device = tied.device
    expensive = torch.as_tensor(expensive, dtype=torch.bool, device=device).expand(tied.shape[0])
    pick = torch.empty(tied.shape[0], dtype=torch.long, device=device)
    for dear in (False, True):
        rows = (expensive == dear).nonzero().squeeze(1)
        if rows.numel() == 0:
            continue
        part_cost, part_tied = (cost, tied) if rows.numel() == tied.shape[0] else (cost[rows], tied[rows])
        if dear:
            target = torch.where(part_tied, part_cost, float("-inf")).amax(1, keepdim=True)
            close = part_cost >= target - cost_rtol * target.abs()
        else:
            target = torch.where(part_tied, part_cost, float("inf")).amin(1, keepdim=True)
            close = part_cost <= target + cost_rtol * target.abs()
        pick[rows] = (part_tied & close).to(torch.uint8).argmax(1)
    return pick
