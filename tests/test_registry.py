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

    def score(self, outputs):
        return torch.arange(len(outputs), dtype=torch.float)


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
    picks = Selector(strategy, progress=False).select(adapter, pool, ["f"], 2)
    assert picks == ["e", "d"]


def test_unknown_adapter_name() -> None:
    with pytest.raises(KeyError, match=r"unknown adapter 'detectionn'.*classification"):
        build(ADAPTERS, {"type": "detectionn"})


def test_config_must_have_type() -> None:
    with pytest.raises(TypeError, match="'type' key"):
        build(QUERY_STRATEGIES, {"name": "entropy"})
