"""Region impurity times uncertainty (RIPU, Xie et al. 2022), for region queries."""

from __future__ import annotations

from torch import Tensor

from taskal import functional as F
from taskal.registry import QUERY_STRATEGIES
from taskal.strategies.base import UnitScoreStrategy
from taskal.types import Predictions


@QUERY_STRATEGIES.register_module(name="region_impurity")
class RegionImpurity(UnitScoreStrategy):
    """A region's class impurity times its mean pixel entropy; regions only.

    Impurity is the entropy of the histogram of the classes predicted in the region
    (:func:`taskal.functional.region_impurity`); uncertainty is the mean predictive entropy
    of its units (of the MC mean with ``n_samples > 1``). RIPU scores a square neighbourhood
    around every pixel; taskal scores the adapter's regions (patches or superpixels), so a
    region on a class boundary with uncertain pixels is asked before a uniformly uncertain
    one inside a single class. A region predicted as one class scores 0 (ties broken at
    random by the selection's generator). A unit's class is its most probable one (for
    sigmoid heads too). The selector refuses item queries: an item's score would be its
    plain mean entropy. Meant for pixel regions: a detection box is a region of one unit,
    whose impurity is always 0 (the detection simulation refuses it).

    Args:
        n_samples: stochastic samples per prediction.
    """

    query_kinds = ("region",)

    def __init__(self, n_samples: int = 1) -> None:
        super().__init__(n_samples=n_samples, reduction="mean")

    def unit_scores(self, probs_UCK: Tensor, kind: str = "softmax") -> Tensor:
        return F.entropy(probs_UCK, kind=kind)

    def reduce_regions(
        self, predictions: Predictions, scores_U: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        owner_R, region_R, score_R, cost_R = super().reduce_regions(predictions, scores_U)
        p = predictions
        classes_U = p.probs_UCK.mean(-1).argmax(1).cpu()
        impurity_R = F.region_impurity(
            classes_U, p.owner_U.cpu(), p.regions().cpu(), p.probs_UCK.shape[1]
        )
        return owner_R, region_R, score_R * impurity_R.to(score_R.dtype), cost_R

    def __repr__(self) -> str:
        return f"RegionImpurity(n_samples={self.n_samples})"
