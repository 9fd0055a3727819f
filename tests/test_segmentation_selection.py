"""Selection end to end on segmentation: the synthetic medical set on disk, read through
the validated folder pool, scored by a tiny torchvision FCN with every item strategy, and
as patches and superpixels."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from taskal.adapters import EnsembleAdapter, TorchvisionSegmentationAdapter
from taskal.data import load_segmentation_folder, make_synthetic_segmentation
from taskal.llal.module import LossPredictionModule
from taskal.queries import LabelState
from taskal.segmenters import small_segmenter
from taskal.selector import Selector, build_strategy

from .strategies.template import item_query_names

pytestmark = pytest.mark.filterwarnings("ignore:.*has no dropout with p > 0")
CLASSES = ("background", "liver", "kidney", "lesion")


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    files = make_synthetic_segmentation(
        Path(tmp_path_factory.mktemp("medical")), num_images=8, image_size=(24, 24), seed=2
    )
    return load_segmentation_folder(files.img_dir, files.ann_dir, CLASSES)


def _adapter(seed: int = 0, **kw: object) -> TorchvisionSegmentationAdapter:
    torch.manual_seed(seed)
    adapter = TorchvisionSegmentationAdapter(small_segmenter(4, width=4), **kw)  # type: ignore[arg-type]
    adapter.attach_loss_predictor(LossPredictionModule(adapter.feature_info, hidden=4))
    return adapter


@pytest.mark.parametrize("name", item_query_names())
def test_every_item_strategy_selects_images(pool, name: str) -> None:  # type: ignore[no-untyped-def]
    strategy = build_strategy(name)
    if strategy.sampling == "ensemble":
        adapter: object = EnsembleAdapter([_adapter(0), _adapter(1)])
    else:
        adapter = _adapter()
    if "class_quality" in strategy.needs:
        pytest.skip("difficulty-calibrated scores read detection class quality")
    queries = Selector(
        strategy, batch_size=3, progress=False
    ).select(  # type: ignore[arg-type]
        adapter, pool, pool.ids[:2], 3, torch.Generator().manual_seed(0)
    )
    picks = [q.item for q in queries]
    assert len(set(picks)) == 3 and not set(picks) & set(pool.ids[:2])


@pytest.mark.parametrize("regions", [{"patch": 8}, {"kind": "superpixel", "n_segments": 9}])
@pytest.mark.parametrize(
    "name", ["entropy", "random", "region_impurity", {"type": "bald", "n_samples": 3}]
)
def test_region_queries_skip_what_is_labeled(pool, regions: dict, name: object) -> None:  # type: ignore[no-untyped-def,type-arg]
    adapter = _adapter(regions=regions)
    state = LabelState(full={pool.ids[0]})
    selector = Selector(name, batch_size=3, progress=False, query="region")  # type: ignore[arg-type]
    first = selector.select(adapter, pool, state, 200.0)
    assert (
        first and sum(q.cost for q in first) <= 200.0 and pool.ids[0] not in {q.item for q in first}
    )
    state.add(first)
    second = selector.select(adapter, pool, state, 200.0)
    assert not {(q.item, q.region) for q in first} & {(q.item, q.region) for q in second}
