"""Expected max `E[max_{i in S} X_i]` of sampled qualities for every candidate supermodel of a step.

Two exact ways to batch it (see `docs/kernel-notes` in the design notes):
- `levels`: walk the subsets level by level, `max(S) = max(max(parent(S)), X_added(S))`. Work and
  memory scale with the number of depth-capped candidates: the choice for many models.
- `zeta`: per sample sort the k values and telescope, then one subset-sum (zeta) transform over all
  `2^k` masks gives every expected max at once. Work ~ `n_s k log k + k 2^k`: fastest for small k.
"""

from __future__ import annotations

import torch

from .subsets import SubsetTable, count_subsets

ZETA_MAX_MODELS = 16


def sample_qualities(quality: torch.Tensor, chol: torch.Tensor | None, z: torch.Tensor) -> torch.Tensor:
    """Joint quality samples `X = q + Z L^T`, laid out `(B, n_s, k)`; with no factor, `(B, 1, k)` = q."""
    if chol is None:
        return quality.unsqueeze(1)
    if chol.dim() == 2:  # diagonal factor given as standard deviations (B, k)
        return torch.addcmul(quality.unsqueeze(1), chol.unsqueeze(1), z.unsqueeze(0))
    return quality.unsqueeze(1) + torch.matmul(z, chol.transpose(1, 2))


def choose_method(k: int, n_samples: int, table: SubsetTable) -> str:
    """Pick the cheaper exact backend for this shape (estimated element operations)."""
    if k > ZETA_MAX_MODELS or n_samples == 1:
        return "levels"
    zeta_work = k * (1 << k) + 8 * n_samples * k
    levels_work = n_samples * table.count
    return "zeta" if zeta_work < levels_work else "levels"


def absolute_masks(run: torch.Tensor, comp: torch.Tensor, table: SubsetTable) -> torch.Tensor:
    """Bitmask (int64) of every candidate `R ∪ T`, `(B, M)`; `comp` lists each query's free models."""
    weights = torch.ones(run.shape[1], dtype=torch.long, device=run.device) << torch.arange(
        run.shape[1], device=run.device
    )
    out = torch.empty(run.shape[0], table.count, dtype=torch.long, device=run.device)
    out[:, 0] = (run.long() * weights).sum(1)
    comp_bits = weights[comp]  # (B, n)
    for s in range(1, table.max_size + 1):
        sl = table.level(s)
        parent = table.parent[sl].to(run.device)
        added = table.added[sl].to(run.device)
        out[:, sl] = out.index_select(1, parent) | comp_bits.index_select(1, added)
    return out


def _levels(x: torch.Tensor, run: torch.Tensor, comp: torch.Tensor, table: SubsetTable) -> torch.Tensor:
    b, s, k = x.shape
    device = x.device
    xc = x.gather(2, comp.unsqueeze(1).expand(b, s, table.n)).transpose(1, 2).contiguous()  # (B, n, s)
    v = x.new_empty(b, table.count, s)
    if bool(run.any()):
        v[:, 0] = x.masked_fill(~run.unsqueeze(1), float("-inf")).amax(2)
    else:
        v[:, 0] = float("-inf")
    for size in range(1, table.max_size + 1):
        sl = table.level(size)
        parent = table.parent[sl].to(device)
        added = table.added[sl].to(device)
        v[:, sl] = torch.maximum(v.index_select(1, parent), xc.index_select(1, added))
    return v.mean(2)


def zeta_all_masks(x: torch.Tensor) -> torch.Tensor:
    """Expected max over samples for all `2^k` masks, `(B, 2^k)` (the empty mask's entry is meaningless)."""
    b, s, k = x.shape
    v, order = x.sort(dim=2, descending=True)
    prefix = (torch.ones_like(order) << order).cumsum(2)  # bitmask of the j largest
    gaps = (v[..., :-1] - v[..., 1:]).reshape(b, -1)
    table = x.new_zeros(b, 1 << k)
    table.scatter_add_(1, prefix[..., :-1].reshape(b, -1), gaps)
    for h in range(k):  # subset-sum transform: F(U) = sum over T ⊆ U of f(T)
        g = table.view(b, 1 << (k - h - 1), 2, 1 << h)
        g[:, :, 1, :] += g[:, :, 0, :]
    top = v[..., 0].mean(1, keepdim=True)
    # E[max_S] = mean of the sample maxima minus F(complement of S); complement = reversed index.
    return top - table.flip(1) / s


def expected_max(
    x: torch.Tensor,
    run: torch.Tensor,
    comp: torch.Tensor,
    table: SubsetTable,
    method: str = "auto",
    masks: torch.Tensor | None = None,
) -> torch.Tensor:
    """`E[max_{i in R ∪ T} X_i]` for every subset T of the table, `(B, M)`; `-inf` for the empty set at t=0.

    `x` holds the samples `(B, n_s, k)`. All rows must have the same number of run models
    `t = k - table.n`; `comp` (B, n) holds each row's models not yet run in ascending order, `masks`
    optionally the candidates' absolute bitmasks (needed by `zeta`).
    """
    b, s, k = x.shape
    if method == "auto":
        method = choose_method(k, s, table)
    if method == "levels":
        return _levels(x, run, comp, table)
    if method != "zeta":
        raise ValueError(f"method must be 'auto', 'levels' or 'zeta', got {method!r}")
    if k > ZETA_MAX_MODELS + 4:
        raise ValueError(f"method='zeta' needs a 2^k table; k={k} models is too many, use 'levels'")
    if masks is None:
        masks = absolute_masks(run, comp, table)
    values = zeta_all_masks(x).gather(1, masks)
    if not bool(run.any()):
        values[:, 0] = float("-inf")
    return values


__all__ = [
    "ZETA_MAX_MODELS",
    "absolute_masks",
    "choose_method",
    "count_subsets",
    "expected_max",
    "sample_qualities",
    "zeta_all_masks",
]
