"""Quality and cost estimators: from a routing table's rows and the models run so far to q̂, Σ and ĉ."""

from .base import Estimate, Features, QualityEstimator
from .noisy import NOISE_LEVELS, NoisyEstimator
from .truth import TruthEstimator

__all__ = ["NOISE_LEVELS", "Estimate", "Features", "NoisyEstimator", "QualityEstimator", "TruthEstimator"]
