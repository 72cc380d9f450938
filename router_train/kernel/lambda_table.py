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

from .candidates import COST_RTOL, TIE_TOL, break_ties

_EPS = torch.finfo(torch.float64).eps
_SAFETY = 64 * _EPS
"""Relative rounding slack of `choose`'s τ comparisons (a few roundings each, with a wide margin)."""
_BUILD_ELEMENTS = 1 << 22
"""Largest (rows × width × width) block built at once: keeps the build's memory bounded."""


@dataclass
class LambdaTable:
    """Per state s: sorted breakpoints `breaks[offsets[s]:offsets[s+1]]` and, for interval m (m of
    them below λ), the pick `cheap` / `dear` at `offsets[s] + s + m`; the rounding margin of a λ near a
    breakpoint is `margin_abs + margin_rel · λ`; `flat_gap` (min |E_i - E_j - tol| over equal-cost
    pairs) flags states whose ties rounding decides (see `lookup`); all five per state in `per_state`."""

    breaks: torch.Tensor  # (P,) float64
    offsets: torch.Tensor  # (S + 1,) long
    cheap: torch.Tensor  # (P + S,) long
    dear: torch.Tensor  # (P + S,) long
    per_state: torch.Tensor  # (S, 5) float64: margin_abs, margin_rel, flat_gap, max |E| + tol, max C

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
        width = valid.sum(1)
        valid_first = bool((valid == (torch.arange(w).unsqueeze(0) < width.unsqueeze(1))).all())
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
        """The table whose state i is this table's state `order[i]`."""
        start, count = self.offsets[order], self.offsets[order + 1] - self.offsets[order]
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), count.cumsum(0)])
        within = torch.arange(int(offsets[-1])) - torch.repeat_interleave(offsets[:-1], count)
        flat = torch.repeat_interleave(start, count) + within
        intervals = count + 1
        within_i = torch.arange(int(intervals.sum())) - torch.repeat_interleave(offsets[:-1] + torch.arange(order.numel()), intervals)
        flat_i = torch.repeat_interleave(start + order, intervals) + within_i
        return LambdaTable(
            breaks=self.breaks[flat], offsets=offsets, cheap=self.cheap[flat_i], dear=self.dear[flat_i],
            per_state=self.per_state[order],
        )

    @staticmethod
    def cat(tables: list["LambdaTable"]) -> "LambdaTable":
        """Tables of consecutive groups of states as one."""
        shift = torch.tensor([0] + [int(t.breaks.numel()) for t in tables[:-1]]).cumsum(0)
        offsets = torch.cat([tables[0].offsets[:1]] + [t.offsets[1:] + s for t, s in zip(tables, shift)])
        fields = ("breaks", "cheap", "dear", "per_state")
        return LambdaTable(
            offsets=offsets, **{f: torch.cat([getattr(t, f) for t in tables]) for f in fields}
        )

    def lookup(
        self, slots: torch.Tensor, lam: float, expensive: torch.Tensor, *, stable: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[float, float] | None]:
        """Pick of each state in `slots` at λ with its tie-break; whether that pick is certain (False: λ
        is within rounding distance of a breakpoint; decide that row with `choose`); and, if `stable`,
        the open range of λ around `lam` in which every pick stays the same (just `lam` when some row
        is uncertain; None otherwise)."""
        lam = float(lam)
        inf = float("inf")
        below = torch.cat([torch.zeros(1, dtype=torch.long), (self.breaks <= lam).long().cumsum(0)])
        start = self.offsets.index_select(0, slots)
        end = self.offsets.index_select(0, slots + 1)
        m = below.index_select(0, end) - below.index_select(0, start)
        at = start + slots + m
        pick = torch.where(expensive, self.dear.index_select(0, at), self.cheap.index_select(0, at))
        per_state = self.per_state.index_select(0, slots)  # margin_abs, margin_rel, flat_gap, max |E| + tol, max C
        m_abs, m_rel, flat_gap, vmax, cmax = per_state.unbind(1)
        near = flat_gap <= _SAFETY * (vmax + abs(lam) * cmax)
        if self.breaks.numel():
            last = self.breaks.numel() - 1
            lo = self.breaks.index_select(0, (start + m - 1).clamp(0, last))
            hi = self.breaks.index_select(0, (start + m).clamp(0, last))
            has_lo, has_hi = m > 0, start + m < end
            margin = m_abs + m_rel * abs(lam)
            near |= (has_lo & (lam - lo <= margin)) | (has_hi & (hi - lam <= margin))
        if not stable:
            return pick, ~near, None
        if slots.numel() == 0:
            return pick, ~near, (-inf, inf)
        if bool(near.any()):
            return pick, ~near, (lam, lam)
        # equal-cost pairs stay decided by their values below `flat_from`; beside a breakpoint, twice
        # its margin keeps any λ in the range beyond its own margin too
        high = torch.where(cmax > 0, (flat_gap / _SAFETY - vmax) / cmax * (1 - 1e-9), inf)
        low = torch.full_like(high, -inf)
        if self.breaks.numel():
            low = torch.where(has_lo, lo + 2 * (m_abs + m_rel * lo.abs()), -inf)
            high = torch.minimum(high, torch.where(has_hi, hi - 2 * (m_abs + m_rel * hi.abs()), inf))
        return pick, ~near, (float(low.max()), float(high.min()))


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

    vmax = torch.where(valid, v.abs(), 0.0).amax(1) + tie_tol
    cmax = torch.where(valid, c.abs(), 0.0).amax(1)
    pair = ok_i & valid.unsqueeze(2)
    dc_min = torch.where(pair & (dc != 0), dc.abs(), inf).amin(1).amin(1)
    flat_gap = torch.where(same & ~torch.eye(w, dtype=torch.bool).unsqueeze(0), dv.abs(), inf).amin(2).amin(1)
    margin_abs = torch.where(torch.isfinite(dc_min), _SAFETY * 2 * vmax / dc_min, 0.0)
    margin_rel = torch.where(torch.isfinite(dc_min), _SAFETY * (2 * cmax / dc_min + 1), _SAFETY)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), count.cumsum(0)])
    return LambdaTable(
        breaks=ends[keep_break], offsets=offsets, cheap=cheap[keep_interval], dear=dear[keep_interval],
        per_state=torch.stack([margin_abs, margin_rel, flat_gap, vmax, cmax], 1),
    )
