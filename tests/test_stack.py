"""The real OpenMMLab stack: models built from configs shipped inside the installed
packages run a forward pass on CPU (no weights downloaded)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


def _shipped_config(package: str, relative: str) -> Path:
    module = __import__(package)
    path = Path(module.__file__).parent / ".mim" / "configs" / relative
    assert path.is_file(), f"{package} does not ship {relative}"
    return path


def test_mmcv_ops_built() -> None:
    from mmcv.ops import nms

    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30]], dtype=torch.float)
    scores = torch.tensor([0.9, 0.8, 0.7])
    _, keep = nms(boxes, scores, iou_threshold=0.5)
    assert keep.tolist() == [0, 2]


def test_mmdet_retinanet_r18_forward() -> None:
    from mmdet.registry import MODELS
    from mmdet.structures import DetDataSample
    from mmdet.utils import register_all_modules
    from mmengine.config import Config
    from mmengine.structures import InstanceData

    register_all_modules()
    cfg = Config.fromfile(_shipped_config("mmdet", "retinanet/retinanet_r18_fpn_1x_coco.py"))
    cfg.model.backbone.init_cfg = None
    model = MODELS.build(cfg.model).eval()
    inputs = torch.randint(0, 255, (2, 3, 128, 128), dtype=torch.uint8)
    samples = []
    for _ in range(2):
        s = DetDataSample(
            metainfo={
                "img_shape": (128, 128),
                "ori_shape": (128, 128),
                "scale_factor": (1.0, 1.0),
                "pad_shape": (128, 128),
                "batch_input_shape": (128, 128),
            }
        )
        s.gt_instances = InstanceData(
            bboxes=torch.tensor([[10.0, 10.0, 60.0, 60.0]]), labels=torch.tensor([3])
        )
        samples.append(s)
    with torch.no_grad():
        data = model.data_preprocessor({"inputs": list(inputs), "data_samples": samples}, False)
        results = model(**data, mode="predict")
    assert len(results) == 2
    pred = results[0].pred_instances
    assert pred.bboxes.shape[-1] == 4 and pred.scores.shape[0] == pred.labels.shape[0]
    assert ((pred.labels >= 0) & (pred.labels < 80)).all()
    model.train()
    losses = model(
        **model.data_preprocessor({"inputs": list(inputs), "data_samples": samples}, True),
        mode="loss",
    )
    assert {"loss_cls", "loss_bbox"} <= set(losses)


def test_mmseg_unet_drive_forward() -> None:
    from mmengine.config import Config
    from mmseg.registry import MODELS
    from mmseg.structures import SegDataSample
    from mmseg.utils import register_all_modules

    register_all_modules()
    cfg = Config.fromfile(_shipped_config("mmseg", "unet/unet-s5-d16_fcn_4xb4-40k_drive-64x64.py"))
    # the shipped test pipeline slides 64x64 windows over 584x565; one whole 64x64 pass here
    cfg.model.test_cfg = dict(mode="whole")
    if cfg.model.get("data_preprocessor") is None:
        cfg.model.data_preprocessor = cfg.data_preprocessor
    cfg.model.data_preprocessor.size = (64, 64)
    # SyncBN needs a process group; plain BN on CPU.
    cfg_text = cfg.pretty_text.replace("SyncBN", "BN")
    cfg = Config.fromstring(cfg_text, file_format=".py")
    model = MODELS.build(cfg.model).eval()
    inputs = [torch.randint(0, 255, (3, 64, 64), dtype=torch.uint8) for _ in range(2)]
    samples = [
        SegDataSample(
            metainfo={"img_shape": (64, 64), "ori_shape": (64, 64), "pad_shape": (64, 64)}
        )
        for _ in range(2)
    ]
    with torch.no_grad():
        data = model.data_preprocessor({"inputs": inputs, "data_samples": samples}, False)
        results = model(**data, mode="predict")
    logits = results[0].seg_logits.data
    assert logits.shape == (2, 64, 64)  # DRIVE: background and vessel
    assert results[0].pred_sem_seg.data.shape == (1, 64, 64)
    # decode heads hold Dropout2d before conv_seg: the MC-dropout hook point
    assert any(isinstance(m, torch.nn.Dropout2d) for m in model.decode_head.modules())


@pytest.mark.parametrize("package", ["mmdet", "mmseg"])
def test_configs_ship_with_packages(package: str) -> None:
    module = __import__(package)
    configs = list((Path(module.__file__).parent / ".mim" / "configs").rglob("*.py"))
    assert len(configs) > 100
