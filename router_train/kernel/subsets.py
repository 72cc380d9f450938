"""Enumeration of the subsets a supermodel may add to a run set, in one fixed order.

At a step with `t` models already run, a candidate supermodel is `R ∪ T` with `T` a subset of the
`n = k - t` models not yet run (taken in ascending model index) and `|T| <= max_size`. Subsets are
listed by size, then in `itertools.combinations` order, so index 0 is the empty set (stop) and every
subset's parent (itself without its lowest element) comes before it.

The optimal cascade only ever runs prefixes of the model order, so its candidates are the prefixes
`{0..j-1}` of the free models alone: `prefix_table` lists those in the same layout (one subset per
level, parent = the prefix one shorter), so the same kernel code walks them with work linear in n.
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SubsetTable:
    """Subsets of `range(n)` with at most `max_size` elements, with the indices the kernel needs.

    The kernel walks them level by level: a subset is its parent plus the element `added`.
    """

    n: int
    max_size: int
    bits: torch.Tensor  # (M, n) bool: membership
    size: torch.Tensor  # (M,) long
    first: torch.Tensor  # (M,) long: lowest element, -1 for the empty set
    parent: torch.Tensor  # (M,) long: index of the subset one element smaller it is built from, -1 for empty
    added: torch.Tensor  # (M,) long: the element of the subset not in its parent, -1 for the empty set
    prefix_len: torch.Tensor  # (M,) long: j if the subset is {0..j-1}, else -1
    level_starts: tuple[int, ...]  # level_starts[s]: index of the first subset of size s; len max_size + 2

    @property
    def count(self) -> int:
        return int(self.bits.shape[0])

    def level(self, s: int) -> slice:
        """Index range of the subsets of size `s`."""
        return slice(self.level_starts[s], self.level_starts[s + 1])


MAX_MODELS = 62
"""Run sets and supermodels are int64 bitmasks (bit j: model j), so the kernel routes among at most 62 models."""


def check_model_count(k: int, where: str) -> None:
    """Raise a ValueError naming `where` and the fix when k models exceed what the bitmasks hold."""
    if k > MAX_MODELS:
        raise ValueError(
            f"{where}: {k} models, but the decision kernel routes among at most {MAX_MODELS} (run sets are 64-bit "
            f"masks); keep at most {MAX_MODELS} with --models (recipe: data.models), e.g. the most used ones"
        )


def run_masks(run: torch.Tensor) -> torch.Tensor:
    """Bitmask (int64) of each row of a `(B, k)` boolean membership matrix (a run set, a subset)."""
    k = run.shape[1]
    weights = torch.ones(k, dtype=torch.long, device=run.device) << torch.arange(k, device=run.device)
    return (run.long() * weights).sum(1)


def count_subsets(n: int, max_size: int) -> int:
    """Number of subsets of an n-set with at most `max_size` elements (the empty set included)."""
    return sum(math.comb(n, s) for s in range(0, min(n, max_size) + 1))


@functools.lru_cache(maxsize=128)
def subset_table(n: int, max_size: int) -> SubsetTable:
    """Build (and cache) the subset table for `n` free models and at most `max_size` additions."""
    if n < 0 or max_size < 0:
        raise ValueError(f"subset_table needs n >= 0 and max_size >= 0, got n={n}, max_size={max_size}")
    max_size = min(max_size, n)
    subsets: list[tuple[int, ...]] = []
    level_starts = []
    for s in range(max_size + 1):
        level_starts.append(len(subsets))
        subsets.extend(itertools.combinations(range(n), s))
    level_starts.append(len(subsets))
    index = {sub: i for i, sub in enumerate(subsets)}
    m = len(subsets)
    bits = torch.zeros(m, n, dtype=torch.bool)
    first = torch.full((m,), -1, dtype=torch.long)
    parent = torch.full((m,), -1, dtype=torch.long)
    prefix_len = torch.full((m,), -1, dtype=torch.long)
    for i, sub in enumerate(subsets):
        if sub:
            bits[i, list(sub)] = True
            first[i] = sub[0]
            parent[i] = index[sub[1:]]
        if sub == tuple(range(len(sub))):
            prefix_len[i] = len(sub)
    size = bits.sum(1)
    # the parent is the subset without its lowest element, so the added element is the lowest one
    return SubsetTable(n, max_size, bits, size, first, parent, first, prefix_len, tuple(level_starts))


@functools.lru_cache(maxsize=128)
def prefix_table(n: int, max_size: int) -> SubsetTable:
    """The table of the prefixes `{0..j-1}`, j = 0..min(n, max_size), of `n` free models (a cascade's candidates)."""
    if n < 0 or max_size < 0:
        raise ValueError(f"prefix_table needs n >= 0 and max_size >= 0, got n={n}, max_size={max_size}")
    max_size = min(max_size, n)
    size = torch.arange(max_size + 1)
    bits = torch.arange(n).unsqueeze(0) < size.unsqueeze(1)
    first = torch.where(size > 0, 0, -1)
    parent = size - 1  # the prefix one shorter: the added element is the last one
    return SubsetTable(n, max_size, bits, size, first, parent, size - 1, size.clone(), tuple(range(max_size + 2)))
