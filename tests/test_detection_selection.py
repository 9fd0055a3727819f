"""Selection end to end on detection: a synthetic COCO set on disk, read through the
validated COCO pool, scored by tiny torchvision detectors, as images and as boxes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from taskal.adapters import TorchvisionDetectionAdapter
from taskal.data import load_coco_detection, make_synthetic_detection
from taskal.queries import LabelState
from taskal.selector import Selector

from .adapters.test_torchvision_detection import faster_rcnn, retinanet


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    root = Path(tmp_path_factory.mktemp("shapes"))
    files = make_synthetic_detection(root, num_images=8, image_size=((56, 72), (56, 72)), seed=3)
    return load_coco_detection(files.ann_file, files.img_dir)


@pytest.mark.parametrize("family", ["faster_rcnn", "retinanet"])
@pytest.mark.parametrize("strategy", ["entropy", {"type": "bald", "n_samples": 3}, "random"])
def test_image_and_box_queries(pool, family: str, strategy: object) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    build = faster_rcnn if family == "faster_rcnn" else retinanet
    adapter = TorchvisionDetectionAdapter(build(num_classes=len(pool.classes)))
    images = Selector(
        strategy, batch_size=3, progress=False
    ).select(  # type: ignore[arg-type]
        adapter, pool, pool.ids[:2], 3
    )
    assert len({q.item for q in images}) == 3 and not {q.item for q in images} & set(pool.ids[:2])
    state = LabelState(full=set(pool.ids[:2]))
    boxes = Selector(strategy, batch_size=3, progress=False, query="region").select(  # type: ignore[arg-type]
        adapter, pool, state, 4.0
    )
    assert 0 < len(boxes) <= 4 and all(q.box is not None and q.cost == 1.0 for q in boxes)
    state.add(boxes)
    again = Selector(strategy, batch_size=3, progress=False, query="region").select(  # type: ignore[arg-type]
        adapter, pool, state, 2.0
    )
    assert not {(q.item, q.region) for q in again} & {(q.item, q.region) for q in boxes}
