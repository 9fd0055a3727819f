"""Summaries of simulation results: area under the learning curve, labels to match random."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np


def aulc(labeled: list[int], metric: list[float]) -> float:
    """Normalised area under a learning curve: the trapezoid area over the labeled range.

    Equals the mean metric over the range, so it reads in the metric's units.
    """
    x = np.asarray(labeled, dtype=float)
    y = np.asarray(metric, dtype=float)
    if len(x) == 1 or x[-1] == x[0]:
        return float(y.mean())
    return float(np.trapezoid(y, x) / (x[-1] - x[0]))


def curves_by_strategy(results: dict[str, Any]) -> dict[str, dict[str, np.ndarray]]:
    """Per strategy: ``labeled`` ``[R]`` (the mean over seeds), ``labeled_SR`` and ``metric``
    ``[S, R]`` over seeds, timings, and ``cost`` ``[S, R]`` where every point records one.

    Item queries label the same number of items in every seed; region queries touch a number
    of items that varies by seed (their curves compare by cost).
    """
    grouped: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for run in results["runs"]:
        grouped[run["strategy"]].append(run)
    out = {}
    for name, runs in grouped.items():
        lengths = {len(r["curve"]) for r in runs}
        if len(lengths) != 1:
            raise ValueError(f"runs of {name!r} have different numbers of rounds: {lengths}")
        labeled = np.asarray([[p["labeled"] for p in r["curve"]] for r in runs])
        out[name] = {
            "labeled": labeled.mean(0),
            "labeled_SR": labeled,
            "metric": np.asarray([[p["metric"] for p in r["curve"]] for r in runs]),
            "select_seconds": np.asarray([[p["select_seconds"] for p in r["curve"]] for r in runs]),
            "train_seconds": np.asarray([[p["train_seconds"] for p in r["curve"]] for r in runs]),
            "seeds": np.asarray([r["seed"] for r in runs]),
        }
        if all("cost" in p for r in runs for p in r["curve"]):
            out[name]["cost"] = np.asarray([[p["cost"] for p in r["curve"]] for r in runs])
    return out


def labels_to_reach(labeled: np.ndarray, mean_metric: np.ndarray, target: float) -> int | None:
    """The first labeled count (rounded mean over seeds) whose mean metric reaches
    ``target``; ``None`` if never."""
    hits = np.nonzero(mean_metric >= target - 1e-12)[0]
    return round(float(labeled[hits[0]])) if len(hits) else None


def aulc_axis(results: dict[str, Any]) -> str:
    """What AULC integrates over: ``"cost"`` when some run queried regions (its items
    touched are no measure of what it bought) and every point records a cost, else
    ``"labeled"``."""
    points = [p for r in results["runs"] for p in r["curve"]]
    regions = any("regions" in p for p in points)
    return "cost" if regions and all("cost" in p for p in points) else "labeled"


def summarize(results: dict[str, Any], baseline: str = "random") -> list[dict[str, Any]]:
    """One row per strategy: AULC and final metric (mean, std over seeds), labels needed to
    reach the baseline's final mean metric, AULC difference to the baseline, and timings.
    AULC runs over :func:`aulc_axis` (``aulc_axis`` in every row).
    """
    curves = curves_by_strategy(results)
    if baseline not in curves:
        raise ValueError(f"results hold no {baseline!r} runs to compare against")
    axis = aulc_axis(results)
    key = "cost" if axis == "cost" else "labeled_SR"
    base_final = float(curves[baseline]["metric"][:, -1].mean())
    base = curves[baseline]
    base_aulcs = {
        int(s): aulc(list(x), list(m))
        for s, x, m in zip(base["seeds"], base[key], base["metric"], strict=True)
    }
    rows: list[dict[str, Any]] = []
    for name, c in curves.items():
        aulcs = np.asarray(
            [aulc(list(x), list(m)) for x, m in zip(c[key], c["metric"], strict=True)]
        )
        paired = [
            a - base_aulcs[int(s)]
            for s, a in zip(c["seeds"], aulcs, strict=True)
            if int(s) in base_aulcs
        ]
        rows.append(
            {
                "strategy": name,
                "aulc_mean": float(aulcs.mean()),
                "aulc_std": float(aulcs.std()),
                "final_mean": float(c["metric"][:, -1].mean()),
                "final_std": float(c["metric"][:, -1].std()),
                "labels_to_baseline_final": labels_to_reach(
                    c["labeled"], c["metric"].mean(0), base_final
                ),
                "cost_to_baseline_final": _cost_to_reach(c, base_final),
                "aulc_delta": float(np.mean(paired)) if paired else float("nan"),
                "aulc_delta_wins": int(sum(d > 0 for d in paired)),
                "num_seeds": len(c["seeds"]),
                "select_seconds": float(c["select_seconds"][:, :-1].mean())
                if c["select_seconds"].shape[1] > 1
                else 0.0,
                "train_seconds": float(c["train_seconds"].mean()),
                "aulc_axis": axis,
            }
        )
    rows.sort(key=lambda r: -r["aulc_mean"])
    return rows


def _cost_to_reach(c: dict[str, np.ndarray], target: float) -> float | None:
    """Mean annotation cost (over seeds) at the first round whose mean metric reaches
    ``target``; ``None`` without recorded costs or if never reached."""
    if "cost" not in c:
        return None
    hits = np.nonzero(c["metric"].mean(0) >= target - 1e-12)[0]
    return float(c["cost"][:, hits[0]].mean()) if len(hits) else None


def format_table(
    rows: list[dict[str, Any]], metric: str, baseline: str = "random", cost: str | None = None
) -> str:
    """A Markdown table of :func:`summarize` rows (with a cost column when ``cost`` names
    the unit of recorded annotation costs, e.g. ``"boxes"``)."""
    cost_head = f" {cost} to reach {baseline}'s final |" if cost else ""
    over = f" over {cost or 'cost'}" if rows and rows[0].get("aulc_axis") == "cost" else ""
    head = (
        f"| strategy | AULC{over} ({metric}) | Δ AULC vs {baseline} (seeds better) | "
        f"final {metric} | labels to reach {baseline}'s final |{cost_head} "
        "select s/round | train s/round |\n"
        "|---|---|---|---|---|" + ("---|" if cost else "") + "---|---|\n"
    )
    lines = []
    for r in rows:
        reach = r["labels_to_baseline_final"]
        cost_cell = ""
        if cost:
            spent = r.get("cost_to_baseline_final")
            cost_cell = f" {spent:.0f} |" if spent is not None else " not reached |"
        lines.append(
            f"| {r['strategy']} | {r['aulc_mean']:.4f} ± {r['aulc_std']:.4f} | "
            f"{r['aulc_delta']:+.4f} ({r['aulc_delta_wins']}/{r['num_seeds']}) | "
            f"{r['final_mean']:.4f} ± {r['final_std']:.4f} | "
            f"{reach if reach is not None else 'not reached'} |{cost_cell} "
            f"{r['select_seconds']:.2f} | {r['train_seconds']:.2f} |"
        )
    return head + "\n".join(lines) + "\n"


#: how far short of a cost a curve may end and still be read at that cost (1 %).
SHORT_TOLERANCE = 0.01


def fraction_of_reference(
    c: dict[str, np.ndarray], reference: float, at_cost: float
) -> float | None:
    """A strategy's mean metric at annotation cost ``at_cost`` (linear between rounds, on
    the mean cost over seeds) as a fraction of ``reference`` (e.g. full supervision);
    ``None`` without costs or when ``at_cost`` lies outside the curve. A curve that ends at
    most :data:`SHORT_TOLERANCE` short of ``at_cost`` is read at its last point: region
    rounds leave a few units of their budget unspent when no region fits the rest."""
    if "cost" not in c or not reference > 0:
        return None
    x, y = c["cost"].mean(0), c["metric"].mean(0)
    if x[-1] < at_cost <= x[-1] + SHORT_TOLERANCE * at_cost:
        at_cost = float(x[-1])
    if not x[0] - 1e-9 <= at_cost <= x[-1] + 1e-9:
        return None
    return float(np.interp(at_cost, x, y) / reference)


def format_reference_table(
    results: dict[str, Any], total_cost: float, fractions: tuple[float, ...] = (0.05, 0.1)
) -> str:
    """A Markdown table: per strategy, its metric at each fraction of ``total_cost`` (the
    whole pool's annotation cost) over the mean of ``results["reference"]`` runs (a model
    trained on the whole pool)."""
    metric = results["metric"]
    reference = float(np.mean([r[metric] for r in results["reference"]]))
    heads = " | ".join(f"at {f:.0%} of the pool" for f in fractions)
    dice = [r["mDice"] for r in results["reference"] if "mDice" in r]
    also = f", mean Dice {np.mean(dice):.4f}" if dice else ""
    lines = [
        f"Full supervision (whole pool, mean over seeds): {metric} {reference:.4f}{also}.\n",
        f"| strategy | {heads} |",
        "|---|" + "---|" * len(fractions),
    ]
    final_dice: dict[str, list[float]] = {
        r["strategy"]: [] for r in results["runs"] if all("mDice" in p for p in r["curve"])
    }
    for r in results["runs"]:
        if r["strategy"] in final_dice:
            final_dice[r["strategy"]].append(r["curve"][-1]["mDice"])
    if final_dice:
        lines[1] += " final mean Dice |"
        lines[2] += "---|"
    for name, c in curves_by_strategy(results).items():
        cells = []
        for f in fractions:
            got = fraction_of_reference(c, reference, f * total_cost)
            cells.append("outside the curve" if got is None else f"{got:.1%}")
        if final_dice:
            values = final_dice.get(name)
            cells.append(f"{np.mean(values):.4f}" if values else "—")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_curves(results: dict[str, Any], path: Path, baseline: str = "random") -> None:
    """Learning curves: mean over seeds with a ±1 std band; the baseline dashed. With
    recorded annotation costs, a second panel plots the same curves against the mean cost."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = curves_by_strategy(results)
    by_cost = all("cost" in c for c in curves.values())
    fig, axes = plt.subplots(1, 2 if by_cost else 1, figsize=(14 if by_cost else 8, 5), dpi=120)
    axes = list(axes) if by_cost else [axes]
    for name, c in curves.items():
        mean, std = c["metric"].mean(0), c["metric"].std(0)
        style = {"linestyle": "--", "color": "black", "linewidth": 2} if name == baseline else {}
        xs = [c["labeled"], c["cost"].mean(0)] if by_cost else [c["labeled"]]
        for ax, x in zip(axes, xs, strict=True):
            (line,) = ax.plot(x, mean, marker="o", markersize=3, label=name, **style)
            ax.fill_between(x, mean - std, mean + std, alpha=0.1, color=line.get_color())
    n_seeds = max(len(c["seeds"]) for c in curves.values())
    for ax, label in zip(axes, ["labeled items", "annotation cost"], strict=False):
        ax.set_xlabel(label)
        ax.set_ylabel(results["metric"])
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    fig.suptitle(f"{results['task']}: mean ± std over {n_seeds} seeds")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
