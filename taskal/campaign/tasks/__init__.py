"""What a label campaign does differently per task: where the data is, how labels are encoded,
trained on, imported and exported. :func:`task_kit` picks the task's kit for a config."""

from __future__ import annotations

from mmengine.config import Config

from taskal.campaign.settings import CampaignSettings
from taskal.campaign.store import CampaignError
from taskal.campaign.tasks.base import TaskKit


def infer_task(cfg: Config, settings: CampaignSettings) -> str:
    """``al.task``, else mmdet/mmseg from the config's ``default_scope``, else ``cls``."""
    if settings.task is not None:
        return settings.task
    scope = cfg.get("default_scope")
    return {"mmdet": "det", "mmseg": "seg"}.get(str(scope), "cls")


def task_kit(cfg: Config, settings: CampaignSettings) -> TaskKit:
    task = infer_task(cfg, settings)
    kit: type[TaskKit]
    if task == "seg":
        from taskal.campaign.tasks.segmentation import SegmentationKit

        kit = SegmentationKit
    elif task == "cls":
        from taskal.campaign.tasks.classification import ClassificationKit

        kit = ClassificationKit
    elif task == "det":
        from taskal.campaign.tasks.detection import DetectionKit

        kit = DetectionKit
    else:
        raise CampaignError(f"campaigns for task {task!r} are not built yet (cls, det and seg are)")
    return kit(cfg, settings)


__all__ = ["TaskKit", "infer_task", "task_kit"]
