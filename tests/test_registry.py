"""Users extend taskal from their own modules, enabled by ``custom_imports``."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest
import torch
from mmengine.config import Config

from taskal.registry import ADAPTERS, QUERY_STRATEGIES, build, import_custom_modules
from taskal.selector import Selector, build_strategy

USER_MODULE = '''
import torch
from taskal.registry import ADAPTERS, QUERY_STRATEGIES
from taskal.adapters import ClassificationAdapter
from taskal.strategies import ScoreStrategy


@QUERY_STRATEGIES.register_module()
class LastFirst(ScoreStrategy):
    """Prefers candidates late in the pool (a toy rule)."""

    def score_batch(self, outputs):
        return torch.tensor([float(ord(i)) for i in outputs.ids])


@ADAPTERS.register_module()
class MyAdapter(ClassificationAdapter):
    pass
'''


@pytest.fixture
def user_module(tmp_path: Path):  # type: ignore[no-untyped-def]
    name = "my_taskal_plugins"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(USER_MODULE))
    sys.path.insert(0, str(tmp_path))
    try:
        yield name
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop(name, None)
        QUERY_STRATEGIES.module_dict.pop("LastFirst", None)
        ADAPTERS.module_dict.pop("MyAdapter", None)


def test_custom_imports_register_user_strategy_and_adapter(
    user_module: str, tmp_path: Path
) -> None:
    cfg_file = tmp_path / "user_cfg.py"
    cfg_file.write_text(
        f"custom_imports = dict(imports=['{user_module}'], allow_failed_imports=False)\n"
        "strategy = dict(type='LastFirst')\n"
        "adapter = dict(type='MyAdapter', model=dict(type='SmallCNN', in_channels=1, "
        "num_classes=3, width=4), input_shape=(1, 8, 8))\n"
    )
    with pytest.raises(KeyError, match="custom_imports"):
        build_strategy({"type": "LastFirst"})
    # mmengine's Config.fromfile runs custom_imports; import_custom_modules does the same
    # for configs built as plain dicts.
    cfg = Config.fromfile(str(cfg_file))
    import_custom_modules(cfg)
    strategy = build_strategy(dict(cfg.strategy))
    adapter = build(ADAPTERS, dict(cfg.adapter))
    assert type(adapter).__name__ == "MyAdapter"

    from taskal.data import TensorPool

    pool = TensorPool(torch.rand(6, 1, 8, 8), torch.zeros(6, dtype=torch.long), list("abcdef"))
    picks = Selector(strategy, batch_size=2, progress=False).select(adapter, pool, ["f"], 2)
    assert [q.item for q in picks] == ["e", "d"]


def test_unknown_adapter_name() -> None:
    with pytest.raises(KeyError, match=r"unknown adapter 'detectionn'.*classification"):
        build(ADAPTERS, {"type": "detectionn"})


def test_config_must_have_type() -> None:
    with pytest.raises(TypeError, match="'type' key"):
        build(QUERY_STRATEGIES, {"name": "entropy"})


def _inherit(tmp_path: Path, base: str) -> Config:
    """A config that inherits a shipped one through ``_base_``, as users write them."""
    path = tmp_path / "inherit.py"
    path.write_text(f"_base_ = ['{base}']\n")
    return Config.fromfile(str(path))


def test_models_build_mmdet_detectors_by_scoped_name(tmp_path: Path) -> None:
    """taskal's MODELS is a child of mmengine's root, so ``mmdet.*`` types build through it."""
    from taskal.registry import MODELS

    cfg = _inherit(tmp_path, "mmdet::retinanet/retinanet_r18_fpn_1x_coco.py").model
    cfg.backbone.init_cfg = None
    cfg.type = "mmdet.RetinaNet"
    detector = build(MODELS, dict(cfg))
    assert type(detector).__name__ == "RetinaNet"
    assert type(detector.backbone).__name__ == "ResNet"


def test_models_build_mmseg_segmentors_by_scoped_name(tmp_path: Path) -> None:
    from taskal.registry import MODELS

    cfg = _inherit(tmp_path, "mmseg::unet/unet-s5-d16_fcn_4xb4-40k_drive-64x64.py").model
    cfg.type = "mmseg.EncoderDecoder"
    cfg.data_preprocessor = None
    segmentor = build(MODELS, dict(cfg))
    assert type(segmentor).__name__ == "EncoderDecoder"


@pytest.mark.parametrize("scope", ["mmdet", "mmseg"])
def test_taskal_builds_under_openmmlab_default_scope_do_not_warn(
    scope: str, capfd: pytest.CaptureFixture[str]
) -> None:
    from mmengine.registry import DefaultScope

    from taskal.registry import MODELS

    with DefaultScope.overwrite_default_scope(scope):
        model = build(MODELS, {"type": "SmallCNN", "in_channels": 1, "num_classes": 3})
        strategy = build_strategy("entropy")
    assert type(model).__name__ == "SmallCNN" and type(strategy).__name__ == "Entropy"
    out, err = capfd.readouterr()
    assert "Failed to search registry" not in out + err


def test_unknown_scoped_model_names_the_package() -> None:
    from taskal.registry import MODELS

    with pytest.raises(KeyError, match=r"unknown model 'mmdet.NoSuchNet'.*'mmdet' installed"):
        build(MODELS, {"type": "mmdet.NoSuchNet"})
