"""Registries: every extension point of taskal, on mmengine's ``Registry``.

Users add their own components with a decorator in their own module and enable it from a
config with ``custom_imports=dict(imports=['my_module'])``::

    from taskal.registry import QUERY_STRATEGIES

    @QUERY_STRATEGIES.register_module()
    class MyStrategy(ScoreStrategy): ...

(``STRATEGIES`` is avoided on purpose: mmengine already uses that name for distributed
training strategies.)
"""

from __future__ import annotations

from typing import Any

from mmengine.config import Config, ConfigDict
from mmengine.registry import Registry
from mmengine.utils import import_modules_from_strings

ADAPTERS = Registry("adapter", scope="taskal", locations=["taskal.adapters"])
QUERY_STRATEGIES = Registry("query strategy", scope="taskal", locations=["taskal.strategies"])
MODELS = Registry("model", scope="taskal", locations=["taskal.models"])
DATASETS = Registry("dataset", scope="taskal", locations=["taskal.data"])


def import_custom_modules(cfg: Config | ConfigDict | dict[str, Any]) -> None:
    """Import the modules named in ``cfg['custom_imports']`` so their decorators run."""
    custom = cfg.get("custom_imports")
    if custom:
        import_modules_from_strings(**custom)


def build(registry: Registry, cfg: dict[str, Any] | ConfigDict, **default_args: Any) -> Any:
    """Build ``cfg`` from ``registry`` with an error that lists the registered names."""
    if not isinstance(cfg, dict) or "type" not in cfg:
        raise TypeError(f"a {registry.name} config must be a dict with a 'type' key, got {cfg!r}")
    registry.import_from_location()
    name = cfg["type"]
    if isinstance(name, str) and registry.get(name) is None:
        known = ", ".join(sorted(registry.module_dict))
        raise KeyError(
            f"unknown {registry.name} {name!r}. Registered: {known}. If it lives in your own "
            f"module, add custom_imports=dict(imports=['your.module']) to the config."
        )
    return registry.build(cfg, default_args=default_args or None)
