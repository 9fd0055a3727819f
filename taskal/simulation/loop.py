"""Multi-round active learning against a ground-truth oracle (a simulation).

Every (strategy, seed) run starts from the same seed-dependent initial labeled set and
trains with the same seed-dependent initialisation each round, so curves differ only by
what the strategies select. Random sampling always runs as the baseline.
"""

from __future__ import annotations

import contextlib
import copy
import re
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmengine.config import Config

from taskal.adapters import EnsembleAdapter
from taskal.data.pool import TensorPool
from taskal.fitting import fit_classifier
from taskal.models import build_model
from taskal.registry import ADAPTERS, build
from taskal.rounds import mix_seed
from taskal.selector import QUERY_KINDS, Selector, build_strategy
from taskal.simulation.rounds import Labeled, RoundLoop
from taskal.strategies.base import QueryStrategy
from taskal.training import LLALConfig, TrainConfig, accuracy
from taskal.types import Adapter

SUPPORTED_TASKS = ("cls",)


@dataclass
class SimulationConfig:
    """Settings of one simulation (the ``al`` block of a config, resolved).

    Attributes:
        strategies: registered names or config dicts (a dict may carry ``name``, the label
            used in results); ``random`` is added first when missing.
        initial: size of the initial random labeled set.
        budget: labels bought per round.
        rounds: selection rounds (the curve has ``rounds + 1`` points).
        seeds: one run per seed and strategy.
        ensemble_size: members trained for ensemble strategies.
        model: :data:`~taskal.registry.MODELS` config; ``num_classes`` and ``in_channels``
            are filled from the data.
        adapter: the adapter config: ``type`` (a registered adapter, ``classification`` by
            default) and its extra arguments; ``model``, ``input_shape`` and ``device`` are
            filled in.
        train: :class:`TrainConfig` fields.
        llal: :class:`LLALConfig` fields.
        device: where models run.
        progress: show progress bars.
    """

    strategies: list[Any] = field(default_factory=lambda: ["random", "entropy"])
    initial: int = 20
    budget: int = 20
    rounds: int = 10
    seeds: list[int] = field(default_factory=lambda: [0])
    ensemble_size: int = 5
    model: dict[str, Any] = field(default_factory=lambda: {"type": "SmallCNN"})
    adapter: dict[str, Any] = field(default_factory=lambda: {"type": "classification"})
    train: dict[str, Any] = field(default_factory=dict)
    llal: dict[str, Any] = field(default_factory=dict)
    device: str = "cpu"
    progress: bool = True
    task: str = "cls"

    def __post_init__(self) -> None:
        if self.task not in SUPPORTED_TASKS:
            raise ValueError(f"simulation supports task {SUPPORTED_TASKS} today, got {self.task!r}")
        for name in ("initial", "budget", "ensemble_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.rounds, int) or self.rounds < 0:
            raise ValueError(f"rounds must be a non-negative integer, got {self.rounds!r}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be a non-empty list of distinct ints, got {self.seeds}")
        if self.initial < 2:
            raise ValueError("initial must be at least 2 (a model needs two labels to train)")
        self.train_cfg = _dataclass_from(TrainConfig, self.train, "train")
        self.llal_cfg = _dataclass_from(LLALConfig, self.llal, "al.llal")
        adapter_type = self.adapter.get("type", "classification")
        ADAPTERS.import_from_location()
        if ADAPTERS.get(adapter_type) is None:
            known = ", ".join(sorted(ADAPTERS.module_dict))
            raise KeyError(
                f"unknown adapter {adapter_type!r} in adapter.type. Registered: {known}. If it "
                "lives in your own module, add custom_imports=dict(imports=['your.module'])."
            )
        self.adapter = {**self.adapter, "type": adapter_type}
        query_kinds(self.strategies, regions=None)  # classification queries whole items
        uses_ensemble = [
            strategy_label(s) for s in self.strategies if _sampling_of(s) == "ensemble"
        ]
        if uses_ensemble and self.ensemble_size < 2:
            raise ValueError(
                f"strategies {uses_ensemble} score a deep ensemble, which needs "
                f"ensemble_size >= 2 members; got ensemble_size={self.ensemble_size}"
            )


def _dataclass_from(cls: Any, values: dict[str, Any], where: str) -> Any:
    """``cls(**values)`` with an error naming unknown keys and the accepted ones."""
    accepted = list(cls.__dataclass_fields__)
    unknown = sorted(set(values) - set(accepted))
    if unknown:
        hint = ""
        if "stop_grad_epoch" in unknown:
            hint = (
                " (stop_grad_epoch was replaced by stop_grad_fraction, a fraction of the "
                "schedule: 0.6 = the paper's 120 of 200 epochs)"
            )
        raise ValueError(f"{where} does not take {unknown}{hint}; it accepts {accepted}")
    return cls(**values)


#: keys of a strategy entry that configure the simulation, not the strategy.
RUN_KEYS = ("name", "query")


def _strategy_cfg(spec: Any) -> Any:
    """A strategy entry without the keys that configure the run (``name``, ``query``)."""
    return spec if isinstance(spec, str) else {k: v for k, v in spec.items() if k not in RUN_KEYS}


def load_openmmlab_config(path: str, options: Mapping[str, Any], key: str, example: str) -> Config:
    """``Config.fromfile(path)`` with ``options`` merged in (as ``--cfg-options``), with a
    clear error naming ``key`` for a missing file or a config without a model."""
    if not Path(path).is_file():
        raise ValueError(
            f"{key} {path!r} is not a file; give the path of a config, e.g. {example!r} "
            "(relative paths are read from the working directory)"
        )
    cfg = Config.fromfile(path)
    if options:
        cfg.merge_from_dict(dict(options))
    if not isinstance(cfg.get("model"), Mapping):
        raise ValueError(f"{key} {path!r} defines no model dict")
    return cfg


def check_round_settings(cfg: Any) -> None:
    """``initial``, ``budget`` and ``batch_size`` positive ints, ``rounds`` >= 0, distinct
    ``seeds``: the round sizes every task's simulation config shares."""
    for name in ("initial", "budget", "batch_size"):
        value = getattr(cfg, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not isinstance(cfg.rounds, int) or cfg.rounds < 0:
        raise ValueError(f"rounds must be a non-negative integer, got {cfg.rounds!r}")
    if not cfg.seeds or len(set(cfg.seeds)) != len(cfg.seeds):
        raise ValueError(f"seeds must be a non-empty list of distinct ints, got {cfg.seeds}")


@contextlib.contextmanager
def run_dir(work_dir: str | None, name: str, prefix: str) -> Iterator[Path]:
    """``<work_dir>/<name>`` (a safe file name), or a temporary folder removed on exit."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)
    if work_dir is not None:
        yield Path(work_dir) / name
        return
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        yield Path(tmp) / name


def _sampling_of(spec: Any) -> str:
    return build_strategy(_strategy_cfg(spec)).sampling


def strategy_label(cfg: Any) -> str:
    """The name a strategy config is reported under."""
    if isinstance(cfg, str):
        return cfg
    if not isinstance(cfg, dict) or "type" not in cfg:
        raise TypeError(f"a strategy must be a name or a dict with a 'type' key, got {cfg!r}")
    return str(cfg.get("name", cfg["type"]))


def resolve_strategies(specs: list[Any]) -> list[tuple[str, QueryStrategy]]:
    """Build every strategy up front (a bad config fails before any training)."""
    specs = list(specs)
    if not any(strategy_label(s) == "random" for s in specs):
        specs.insert(0, "random")
    built: list[tuple[str, QueryStrategy]] = []
    for spec in specs:
        built.append((strategy_label(spec), build_strategy(_strategy_cfg(spec))))
    labels = [label for label, _ in built]
    if len(set(labels)) != len(labels):
        raise ValueError(f"strategy labels must be unique, got {labels}; give each a 'name'")
    return built


def query_kinds(specs: list[Any], regions: str | None = None) -> dict[str, str]:
    """Label -> query kind of every strategy entry: ``query="region"`` in a dict entry asks
    for region queries (``regions`` names the task's regions, ``None``: it has none), any
    other entry queries whole items. A strategy that cannot rank regions is refused here."""
    kinds = {}
    for spec in specs:
        kind = spec.get("query", "item") if isinstance(spec, dict) else "item"
        label = strategy_label(spec)
        if kind not in QUERY_KINDS:
            raise ValueError(f"strategy {label!r} has query={kind!r}; choose one of {QUERY_KINDS}")
        if kind == "item":
            try:
                Selector(_strategy_cfg(spec), query="item")
            except ValueError as err:
                raise ValueError(f"strategy {label!r}: {err}; add query='region'") from None
        if kind == "region":
            if regions is None:
                raise ValueError(
                    f"strategy {label!r} asks for region queries, but this task has no "
                    "regions; drop query='region'"
                )
            try:
                Selector(_strategy_cfg(spec), query="region")
            except ValueError as err:
                raise ValueError(f"strategy {label!r} cannot query {regions}: {err}") from None
        kinds[label] = kind
    return kinds


class Simulation(RoundLoop):
    """Run the rounds of every (strategy, seed) on a pool and a held-out test set."""

    def __init__(self, cfg: SimulationConfig, pool: TensorPool, test: TensorPool) -> None:
        if pool.targets is None or test.targets is None:
            raise ValueError("a simulation needs labels for the pool and the test set")
        self.cfg = cfg
        self.pool = pool
        self.test = test
        self.check_pool_size()
        self.strategies = resolve_strategies(cfg.strategies)
        num_classes = len(pool.classes) if pool.classes else int(pool.targets.max()) + 1
        self.model_cfg = dict(cfg.model, num_classes=num_classes, in_channels=pool.inputs.shape[1])
        self.input_shape = tuple(pool.inputs.shape[1:])
        self.test_batch = test.take(test.ids)

    def evaluate(self, adapter: Adapter) -> float:
        """Top-1 accuracy on the test split (of the first member for an ensemble)."""
        return accuracy(_first_member(adapter), self.test_batch)

    def _new_adapter(self) -> Adapter:
        model = build_model(copy.deepcopy(self.model_cfg))
        return build(
            ADAPTERS,
            dict(self.cfg.adapter),
            model=model,
            input_shape=self.input_shape,
            device=self.cfg.device,
        )

    def train(self, strategy: QueryStrategy, labeled: Labeled, seed: int, r: int) -> Adapter:
        """Train a fresh model (or ensemble) on ``labeled`` for round ``r``."""
        assert isinstance(labeled, list), "classification queries whole items"
        batch = self.pool.take(labeled)
        members = self.cfg.ensemble_size if strategy.sampling == "ensemble" else 1
        adapters = [
            fit_classifier(
                self._new_adapter,
                batch,
                self.cfg.train_cfg,
                mix_seed(seed, r, 0, m),
                mix_seed(seed, r, 2, m),
                strategy,
                self.cfg.llal_cfg,
            )
            for m in range(members)
        ]
        return adapters[0] if members == 1 else EnsembleAdapter(adapters)


def _first_member(adapter: Adapter) -> Adapter:
    """Metrics come from one model, so ensemble curves compare with single-model baselines."""
    return adapter.members[0] if isinstance(adapter, EnsembleAdapter) else adapter
