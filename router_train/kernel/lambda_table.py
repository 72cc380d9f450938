"""`choose` tabulated as a function of λ, per cached state, so calibration can try λs cheaply.

For a state with candidate lines `τ_j(λ) = E_j - λ C_j`, candidate j is tied (within `tie_tol` of the
best) exactly on an interval of λ: `λ (C_i - C_j) >= E_i - E_j - tie_tol` for every valid i. Between the
sorted ends of those intervals (the state's breakpoints) the tied set, hence the pick of either
tie-break, is constant. The table stores, flat over all states, each state's breakpoints and the pick
in every interval between them; deciding a λ is then a count of breakpoints below it. A λ within
rounding distance of a breakpoint (where `choose`'s floating-point τs could order differently) is
flagged, and the caller decides those rows with `choose` itself, so decisions are identical.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import fused
from .candidates import COST_RTOL, TIE_TOL, break_ties

_EPS = torch.finfo(torch.float64).eps
_SAFETY = 64 * _EPS
"""Relative rounding slack of `choose`'s τ comparisons (a few roundings each, with a wide margin)."""
_BUILD_ELEMENTS = 1 << 22
"""Largest (rows × width × width) block built at once: keeps the build's memory bounded."""


@dataclass
class LambdaTable:
    """Per state s: sorted breakpoints `breaks[offsets[s]:offsets[s+1]]`; for the interval with m of
    them at or below λ, at `offsets[s] + s + m`: the picks (cheap, dear) and the range of λ in which
    they are certain (`safe`: the interval shrunk by twice the rounding margin at its ends, and cut
    where equal-cost pairs' ties start to depend on rounding)."""

    breaks: torch.Tensor  # (P,) float64
    offsets: torch.Tensor  # (S + 1,) long
    pick: torch.Tensor  # (P + S, 2) int16: column picked with the cheap / the expensive tie-break
    safe: torch.Tensor  # (P + S, 2) float64: open range of λ in which the picks are certain
    span: torch.Tensor | None = None  # (S, 3) long: first breakpoint, end of breakpoints, first interval (from offsets)

    def __post_init__(self) -> None:
        if self.span is None:
            start, end = self.offsets[:-1], self.offsets[1:]
            self.span = torch.stack([start, end, start + torch.arange(start.numel())], 1)

    @staticmethod
    def build(
        value: torch.Tensor,
        cost: torch.Tensor,
        valid: torch.Tensor,
        *,
        tie_tol: float = TIE_TOL,
        cost_rtol: float = COST_RTOL,
    ) -> "LambdaTable":
        """The table of B states' candidates (B, W). Where each row's valid columns come first (as
        `prune` leaves them), rows are built in groups of similar width, so the W² work follows each
        state's own count of candidates rather than the widest one's."""
        b, w = value.shape
        if w > torch.iinfo(torch.int16).max:
            raise ValueError(f"a λ table holds at most {torch.iinfo(torch.int16).max} candidates per state, got {w}")
        width = valid.sum(1)
        first = (valid == (torch.arange(w).unsqueeze(0) < width.unsqueeze(1))).all(1)  # valid columns first
        if value.device.type == "cpu" and fused.available():  # the same table, per state in C
            looked_at = torch.where(first & (width > 0), width, w)  # columns that can be picked
            return LambdaTable(*fused.lambda_table_arrays(
                value, cost, valid, looked_at, tie_tol=tie_tol, cost_rtol=cost_rtol, safety=_SAFETY))
        valid_first = bool(first.all())
        group = (2 ** width.clamp(min=1).double().log2().ceil()).long().clamp(max=w)
        if not valid_first:
            group = torch.full((b,), w)
        group[width == 0] = w  # `choose` ties every column of a row with none valid
        parts, rows = [], []
        for g in group.unique().tolist() or [w]:
            members = (group == g).nonzero().squeeze(1)
            step = max(1, _BUILD_ELEMENTS // (2 * g * g))
            for i in range(0, max(members.numel(), 1), step):
                sel = members[i : i + step]
                parts.append(_build_block(value[sel, :g], cost[sel, :g], valid[sel, :g], tie_tol, cost_rtol))
                rows.append(sel)
        return LambdaTable.cat(parts).reorder(torch.argsort(torch.cat(rows)))

    def reorder(self, order: torch.Tensor) -> "LambdaTable":
        """The table whose state i is this table's state `order[i]` (this table itself, not a copy, where
        `order` keeps every state in place)."""
        if torch.equal(order, torch.arange(self.offsets.numel() - 1)):
            return self
        span = self.span[order]  # start and end of the breakpoints, first interval
        count = span[:, 1] - span[:, 0]
        flat, flat_i = _segments(span[:, 0], count), _segments(span[:, 2], count + 1)
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), count.cumsum(0)])
        return LambdaTable(breaks=self.breaks[flat], offsets=offsets, pick=self.pick[flat_i], safe=self.safe[flat_i])

    @staticmethod
    def cat(tables: list["LambdaTable"]) -> "LambdaTable":
        """Tables of consecutive groups of states as one."""
        shift = torch.tensor([0] + [int(t.breaks.numel()) for t in tables[:-1]]).cumsum(0)
        offsets = torch.cat([tables[0].offsets[:1]] + [t.offsets[1:] + s for t, s in zip(tables, shift)])
        fields = ("breaks", "pick", "safe")
        return LambdaTable(
            offsets=offsets, **{f: torch.cat([getattr(t, f) for t in tables]) for f in fields}
        )

    def lookup(
        self, slots: torch.Tensor, lam: float, expensive: torch.Tensor, *, stable: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Pick of each state in `slots` at λ with its tie-break; whether that pick is certain (False: λ
        is within rounding distance of a breakpoint; decide that row with `choose`); and, if `stable`,
        per state the open range of λ around `lam` in which its pick stays the same ((lam, lam) where the
        pick is uncertain; None otherwise)."""
        lam = float(lam)
        if self.breaks.device.type == "cpu" and self.pick.dtype == torch.int16 and fused.available():
            return fused.lambda_lookup(self.span, self.breaks, self.pick, self.safe, slots, lam, expensive, stable)
        span = self.span.index_select(0, slots)
        at = span[:, 2] + self._count_below(span, lam)
        picks = self.pick.index_select(0, at)
        pick = torch.where(expensive, picks[:, 1], picks[:, 0]).long()
        safe = self.safe.index_select(0, at)
        sure = (safe[:, 0] < lam) & (lam < safe[:, 1])
        if not stable:
            return pick, sure, None
        return pick, sure, torch.where(sure.unsqueeze(1), safe, lam)

    def _count_below(self, span: torch.Tensor, lam: float) -> torch.Tensor:
        """Per looked-up state (its `span` rows), how many of its sorted breakpoints are <= λ. A few states
        of a large table: a binary search within each one's breakpoints (work in the states looked up, not
        in the table); many: one pass over all breakpoints."""
        start, end = span[:, 0], span[:, 1]
        if span.shape[0] * 32 >= self.breaks.numel():
            below = torch.cat([torch.zeros(1, dtype=torch.long), (self.breaks <= lam).long().cumsum(0)])
            return below.index_select(0, end) - below.index_select(0, start)
        lo, hi = start.clone(), end.clone()  # the first breakpoint > λ lies in [lo, hi]
        last = self.breaks.numel() - 1
        for _ in range(int((end - start).max()).bit_length() if span.shape[0] else 0):
            mid = (lo + hi) // 2
            right = (lo < hi) & (self.breaks.index_select(0, mid.clamp(max=last)) <= lam)
            lo = torch.where(right, mid + 1, lo)
            hi = torch.where((lo < hi) & ~right, mid, hi)
        return lo - start


def _segments(starts: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """The flat indices of consecutive segments `starts[i] .. starts[i] + counts[i] - 1`, concatenated."""
    ends = counts.cumsum(0)
    within = torch.arange(int(ends[-1]) if ends.numel() else 0) - torch.repeat_interleave(ends - counts, counts)
    return torch.repeat_interleave(starts, counts) + within


def _build_block(
    value: torch.Tensor, cost: torch.Tensor, valid: torch.Tensor, tie_tol: float, cost_rtol: float
) -> LambdaTable:
    """The table of one block of states (see `LambdaTable`)."""
    inf = float("inf")
    b, w = value.shape
    v = torch.where(valid, value.to(torch.float64), 0.0)  # padded columns may hold anything
    c = torch.where(valid, cost.to(torch.float64), 0.0)
    ok_i = valid.unsqueeze(1)  # [b, j, i]: constraint from line i on line j
    dc = c.unsqueeze(1) - c.unsqueeze(2)  # C_i - C_j
    dv = v.unsqueeze(1) - v.unsqueeze(2) - tie_tol  # E_i - E_j - tol
    ratio = dv / torch.where(dc == 0, 1.0, dc)
    lower = torch.where(ok_i & (dc > 0), ratio, -inf).amax(2)
    upper = torch.where(ok_i & (dc < 0), ratio, inf).amin(2)
    same = ok_i & (dc == 0) & valid.unsqueeze(2)
    never = (same & (dv > 0)).any(2) | ~valid
    ends = torch.cat([torch.where(never, inf, lower), torch.where(never, inf, upper)], 1)
    ends = torch.where(torch.isfinite(ends), ends, inf).sort(1).values  # (b, 2w), +inf padded
    count = torch.isfinite(ends).sum(1)

    # one representative λ strictly inside each interval m = 0..count (m breakpoints below it)
    width = 2 * w
    left = torch.cat([torch.full((b, 1), -inf, dtype=torch.float64), ends], 1)  # (b, 2w + 1)
    right = torch.cat([ends, torch.full((b, 1), inf, dtype=torch.float64)], 1)
    rep = left + (right - left) / 2
    rep = torch.where(torch.isinf(left), right - 1 - right.abs(), rep)
    rep = torch.where(torch.isinf(right), left + 1 + left.abs(), rep)
    rep = torch.where(torch.isinf(left) & torch.isinf(right), 0.0, rep)
    tied = (
        (~never).unsqueeze(1)
        & (lower.unsqueeze(1) <= rep.unsqueeze(2))
        & (rep.unsqueeze(2) <= upper.unsqueeze(1))
    )  # (b, 2w + 1, w)
    tied = torch.where(tied.any(2, keepdim=True), tied, True)  # no valid column: `choose` ties them all
    flat_tied = tied.reshape(-1, w)
    flat_cost = cost.to(torch.float64).unsqueeze(1).expand(b, width + 1, w).reshape(-1, w)  # as `choose` sees them
    cheap = break_ties(flat_tied, flat_cost, False, cost_rtol=cost_rtol).view(b, width + 1)
    dear = break_ties(flat_tied, flat_cost, True, cost_rtol=cost_rtol).view(b, width + 1)

    keep_interval = torch.arange(width + 1).unsqueeze(0) <= count.unsqueeze(1)
    keep_break = torch.arange(width).unsqueeze(0) < count.unsqueeze(1)

    # rounding: `choose` compares τs computed in float64; the slack of tie status near a breakpoint
    # shrinks with the smallest cost difference (the slope of τ_i - τ_j in λ)
    vmax = torch.where(valid, v.abs(), 0.0).amax(1) + tie_tol
    cmax = torch.where(valid, c.abs(), 0.0).amax(1)
    pair = ok_i & valid.unsqueeze(2)
    dc_min = torch.where(pair & (dc != 0), dc.abs(), inf).amin(1).amin(1)
    m_abs = torch.where(torch.isfinite(dc_min), _SAFETY * 2 * vmax / dc_min, 0.0).unsqueeze(1)
    m_rel = torch.where(torch.isfinite(dc_min), _SAFETY * (2 * cmax / dc_min + 1), _SAFETY).unsqueeze(1)
    # equal-cost pairs: tied or not by E_i - E_j - tol alone, unless that is within rounding of
    # SAFETY (|E| + λ |C|), i.e. from λ = flat_from on
    flat_gap = torch.where(same & ~torch.eye(w, dtype=torch.bool).unsqueeze(0), dv.abs(), inf).amin(2).amin(1)
    flat_ok = flat_gap > _SAFETY * vmax
    flat_from = torch.where(
        cmax > 0, (flat_gap / _SAFETY - vmax) / cmax.clamp(min=1e-300) * (1 - 1e-9), torch.where(flat_ok, inf, -inf)
    )
    flat_from = torch.where(flat_ok, flat_from, -inf).unsqueeze(1)
    # twice the margin at each end: a λ inside is beyond the margin at λ itself too
    finite = torch.isfinite(ends)
    shrunk_lo = torch.where(finite, ends + 2 * (m_abs + m_rel * ends.abs()), inf)
    shrunk_hi = torch.where(finite, ends - 2 * (m_abs + m_rel * ends.abs()), inf)
    safe_lo = torch.cat([torch.full((b, 1), -inf, dtype=torch.float64), shrunk_lo], 1)  # (b, 2w + 1)
    safe_hi = torch.minimum(torch.cat([shrunk_hi, torch.full((b, 1), inf, dtype=torch.float64)], 1), flat_from)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), count.cumsum(0)])
    return LambdaTable(
        breaks=ends[keep_break], offsets=offsets, pick=torch.stack([cheap, dear], 2)[keep_interval].to(torch.int16),
        safe=torch.stack([safe_lo, safe_hi], 2)[keep_interval],
    )
