"""Quality and cost estimators: from a routing table's rows and the models run so far to q̂, Σ and ĉ.

Light ones are exported here; the ones that need the text encoder live in their modules
(`estimators.learned.LearnedEstimator`, `estimators.knn.KNNEstimator`, `estimators.logreg.LogRegEstimator`)
so that importing the package stays fast."""

from .base import Estimate, Features, QualityEstimator
from .noisy import NOISE_LEVELS, NoisyEstimator
from .truth import TruthEstimator

__all__ = ["NOISE_LEVELS", "Estimate", "Features", "NoisyEstimator", "QualityEstimator", "TruthEstimator"]
