from __future__ import annotations

import numpy as np
import pytest
import torch

from taskal.data import load_digits, split_pool
from taskal.simulation import (
    Simulation,
    SimulationConfig,
    aulc,
    format_table,
    plot_curves,
    summarize,
)

FAST = {"epochs": 2, "min_epoch_items": 64}


@pytest.fixture(scope="module")
def data():  # type: ignore[no-untyped-def]
    digits = load_digits()
    pool, test = split_pool(digits.subset(digits.ids[:400]), 0.25)
    return pool, test


def _cfg(**kw) -> SimulationConfig:  # type: ignore[no-untyped-def]
    base = dict(
        strategies=["entropy"],
        initial=10,
        budget=10,
        rounds=2,
        seeds=[0],
        model={"type": "SmallCNN", "width": 4},
        train=FAST,
        progress=False,
        ensemble_size=2,
    )
    base.update(kw)
    return SimulationConfig(**base)


def test_runs_every_strategy_kind_and_adds_random(data) -> None:  # type: ignore[no-untyped-def]
    pool, test = data
    sim = Simulation(
        _cfg(strategies=["bald", "vote_entropy", "llal", "badge", "hybrid"]), pool, test
    )
    runs = sim.run()
    assert [r["strategy"] for r in runs] == [
        "random",
        "bald",
        "vote_entropy",
        "llal",
        "badge",
        "hybrid",
    ]
    for run in runs:
        assert [p["labeled"] for p in run["curve"]] == [10, 20, 30]
        assert all(0.0 <= p["metric"] <= 1.0 for p in run["curve"])
        assert run["curve"][-1]["select_seconds"] == 0.0
    # same seed: the same initial set and initial model for every non-LLAL strategy
    first = {r["strategy"]: r["curve"][0]["metric"] for r in runs}
    assert first["random"] == first["bald"] == first["badge"] == first["vote_entropy"]


def test_seeds_reproduce(data) -> None:  # type: ignore[no-untyped-def]
    pool, test = data
    a = Simulation(_cfg(), pool, test).run()
    b = Simulation(_cfg(), pool, test).run()
    assert [[p["metric"] for p in r["curve"]] for r in a] == [
        [p["metric"] for p in r["curve"]] for r in b
    ]


def test_initial_set_depends_on_seed(data) -> None:  # type: ignore[no-untyped-def]
    pool, test = data
    sim = Simulation(_cfg(seeds=[0, 1]), pool, test)
    assert sim.initial_labeled(0) != sim.initial_labeled(1)
    assert sim.initial_labeled(0) == sim.initial_labeled(0)


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"rounds": 100}, "pool holds only"),
        ({"strategies": ["nope"]}, "unknown query strategy 'nope'"),
        ({"task": "det"}, "supports task"),
        ({"budget": 0}, "budget must be a positive integer"),
        ({"seeds": []}, "seeds"),
        ({"strategies": ["entropy", {"type": "entropy"}]}, "unique"),
    ],
)
def test_bad_settings(data, kw, match) -> None:  # type: ignore[no-untyped-def]
    pool, test = data
    with pytest.raises((ValueError, KeyError), match=match):
        Simulation(_cfg(**kw), pool, test)


def test_aulc_and_summary() -> None:
    assert aulc([0, 10], [0.0, 1.0]) == pytest.approx(0.5)
    assert aulc([0, 10, 20], [0.5, 0.5, 0.5]) == pytest.approx(0.5)

    def run(name: str, seed: int, metrics: list[float]) -> dict:  # type: ignore[type-arg]
        return {
            "strategy": name,
            "seed": seed,
            "curve": [
                {"labeled": 10 * (i + 1), "metric": m, "select_seconds": 0.1, "train_seconds": 1.0}
                for i, m in enumerate(metrics)
            ],
        }

    results = {
        "task": "cls",
        "metric": "accuracy",
        "runs": [
            run("random", 0, [0.5, 0.6, 0.7]),
            run("random", 1, [0.5, 0.6, 0.7]),
            run("good", 0, [0.5, 0.7, 0.8]),
            run("good", 1, [0.5, 0.7, 0.8]),
        ],
    }
    rows = {r["strategy"]: r for r in summarize(results)}
    assert rows["good"]["labels_to_baseline_final"] == 20
    assert rows["random"]["labels_to_baseline_final"] == 30
    assert rows["good"]["aulc_delta"] == pytest.approx(0.075)
    assert rows["good"]["aulc_delta_wins"] == 2
    del results["runs"][:2]
    with pytest.raises(ValueError, match="no 'random' runs"):
        summarize(results)


def test_llal_attaches_predictor(data) -> None:  # type: ignore[no-untyped-def]
    pool, test = data
    sim = Simulation(_cfg(strategies=["llal"]), pool, test)
    adapter = sim.train(sim.strategies[1][1], pool.ids[:10], seed=0, r=0)
    assert adapter.loss_predictor is not None
    loss = adapter.predict_loss(pool.take(pool.ids[:4]))
    assert loss.shape == (4,) and torch.isfinite(loss).all()


@pytest.mark.parametrize(
    "train, match",
    [({"batch_size": 1}, "batch_size"), ({"epochs": 0}, "epochs"), ({"lr": 0}, "lr")],
)
def test_bad_training_settings(train, match) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=match):
        _cfg(train=train)


def test_strategy_dict_without_type(data) -> None:  # type: ignore[no-untyped-def]
    pool, test = data
    with pytest.raises(TypeError, match="'type' key"):
        Simulation(_cfg(strategies=[{"name": "x"}]), pool, test)


def test_adapter_type_is_built_from_the_registry() -> None:
    """Defect 8: a nonexistent adapter fails at once instead of running a classifier."""
    with pytest.raises(KeyError, match=r"unknown adapter 'no_such_adapter'.*classification"):
        _cfg(adapter={"type": "no_such_adapter"})


def test_registered_adapter_is_used(data, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from taskal.adapters import ClassificationAdapter
    from taskal.registry import ADAPTERS

    @ADAPTERS.register_module(name="recording_classifier", force=True)
    class Recording(ClassificationAdapter):
        built = 0

        def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
            super().__init__(*args, **kwargs)
            Recording.built += 1

    try:
        pool, test = data
        sim = Simulation(_cfg(adapter={"type": "recording_classifier"}), pool, test)
        adapter = sim.train(sim.strategies[0][1], pool.ids[:10], seed=0, r=0)
        assert isinstance(adapter, Recording) and Recording.built == 1
    finally:
        ADAPTERS.module_dict.pop("recording_classifier", None)


@pytest.mark.parametrize("name", ["vote_entropy", "ensemble_kl"])
def test_ensemble_of_one_fails_at_build(name: str) -> None:
    """Defect 10: an ensemble strategy with ensemble_size=1 fails before any training."""
    with pytest.raises(ValueError, match="ensemble_size >= 2"):
        _cfg(strategies=[name], ensemble_size=1)


def test_two_stage_stage_given_by_name_builds(data) -> None:  # type: ignore[no-untyped-def]
    pool, test = data
    cfg = _cfg(strategies=[{"type": "two_stage", "first": "entropy", "second": "coreset"}])
    sim = Simulation(cfg, pool, test)
    assert [label for label, _ in sim.strategies] == ["random", "two_stage"]


def test_llal_stop_grad_is_a_fraction_of_the_schedule() -> None:
    """Defect 3: the paper stops at 60 % of the schedule, whatever its length."""
    from taskal.training import LLALConfig

    cfg = LLALConfig()
    assert cfg.stop_grad_epoch(200) == 120
    assert cfg.stop_grad_epoch(15) == 9
    assert cfg.stop_grad_epoch(5) == 3
    with pytest.raises(ValueError, match="stop_grad_fraction"):
        LLALConfig(stop_grad_fraction=1.5)
    with pytest.raises(ValueError, match="replaced by stop_grad_fraction"):
        _cfg(llal={"stop_grad_epoch": 9})


def test_llal_training_detaches_after_the_fraction(data, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from taskal.llal import LossPredictionModule

    flags: list[bool] = []
    forward = LossPredictionModule.forward

    def spy(self, feats, detach=False):  # type: ignore[no-untyped-def]
        flags.append(detach)
        return forward(self, feats, detach)

    monkeypatch.setattr(LossPredictionModule, "forward", spy)
    pool, test = data
    train = {"epochs": 5, "min_epoch_items": 16, "batch_size": 16}
    sim = Simulation(_cfg(strategies=["llal"], train=train), pool, test)
    sim.train(sim.strategies[1][1], pool.ids[:16], seed=0, r=0)
    # one step per epoch: detached from epoch 3 of 5 on (60 %)
    assert flags == [False, False, False, True, True]


def test_region_runs_touch_different_item_counts_per_seed(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Region queries touch a seed-dependent number of items: each seed's AULC uses its own
    x, the table reads the mean, costs go in the second panel of the plot."""

    def run(name: str, seed: int, labeled: list[int], metrics: list[float]) -> dict:  # type: ignore[type-arg]
        curve = [
            {"labeled": n, "metric": m, "cost": 5.0 * i, "select_seconds": 0, "train_seconds": 0}
            for i, (n, m) in enumerate(zip(labeled, metrics, strict=True))
        ]
        return {"strategy": name, "seed": seed, "curve": curve}

    results = {
        "task": "det",
        "metric": "mAP",
        "runs": [
            run("random", 0, [10, 20, 30], [0.1, 0.2, 0.3]),
            run("boxes", 0, [10, 14, 20], [0.1, 0.3, 0.3]),
            run("boxes", 1, [10, 16, 26], [0.1, 0.3, 0.3]),
        ],
    }
    rows = {r["strategy"]: r for r in summarize(results)}
    assert rows["boxes"]["labels_to_baseline_final"] == 15  # mean of 14 and 16
    assert rows["boxes"]["cost_to_baseline_final"] == 5.0
    want = np.mean([aulc([10, 14, 20], [0.1, 0.3, 0.3]), aulc([10, 16, 26], [0.1, 0.3, 0.3])])
    assert rows["boxes"]["aulc_mean"] == pytest.approx(want)
    plot_curves(results, tmp_path / "curve.png")
    assert (tmp_path / "curve.png").stat().st_size > 0
    results["runs"][2]["curve"].pop()
    with pytest.raises(ValueError, match="different numbers of rounds"):
        summarize(results)


def test_region_runs_integrate_over_cost_and_read_fractions_near_the_end() -> None:
    """With region runs present, AULC integrates over annotation cost for every strategy;
    a region curve ending a few pixels short of a fraction's cost is read at its end."""
    from taskal.simulation.report import aulc_axis, format_reference_table

    def run(name: str, cost: list[float], metric: list[float], regions: bool) -> dict:  # type: ignore[type-arg]
        curve = [
            {
                "labeled": 8 * (i + 1),
                "metric": m,
                "cost": c,
                "select_seconds": 0,
                "train_seconds": 0,
            }
            for i, (c, m) in enumerate(zip(cost, metric, strict=True))
        ]
        if regions:
            for p in curve:
                p["regions"] = 3
        return {"strategy": name, "seed": 0, "curve": curve}

    results = {
        "task": "seg",
        "metric": "mIoU",
        "runs": [
            run("random", [100.0, 200.0, 300.0], [0.2, 0.3, 0.4], False),
            run("regions", [100.0, 199.0, 298.5], [0.2, 0.5, 0.6], True),
        ],
        "reference": [{"seed": 0, "mIoU": 0.8}],
    }
    assert aulc_axis(results) == "cost"
    rows = {r["strategy"]: r for r in summarize(results)}
    assert rows["regions"]["aulc_mean"] == pytest.approx(
        aulc([100.0, 199.0, 298.5], [0.2, 0.5, 0.6])
    )
    table = format_reference_table(results, 3000.0, fractions=(0.1,))
    assert "| regions | 75.0% |" in table and "| random | 50.0% |" in table
    assert "AULC over pixels" in format_table(list(rows.values()), "mIoU", cost="pixels")
