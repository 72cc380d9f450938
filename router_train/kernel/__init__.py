"""The vectorized cascade-routing decision kernel (torch, CPU or CUDA)."""

from .candidates import COST_RTOL, TIE_TOL, Candidates, build_candidates, choose
from .decide import KernelConfig, StepDecision, answer_models, decide, factorize, run_masks, step_candidates
from .sobol import normal_samples
from .subsets import SubsetTable, count_subsets, subset_table

__all__ = [
    "COST_RTOL",
    "TIE_TOL",
    "Candidates",
    "KernelConfig",
    "StepDecision",
    "SubsetTable",
    "answer_models",
    "build_candidates",
    "choose",
    "count_subsets",
    "decide",
    "factorize",
    "normal_samples",
    "run_masks",
    "step_candidates",
    "subset_table",
]
