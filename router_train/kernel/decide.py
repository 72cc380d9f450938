"""One decision step for a batch of queries: which model to run next, or stop and which answer to return."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..strategy import Strategy
from . import fused
from .candidates import COST_RTOL, TIE_TOL, Candidates, build_candidates, choose
from .expected_max import ZETA_MAX_MODELS, sample_qualities
from .sobol import normal_samples
from .subsets import check_model_count, count_subsets, run_masks, subset_table

CHOLESKY_EPS = 1e-9
"""Jitter added to Σ's diagonal before its Cholesky factorization (Σ is ~0 for models already run)."""


@dataclass(frozen=True)
class KernelConfig:
    """How the kernel computes, not what it decides: sample count and seed, backend, precision, chunking."""

    n_samples: int = 100
    seed: int = 0
    method: str = "auto"  # auto (fused on CPU where it compiled, else the cheaper of zeta/levels) | fused | zeta | levels
    dtype: torch.dtype = torch.float32
    chunk_size: int = 256  # queries per chunk of the torch backends on CPU (on CUDA: CUDA_CHUNK_ELEMENTS alone)
    tie_tol: float = TIE_TOL

    def __post_init__(self) -> None:
        if self.method not in ("auto", "fused", "zeta", "levels"):
            raise ValueError(f"KernelConfig.method must be 'auto', 'fused', 'zeta' or 'levels', got {self.method!r}")


@dataclass
class StepDecision:
    """The kernel's output for B queries."""

    next_model: torch.Tensor  # (B,) long: model to run next, -1 to stop
    answer_model: torch.Tensor  # (B,) long: run model whose answer to return (-1 if none has run)
    supermodel: torch.Tensor  # (B,) long bitmask of the chosen supermodel S* (the run set when stopping)


def factorize(
    cov: torch.Tensor | None, *, eps: float = CHOLESKY_EPS, dtype: torch.dtype = torch.float32, validate: bool = True
):
    """Cholesky factor of `Σ + εI` per query, as standard deviations `(B, k)` when every Σ is diagonal.

    Raises a ValueError naming the first query whose Σ is not a finite, symmetric PSD matrix;
    `validate=False` skips the finiteness and symmetry checks of the off-diagonal entries (two full
    passes over Σ) where Σ comes from an estimator already checked, e.g. in the simulator.
    """
    if cov is None:
        return None
    if cov.dim() != 3 or cov.shape[1] != cov.shape[2]:
        raise ValueError(f"cov must have shape (B, k, k), got {tuple(cov.shape)}")
    cov = cov.to(torch.float64)
    if validate:
        bad = ~torch.isfinite(cov).flatten(1).all(1)
        if bad.any():
            raise ValueError(f"cov of query {int(bad.nonzero()[0])} has NaN or infinite entries")
        asym = (cov - cov.transpose(1, 2)).abs().flatten(1).amax(1) > 1e-9 * (1 + cov.abs().flatten(1).amax(1))
        if asym.any():
            raise ValueError(f"cov of query {int(asym.nonzero()[0])} is not symmetric")
    diag = torch.diagonal(cov, dim1=1, dim2=2)
    bad = ~torch.isfinite(diag).all(1)
    if bad.any():
        raise ValueError(f"cov of query {int(bad.nonzero()[0])} has NaN or infinite entries")
    if (diag < 0).any():
        raise ValueError(f"cov of query {int((diag < 0).any(1).nonzero()[0])} has a negative variance")
    if torch.count_nonzero(cov - torch.diag_embed(diag)) == 0:
        return (diag + eps).sqrt().to(dtype)
    eye = torch.eye(cov.shape[1], dtype=torch.float64, device=cov.device)
    chol, info = torch.linalg.cholesky_ex(cov + eps * eye)
    if (info > 0).any():
        raise ValueError(f"cov of query {int((info > 0).nonzero()[0])} is not positive semi-definite")
    return chol.to(dtype)


def scaled_cov(cov: torch.Tensor | None, scale: float) -> torch.Tensor | None:
    """Σ multiplied by a strategy's `sigma_scale`; None (point estimates) for a zero scale."""
    if cov is None or scale == 0.0:
        return None
    return cov if scale == 1.0 else cov * scale


def answer_models(quality: torch.Tensor, run: torch.Tensor) -> torch.Tensor:
    """The run model with the highest (post-hoc) estimated quality, first on ties; -1 where none ran."""
    masked = quality.to(torch.float64).masked_fill(~run, float("-inf"))
    best = masked.argmax(1)
    return torch.where(run.any(1), best, -1)


def _check_inputs(quality, cost, run, strategy: Strategy) -> None:
    if quality.dim() != 2:
        raise ValueError(f"quality must have shape (B, k), got {tuple(quality.shape)}")
    if cost.shape != quality.shape:
        raise ValueError(f"cost must have the shape of quality {tuple(quality.shape)}, got {tuple(cost.shape)}")
    if run.shape != quality.shape or run.dtype != torch.bool:
        raise ValueError(f"run must be a bool tensor of shape {tuple(quality.shape)}, got {run.dtype} {tuple(run.shape)}")
    check_model_count(quality.shape[1], "quality")
    for name, x in (("quality", quality), ("cost", cost)):
        bad = ~torch.isfinite(x).all(1)
        if bad.any():
            raise ValueError(f"{name} of query {int(bad.nonzero()[0])} has NaN or infinite entries")
    if (cost < 0).any():
        raise ValueError(f"cost of query {int((cost < 0).any(1).nonzero()[0])} is negative")
    if strategy.mode in ("cascade", "threshold_cascade"):
        t = run.sum(1, keepdim=True)
        prefix = torch.arange(run.shape[1], device=run.device).unsqueeze(0) < t
        bad = (run != prefix).any(1)
        if bad.any():
            raise ValueError(
                f"mode {strategy.mode!r} runs models in cost order, but the run set of query "
                f"{int(bad.nonzero()[0])} is not a prefix of it"
            )


def step_candidates(
    quality: torch.Tensor,
    factor: torch.Tensor | None,
    cost: torch.Tensor,
    run: torch.Tensor,
    strategy: Strategy,
    config: KernelConfig,
) -> Candidates:
    """Candidates for rows that all have the same number of run models (below the depth cap)."""
    k = quality.shape[1]
    z = normal_samples(config.n_samples, k, config.seed, dtype=config.dtype, device=quality.device)
    return build_candidates(
        quality.to(config.dtype),
        factor,
        cost,
        run,
        z,
        max_depth=min(strategy.max_depth, k),
        prefix_only=strategy.mode == "cascade",
        force_order=strategy.force_order,
        method=config.method,
    )


CHUNK_ELEMENTS = 1 << 22
"""Largest per-chunk working set (elements) of the expected-max backends on CPU: keeps memory bounded."""

CUDA_CHUNK_ELEMENTS = 1 << 26
"""The same on CUDA (256 MiB of float32): each chunk costs a few dozen kernel launches, so a GPU wants few,
large chunks (with the CPU's bound, 10,000 queries at k = 11, depth 5 took 244 chunks)."""


def chunk_rows(k: int, t: int, strategy: Strategy, config: KernelConfig, device: torch.device | None = None) -> int:
    """Queries per chunk at step t: `config.chunk_size` on CPU, fewer when each query's working set is large;
    on CUDA as many as `CUDA_CHUNK_ELEMENTS` allows."""
    depth = min(strategy.max_depth, k)
    if strategy.mode == "cascade":  # prefixes only: the `levels` backend unless `zeta` is asked for
        table_size, zeta = depth - t + 1, config.method == "zeta"
    else:
        table_size, zeta = count_subsets(k - t, depth - t), config.method != "levels"
    per_row = max(table_size * config.n_samples, (1 << k) if zeta and k <= ZETA_MAX_MODELS else 0)
    if device is not None and device.type == "cuda":
        return max(1, CUDA_CHUNK_ELEMENTS // per_row)
    return max(1, min(config.chunk_size, CHUNK_ELEMENTS // per_row))


def decide(
    quality: torch.Tensor,
    cost: torch.Tensor,
    run: torch.Tensor,
    strategy: Strategy,
    *,
    cov: torch.Tensor | None = None,
    expensive: torch.Tensor | None = None,
    config: KernelConfig = KernelConfig(),
) -> StepDecision:
    """Decide the next step for B queries.

    `quality` (B, k): post-hoc estimates for run models, ex-ante for the others; `cov` (B, k, k) their
    uncertainty Σ or None; `cost` (B, k): estimated costs; `run` (B, k) bool: models already run;
    `expensive` (B,) bool: break ties towards the most expensive supermodel (default: the cheapest).
    Queries are processed in chunks (`chunk_rows`), grouped by step, so memory stays bounded.
    """
    _check_inputs(quality, cost, run, strategy)
    b, k = quality.shape
    device = quality.device
    if expensive is None:
        expensive = torch.zeros(b, dtype=torch.bool, device=device)
    factor = factorize(scaled_cov(cov, strategy.sigma_scale), dtype=config.dtype)
    t_all = run.sum(1)
    next_model = torch.full((b,), -1, dtype=torch.long, device=device)
    supermodel = run_masks(run)
    use_fused = fused_applies(strategy, config, device)
    for t in range(min(strategy.max_depth, k)):
        group = (t_all == t).nonzero().squeeze(1)
        chunk = max(1, CHUNK_ELEMENTS // (config.n_samples * k)) if use_fused else chunk_rows(k, t, strategy, config, device)
        for start in range(0, group.numel(), chunk):
            rows = group[start : start + chunk]
            if use_fused:
                next_model[rows], supermodel[rows] = fused_step(
                    quality[rows], None if factor is None else factor[rows], cost[rows], run[rows], t,
                    strategy, expensive[rows], config,
                )
                continue
            if strategy.mode == "threshold_cascade":
                step = threshold_step(quality[rows], t, strategy, expensive[rows], config.tie_tol)
                next_model[rows] = step
                supermodel[rows] |= torch.where(step >= 0, torch.ones_like(step) << step.clamp(min=0), 0)
                continue
            cands = step_candidates(
                quality[rows], None if factor is None else factor[rows], cost[rows], run[rows], strategy, config
            )
            pick = choose(cands, strategy.lambdas[t], expensive[rows], tie_tol=config.tie_tol)
            next_model[rows] = cands.next_model(pick)
            supermodel[rows] = cands.mask(pick)
    if strategy.mode == "threshold_cascade":
        last = torch.where(run.any(1), t_all - 1, -1)
        answer = torch.where(next_model < 0, last, answer_models(quality, run))
    else:
        answer = answer_models(quality, run)
    return StepDecision(next_model, answer, supermodel)


def fused_applies(strategy: Strategy, config: KernelConfig, device: torch.device) -> bool:
    """Whether `decide` takes the fused C kernel: asked for (`fused`), or `auto` on CPU where it compiled.
    The cascades keep their own (prefix and threshold) paths."""
    return strategy.mode not in ("cascade", "threshold_cascade") and fused.applies(config.method, device, config.dtype)


def fused_step(
    quality: torch.Tensor,
    factor: torch.Tensor | None,
    cost: torch.Tensor,
    run: torch.Tensor,
    t: int,
    strategy: Strategy,
    expensive: torch.Tensor,
    config: KernelConfig,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(next model, supermodel) of rows with t models run, by the fused kernel (see `fused.py`)."""
    k = quality.shape[1]
    estimate = quality.to(config.dtype)
    z = normal_samples(config.n_samples, k, config.seed, dtype=config.dtype, device=quality.device)
    x = sample_qualities(estimate, factor, z)
    lam = torch.full((quality.shape[0],), float(strategy.lambdas[t]), dtype=torch.float64)
    return fused.decide_rows(
        x, None if factor is None else estimate, cost, run, subset_table(k - t, min(strategy.max_depth, k) - t),
        lam, expensive, force_order=strategy.force_order, tie_tol=config.tie_tol, cost_rtol=COST_RTOL,
    )


def threshold_step(
    quality: torch.Tensor, t: int, strategy: Strategy, expensive: torch.Tensor, tie_tol: float = TIE_TOL
) -> torch.Tensor:
    """Thresholding cascade at step t: run m_0 first; after m_{t-1}, go on to m_t iff q̂_{t-1} < 1 - θ_t."""
    b = quality.shape[0]
    if t == 0:
        return torch.zeros(b, dtype=torch.long, device=quality.device)
    go = threshold_go(quality[:, t - 1], strategy.thresholds[t - 1], expensive, tie_tol)
    return torch.where(go, t, -1)


def threshold_go(estimate: torch.Tensor, theta: float, expensive: torch.Tensor, tie_tol: float = TIE_TOL) -> torch.Tensor:
    """Whether the thresholding cascade goes on after a model whose post-hoc estimate is `estimate`:
    q̂ < 1 - θ, a tie within `tie_tol` going on only where `expensive`."""
    gap = estimate.to(torch.float64) - (1.0 - theta)
    return (gap < -tie_tol) | ((gap.abs() <= tie_tol) & expensive)
