"""Strategy math as pure torch functions: device-agnostic, explicit ``torch.Generator``."""

from taskal.functional.badge import badge_select, gradient_factors, gradient_sq_dists_to
from taskal.functional.diversity import (
    FactorizedSqDists,
    KCenterStats,
    KMeansPPStats,
    k_center_greedy,
    k_center_greedy_features,
    kmeans_pp,
    min_sq_dists,
    sq_dists_to,
)
from taskal.functional.llal import loss_ranking_loss
from taskal.functional.ranking import top_k
from taskal.functional.reduction import (
    reduce_regions,
    reduce_units,
    region_class_counts,
    region_impurity,
)
from taskal.functional.uncertainty import (
    bald,
    entropy,
    least_confidence,
    margin,
    mean_kl,
    mean_std,
    variation_ratios,
    vote_entropy,
)
from taskal.functional.validation import (
    check_budget,
    check_probs,
    check_scores,
    foreground,
    is_int,
)

__all__ = [
    "FactorizedSqDists",
    "KCenterStats",
    "KMeansPPStats",
    "badge_select",
    "bald",
    "check_budget",
    "check_probs",
    "check_scores",
    "entropy",
    "foreground",
    "gradient_factors",
    "gradient_sq_dists_to",
    "is_int",
    "k_center_greedy",
    "k_center_greedy_features",
    "kmeans_pp",
    "least_confidence",
    "loss_ranking_loss",
    "margin",
    "mean_kl",
    "mean_std",
    "min_sq_dists",
    "reduce_regions",
    "reduce_units",
    "region_class_counts",
    "region_impurity",
    "sq_dists_to",
    "top_k",
    "variation_ratios",
    "vote_entropy",
]
