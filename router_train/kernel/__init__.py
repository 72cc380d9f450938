"""The vectorized cascade-routing decision kernel (torch, CPU or CUDA)."""

from .candidates import COST_RTOL, TIE_TOL, Candidates, build_candidates, choose
from .decide import KernelConfig, StepDecision, answer_models, decide, factorize, run_masks, step_candidates
from .sobol import normal_samples
from .subsets import MAX_MODELS, SubsetTable, check_model_count, count_subsets, subset_table

__all__ = [
    "COST_RTOL",
    "MAX_MODELS",
    "TIE_TOL",
    "Candidates",
    "KernelConfig",
    "StepDecision",
    "SubsetTable",
    "answer_models",
    "build_candidates",
    "check_model_count",
    "choose",
    "count_subsets",
    "decide",
    "factorize",
    "normal_samples",
    "run_masks",
    "step_candidates",
    "subset_table",
]
