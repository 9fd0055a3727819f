"""Registries: every extension point of taskal, on mmengine's ``Registry``.

Users add their own components with a decorator in their own module and enable it from a
config with ``custom_imports=dict(imports=['my_module'])``::

    from taskal.registry import QUERY_STRATEGIES

    @QUERY_STRATEGIES.register_module()
    class MyStrategy(ScoreStrategy): ...

``MODELS`` and ``DATASETS`` are children of mmengine's root registries, as mmdet's and
mmseg's are, so a config can name ``dict(type="mmdet.RetinaNet", ...)`` or
``dict(type="mmseg.EncoderDecoder", ...)`` next to taskal's own ``dict(type="SmallCNN")``,
and builds under mmdet's or mmseg's default scope find their registry without warnings.

(``STRATEGIES`` is avoided on purpose: mmengine already uses that name for distributed
training strategies.)
"""

from __future__ import annotations

from typing import Any

from mmengine.config import Config, ConfigDict
from mmengine.registry import DATASETS as MMENGINE_DATASETS
from mmengine.registry import MODELS as MMENGINE_MODELS
from mmengine.registry import DefaultScope, Registry
from mmengine.utils import import_modules_from_strings

ADAPTERS = Registry("adapter", scope="taskal", locations=["taskal.adapters"])
QUERY_STRATEGIES = Registry("query strategy", scope="taskal", locations=["taskal.strategies"])
MODELS = Registry(
    "model",
    parent=MMENGINE_MODELS,
    scope="taskal",
    locations=["taskal.models", "taskal.detectors", "taskal.segmenters", "taskal.llal.openmmlab"],
)
DATASETS = Registry("dataset", parent=MMENGINE_DATASETS, scope="taskal", locations=["taskal.data"])


def import_custom_modules(cfg: Config | ConfigDict | dict[str, Any]) -> None:
    """Import the modules named in ``cfg['custom_imports']`` so their decorators run."""
    custom = cfg.get("custom_imports")
    if custom:
        import_modules_from_strings(**custom)


def build(registry: Registry, cfg: dict[str, Any] | ConfigDict, **default_args: Any) -> Any:
    """Build ``cfg`` from ``registry`` with an error that lists the registered names.

    An unscoped ``type`` is taskal's own and builds under the ``taskal`` scope; a scoped
    one (``"mmdet.RetinaNet"``) builds under its package's scope, so the modules it builds
    in turn (backbone, neck, head) resolve in that package's registry.
    """
    if not isinstance(cfg, dict) or "type" not in cfg:
        raise TypeError(f"a {registry.name} config must be a dict with a 'type' key, got {cfg!r}")
    registry.import_from_location()
    name = cfg["type"]
    scope = registry.scope
    if isinstance(name, str):
        prefix, _ = Registry.split_scope_key(name)
        scope = prefix or registry.scope
        if registry.get(name) is None:
            known = ", ".join(sorted(registry.module_dict))
            hint = (
                f"is the package {prefix!r} installed and does it register {name!r}?"
                if prefix
                else "if it lives in your own module, add "
                "custom_imports=dict(imports=['your.module']) to the config."
            )
            raise KeyError(f"unknown {registry.name} {name!r}. Registered: {known}. {hint}")
    with DefaultScope.overwrite_default_scope(scope):
        return registry.build(cfg, default_args=default_args or None)
