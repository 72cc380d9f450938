"""Training states for learned estimators: which run sets (models already run) to train them on.

A learned estimator sees, at serving time, the run sets a cascade visits: mostly prefixes of the cost
order (what a cascade runs) and, for cascade routing, other small sets. Training on every prefix up to
the depth cap plus a few random subsets covers both without enumerating all 2^k sets.
"""

from __future__ import annotations

import torch


def sample_run_sets(
    n_rows: int, k: int, max_depth: int, per_row: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Training states: (rows (N,), run (N, k) bool).

    For every row: all cascade prefixes {0..t-1} for t = 0..min(max_depth, k), then `per_row` random
    subsets whose size is uniform in 1..min(max_depth, k) and whose members are uniform given the size.
    The prefix states of all rows come first (row-major), then the random ones; random subsets may
    repeat a prefix. Deterministic given the generator's state.
    """
    if n_rows < 0 or k < 1 or max_depth < 0 or per_row < 0:
        raise ValueError(
            f"sample_run_sets needs n_rows >= 0, k >= 1, max_depth >= 0 and per_row >= 0; "
            f"got n_rows={n_rows}, k={k}, max_depth={max_depth}, per_row={per_row}"
        )
    depth = min(max_depth, k)
    prefix = torch.arange(k).unsqueeze(0) < torch.arange(depth + 1).unsqueeze(1)  # (depth + 1, k)
    rows = [torch.arange(n_rows).repeat_interleave(depth + 1)]
    runs = [prefix.repeat(n_rows, 1)]
    if depth > 0 and per_row > 0:
        m = n_rows * per_row
        sizes = torch.randint(1, depth + 1, (m,), generator=generator)
        # the members are the first `size` models of a uniformly random permutation
        rank = torch.rand(m, k, generator=generator).argsort(1).argsort(1)
        rows.append(torch.arange(n_rows).repeat_interleave(per_row))
        runs.append(rank < sizes.unsqueeze(1))
    return torch.cat(rows), torch.cat(runs)


def sample_states(
    n_rows: int, k: int, max_depth: int, per_row: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """`per_row` states per row for one training epoch: (rows (N,), run (N, k) bool).

    Each is, with equal chance, a cascade prefix or a random subset, of size uniform in 0..min(max_depth, k),
    so an epoch visits every row `per_row` times and, over epochs, the run sets a cascade router meets.
    """
    depth = min(max_depth, k)
    m = n_rows * per_row
    sizes = torch.randint(0, depth + 1, (m,), generator=generator)
    rank = torch.rand(m, k, generator=generator).argsort(1).argsort(1)
    prefix = torch.rand(m, generator=generator) < 0.5
    order = torch.where(prefix.unsqueeze(1), torch.arange(k).expand(m, k), rank)
    return torch.arange(n_rows).repeat_interleave(per_row), order < sizes.unsqueeze(1)
