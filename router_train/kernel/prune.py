"""Drop candidate supermodels that no cost multiplier λ >= 0 can ever select.

`choose` picks the best `E - λC` and breaks ties among candidates within `tie_tol` of it. A candidate
that is more than `tie_tol` below the upper envelope `U(λ) = max_j (E_j - λ C_j)` for every λ >= 0 can
never be picked, whatever λ and tie-break, so removing it changes no decision. The gap `U(λ) - τ_j(λ)`
is convex in λ, so its minimum is at λ = 0 or at a breakpoint of the envelope (beyond the last one the
gap only grows, or stays for lines as cheap as the last): walking the breakpoints (a handful per
query) is enough. Calibration evaluates hundreds of λs on cached
candidates, so this shrinks thousands of columns to tens.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from .candidates import TIE_TOL, Candidates

_MARGIN = 2 * TIE_TOL + 1e-9


def envelope_keep(value: torch.Tensor, cost: torch.Tensor, valid: torch.Tensor, margin: float = _MARGIN) -> torch.Tensor:
    """(B, M) bool: candidates within `margin` of the upper envelope of `value - λ cost` at some λ >= 0."""
    inf = float("inf")
    e = value.to(torch.float64).masked_fill(~valid, -inf)
    c = cost.to(torch.float64)
    rows = torch.arange(e.shape[0], device=e.device)
    e_max = e.amax(1)
    at_max = valid & (e == e_max.unsqueeze(1))
    cur = torch.where(at_max, c, inf).argmin(1)
    cur_e, cur_c = e[rows, cur], c[rows, cur]
    min_gap = e_max.unsqueeze(1) - e  # gap at λ = 0
    lam = torch.zeros_like(e_max)
    active = valid.any(1)
    for _ in range(e.shape[1]):
        cheaper = valid & (c < cur_c.unsqueeze(1)) & active.unsqueeze(1)
        active = cheaper.any(1)
        if not bool(active.any()):
            break
        ratio = torch.where(cheaper, (cur_e.unsqueeze(1) - e) / (cur_c.unsqueeze(1) - c), inf)
        lam_next = torch.maximum(ratio.amin(1), lam)
        envelope = cur_e - lam_next * cur_c
        gap = envelope.unsqueeze(1) - (e - lam_next.unsqueeze(1) * c)
        min_gap = torch.where(active.unsqueeze(1), torch.minimum(min_gap, gap), min_gap)
        hit = cheaper & (ratio <= lam_next.unsqueeze(1) * (1 + 1e-12) + 1e-300)
        nxt = torch.where(hit, c, inf).argmin(1)
        cur = torch.where(active, nxt, cur)
        cur_e, cur_c = e[rows, cur], c[rows, cur]
        lam = torch.where(active, lam_next, lam)
    # Past the last breakpoint the cheapest line stays on top: lines of its cost have their gap there.
    return valid & (min_gap <= margin)


def prune(candidates: Candidates) -> Candidates:
    """The same candidates without those no λ >= 0 can select: each row's kept columns first, in their
    order, then invalid padding up to the widest row."""
    keep = envelope_keep(candidates.value, candidates.cost, candidates.valid)
    width = max(int(keep.sum(1).max()) if len(candidates) else 1, 1)
    # kept columns first, in their order (which preserves the first-listed tie rule), then padding:
    # invalid columns that `choose` never picks
    cols = torch.sort(keep.to(torch.uint8), dim=1, descending=True, stable=True).indices[:, :width]
    kept = keep.gather(1, cols)
    index = cols if candidates.index is None else candidates.index.gather(1, cols)
    return replace(
        candidates,
        value=candidates.value.gather(1, cols),
        cost=candidates.cost.gather(1, cols),
        valid=kept,
        index=index,
    )
