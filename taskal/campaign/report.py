"""A label campaign's report: one self-contained HTML page, rewritten after every round.

:func:`write_report` turns plain data (numpy arrays, dicts, :class:`RoundSummary` and
:class:`GalleryEntry` records) into ``<name>.html`` plus a folder ``<name>_files/`` with each
figure as a PNG. The HTML embeds the same PNGs as base64 data URIs and carries its own CSS,
so the single file opens anywhere, offline, and loads nothing from the network.

Sections: a header (task, latest round, labeled count, cost), the stopping signal
(:func:`taskal.functional.agreement.stop_signal` on the rounds' kappas), the metric against
labeled items and against cost, the kappa across rounds, the current score distribution,
the batch's predicted classes and a gallery of the top queries.

Figures are drawn with matplotlib's Agg canvas on bare ``Figure`` objects (no pyplot state,
so nothing is left open), at a low dpi, without timestamps or version strings, so the same
input gives the same bytes. Everything is checked and drawn in memory before the first file
is touched; files are then written to temporary names and moved into place with
``os.replace``, the HTML last. A crash never leaves a half-written file: the HTML is either
the previous report or the new one, complete (it does not need the folder, whose PNGs may
then be a mix of both rounds until the next write).
"""

from __future__ import annotations

import base64
import contextlib
import html
import io
import math
import numbers
import os
import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import MaxNLocator

from taskal.functional.agreement import stop_signal

#: resolution of every figure; low on purpose, the report is read on screen.
DPI = 90
#: bars shown in the class-count chart; the rest are summed into one "other" bar.
MAX_CLASS_BARS = 25
#: matplotlib settings for every figure (deterministic, no LaTeX).
_RC = {"svg.hashsalt": "taskal", "font.size": 8, "text.usetex": False, "axes.titlesize": 9}
#: the PNG names this module writes into ``<stem>_files/`` (stale ones are removed).
_OWN_PNG = re.compile(r"(metric|kappa|scores|classes|gallery_\d+)\.png")
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PRED_COLOR, _QUERY_COLOR, _MASK_COLOR = "#ff3b30", "#ffd60a", "#00e5ff"


@dataclass
class RoundSummary:
    """One finished round of a campaign.

    Attributes:
        round: the round's number.
        strategy: the strategy that picked the round's queries.
        labeled: labeled items when the round's model was trained.
        cost: annotation cost spent so far (pixels, boxes, images), ``None`` if not tracked.
        metric: the model's metric on the campaign's evaluation set, if it has one.
        metric_name: the metric's name (``"accuracy"``, ``"mIoU"``), if any.
        kappa: Cohen's kappa between this round's and the previous round's predictions on
            the stop set; ``None`` for the first round or when no stop set is kept.
    """

    round: int
    strategy: str
    labeled: int
    cost: float | None
    metric: float | None
    metric_name: str | None
    kappa: float | None


@dataclass
class GalleryEntry:
    """One top query, drawn as one picture of the gallery.

    Attributes:
        title: caption, e.g. ``"#1 img_017.png  score 0.93"``.
        image: ``[H, W, 3]`` uint8 RGB, or ``[H, W]`` (or ``[H, W, 1]``) uint8 gray.
        boxes: ``[N, 4]`` predicted boxes, ``x1, y1, x2, y2`` in pixels (solid outline).
        box_labels: ``N`` labels written on the boxes.
        region_box: the queried box ``x1, y1, x2, y2`` (dashed outline, distinct colour).
        heatmap: ``[H, W]`` float uncertainty overlaid semi-transparently (NaN: not drawn).
        region_mask: ``[H, W]`` bool queried region, outlined.
    """

    title: str
    image: np.ndarray
    boxes: np.ndarray | None = None
    box_labels: list[str] | None = None
    region_box: tuple[float, float, float, float] | None = None
    heatmap: np.ndarray | None = None
    region_mask: np.ndarray | None = None


def write_report(
    path: str | Path,
    *,
    title: str,
    task: str,
    rounds: Sequence[RoundSummary],
    scores: np.ndarray,
    batch_class_counts: Mapping[str, int],
    gallery: Sequence[GalleryEntry],
    cost_unit: str = "labels",
    stop_threshold: float = 0.99,
    stop_window: int = 3,
    notes: Sequence[str] = (),
) -> Path:
    """Write the campaign's HTML report at ``path`` and its figures in ``<stem>_files/``.

    Everything is validated and drawn in memory first; then the PNGs are written, then the
    HTML, each to a temporary file moved into place with ``os.replace``. PNGs this module
    wrote for an earlier report (say a longer gallery) are removed once the HTML is in place.

    Args:
        path: the ``.html`` file to write; its folder is created if missing.
        title: the report's title.
        task: what is being labeled (``"detection on parcels"``).
        rounds: the finished rounds, oldest first; at least one.
        scores: the current round's scores of the scored pool, any shape (flattened); all
            finite. May be empty.
        batch_class_counts: predicted class name -> how many queried items of this round's
            batch it covers (non-negative integers).
        gallery: the top queries, best first; each becomes one picture.
        cost_unit: the unit of :attr:`RoundSummary.cost` (``"pixels"``, ``"boxes"``).
        stop_threshold: mean kappa that counts as stable (see :func:`stop_signal`).
        stop_window: how many consecutive kappas are averaged (see :func:`stop_signal`).
        notes: free-text lines listed at the end.

    Returns:
        The path of the HTML file.

    Raises:
        ValueError: if ``rounds`` is empty, a metric, cost or score is not finite, a kappa is
            outside ``[-1, 1]``, a class count is not a non-negative integer, a gallery array
            has the wrong shape or dtype, or the stop arguments are invalid.
    """
    path = Path(path)
    pngs: dict[str, bytes] = {}
    body = _body(
        pngs,
        title=title,
        task=task,
        rounds=rounds,
        scores=scores,
        counts=batch_class_counts,
        gallery=gallery,
        cost_unit=cost_unit,
        threshold=stop_threshold,
        window=stop_window,
        notes=notes,
    )
    page = _page(title, body)
    files_dir = path.with_name(f"{path.stem}_files")
    files_dir.mkdir(parents=True, exist_ok=True)
    for name, data in pngs.items():
        _write_atomic(files_dir / name, data)
    _write_atomic(path, page.encode("utf-8"))
    _remove_stale(files_dir, keep=set(pngs))
    return path


# --------------------------------------------------------------------------- page


def _body(
    pngs: dict[str, bytes],
    *,
    title: str,
    task: str,
    rounds: Sequence[RoundSummary],
    scores: np.ndarray,
    counts: Mapping[str, int],
    gallery: Sequence[GalleryEntry],
    cost_unit: str,
    threshold: float,
    window: int,
    notes: Sequence[str],
) -> str:
    """All sections' HTML; the figures they embed are added to ``pngs`` by file name."""
    # check everything before drawing anything: bad input fails fast
    rounds = _check_rounds(rounds)
    _stop_round(rounds, threshold, window)  # checks the kappas and the stop arguments
    flat_scores = _check_scores(scores)
    pairs = _check_counts(counts)
    entries = [_check_entry(e) for e in gallery]
    sections = [
        _header_html(title, task, rounds, cost_unit),
        _stop_html(rounds, threshold, window),
        _metric_html(pngs, rounds, cost_unit),
        _kappa_html(pngs, rounds, threshold, window),
        _scores_html(pngs, flat_scores),
        _classes_html(pngs, pairs),
        _gallery_html(pngs, entries),
        _rounds_table_html(rounds, cost_unit),
    ]
    if isinstance(notes, str):
        notes = [notes]
    if notes:
        items = "".join(f"<li>{_esc(n)}</li>" for n in notes)
        sections.append(_section("notes", "Notes", f"<ul>{items}</ul>"))
    return "\n".join(sections)


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;
margin:0 auto;max-width:1100px;padding:1em 1.5em;color:#222;background:#fff;line-height:1.4}
h1{margin-bottom:.2em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
dl.facts{display:grid;grid-template-columns:max-content auto;gap:.2em 1.2em}
dl.facts dt{font-weight:600}dl.facts dd{margin:0}
.signal{padding:.6em 1em;border-radius:6px;border-left:6px solid #999;background:#f4f4f4}
.signal.stop{border-color:#2e7d32;background:#e8f5e9}
.signal.wait{border-color:#ef6c00;background:#fff3e0}
img{max-width:100%;height:auto}
.gallery{display:grid;grid-template-columns:repeat(auto-fill,minmax(240px,1fr));gap:1em}
.gallery figure{margin:0;border:1px solid #ddd;border-radius:6px;padding:.4em;background:#fafafa}
.gallery figcaption{font-size:.85em;word-break:break-all;margin-top:.3em}
table{border-collapse:collapse;font-size:.9em}
th,td{border:1px solid #ddd;padding:.2em .6em;text-align:right}
th:nth-child(2),td:nth-child(2){text-align:left}
.muted{color:#666}
"""


def _page(title: str, body: str) -> str:
    """The whole document around ``body``: inline CSS only, no external resource."""
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{_esc(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        f"{body}\n</body>\n</html>\n"
    )


def _section(anchor: str, heading: str, content: str) -> str:
    return f'<section id="{anchor}">\n<h2>{_esc(heading)}</h2>\n{content}\n</section>'


def _esc(text: object) -> str:
    return html.escape(str(text), quote=True)


def _img(pngs: dict[str, bytes], name: str, data: bytes, alt: str) -> str:
    """Register ``data`` as ``name`` and return an ``<img>`` embedding it as a data URI."""
    pngs[name] = data
    b64 = base64.b64encode(data).decode("ascii")
    return f'<img src="data:image/png;base64,{b64}" alt="{_esc(alt)}" data-file="{_esc(name)}">'


def _fmt(x: float | None, unit: str = "") -> str:
    """A number for people: integers with thousands separators, others to 4 digits."""
    if x is None:
        return "—"
    text = f"{int(x):,}" if float(x).is_integer() and abs(x) < 1e15 else f"{x:,.4g}"
    return f"{text} {unit}".strip()


# --------------------------------------------------------------------------- validation


def _check_rounds(rounds: Sequence[RoundSummary]) -> list[RoundSummary]:
    """``rounds`` as a list; raise on no round or a non-finite metric or cost."""
    rounds = list(rounds)
    if not rounds:
        raise ValueError("a report needs at least one finished round, got none")
    for r in rounds:
        for field in ("metric", "cost"):
            value = getattr(r, field)
            if value is not None and not _is_finite_number(value):
                raise ValueError(f"round {r.round}: {field} must be a finite number, got {value!r}")
    return rounds


def _is_finite_number(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)


def _check_scores(scores: np.ndarray) -> np.ndarray:
    """``scores`` flattened to float64; raise if any is NaN or inf."""
    arr = np.asarray(scores)
    if not any(np.issubdtype(arr.dtype, t) for t in (np.integer, np.floating, np.bool_)):
        raise ValueError(f"scores must be real numbers, got dtype {arr.dtype}")
    flat = arr.astype(np.float64).ravel()
    bad = int((~np.isfinite(flat)).sum())
    if bad:
        raise ValueError(
            f"scores contain {bad} non-finite values (NaN/inf) of {flat.size}; the report "
            "only draws finite scores: fix the strategy's scores before writing it"
        )
    return flat


def _check_counts(counts: Mapping[str, int]) -> list[tuple[str, int]]:
    """``counts`` as ``(name, count)`` pairs, most frequent first (ties by name)."""
    pairs: list[tuple[str, int]] = []
    for name, count in counts.items():
        if not isinstance(count, numbers.Integral) or isinstance(count, bool) or count < 0:
            raise ValueError(
                f"class count for {name!r} must be a non-negative integer, got {count!r}"
            )
        pairs.append((str(name), int(count)))
    return sorted(pairs, key=lambda p: (-p[1], p[0]))


# --------------------------------------------------------------------------- sections


def _header_html(title: str, task: str, rounds: list[RoundSummary], cost_unit: str) -> str:
    last = rounds[-1]
    cost = "not tracked" if last.cost is None else _fmt(last.cost, cost_unit)
    facts = [
        ("Task", task),
        ("Latest round", f"{last.round} ({last.strategy})"),
        ("Labeled items", _fmt(last.labeled)),
        ("Cost spent", cost),
    ]
    if last.metric is not None:
        facts.append((last.metric_name or "Metric", f"{last.metric:.4g}"))
    rows = "".join(f"<dt>{_esc(k)}</dt><dd>{_esc(v)}</dd>" for k, v in facts)
    return (
        f'<header id="summary">\n<h1>{_esc(title)}</h1>\n<dl class="facts">{rows}</dl>\n</header>'
    )


def _stop_round(
    rounds: list[RoundSummary], threshold: float, window: int
) -> tuple[list[float], int | None]:
    """The rounds' kappas (rounds without one skipped) and the ``round`` number at which
    :func:`stop_signal` fires on them, or ``None``; validates the kappas and stop arguments.

    The signal's index ``r`` means "the window ending with the ``r``-th kappa", so the stop
    round is the round that kappa belongs to (``r`` itself when rounds are numbered from 0
    and every round after the first has a kappa).
    """
    with_kappa = [r for r in rounds if r.kappa is not None]
    kappas = [r.kappa for r in with_kappa if r.kappa is not None]
    stop = stop_signal(kappas, threshold, window)
    return kappas, None if stop is None else with_kappa[stop - 1].round


def _stop_html(rounds: list[RoundSummary], threshold: float, window: int) -> str:
    """The stopping signal in words (see :func:`stop_signal` for the convention)."""
    kappas, stop_round = _stop_round(rounds, threshold, window)
    rule = (
        f"Rule: stop once the mean Cohen's kappa between consecutive rounds' predictions on "
        f"the stop set, over {window} rounds in a row, reaches {threshold:g} "
        "(Bloodgood & Vijay-Shanker, 2009)."
    )
    if len(kappas) < window:
        text = (
            f"Not enough rounds yet: the stopping signal needs at least {window + 1} rounds "
            f"({window} kappas between consecutive rounds); {len(kappas)} so far."
        )
        cls = "wait"
    elif stop_round is not None:
        text = _stopped_text(kappas, stop_round, threshold, window)
        cls = "stop"
    else:
        last = kappas[-window:]
        text = (
            f"Not yet: last kappas {', '.join(f'{k:.3f}' for k in last)} "
            f"(mean {math.fsum(last) / window:.3f}, below the threshold {threshold:g})."
        )
        cls = "wait"
    content = f'<p class="signal {cls}">{_esc(text)}</p>\n<p class="muted">{_esc(rule)}</p>'
    return _section("stopping", "Stopping signal", content)


def _stopped_text(kappas: list[float], stop_round: int, threshold: float, window: int) -> str:
    text = (
        f"Predictions have stabilised since round {stop_round} — more labels are likely "
        "to stop paying."
    )
    latest = math.fsum(kappas[-window:]) / window
    if latest < threshold:
        text += f" (The mean of the latest {window} kappas has since fallen to {latest:.3f}.)"
    return text


def _metric_html(pngs: dict[str, bytes], rounds: list[RoundSummary], cost_unit: str) -> str:
    data = _metric_figure(rounds, cost_unit)
    if data is None:
        content = (
            "<p>No round has a metric: the campaign has no evaluation set, so only the "
            "stopping signal tells whether more labels still pay.</p>"
        )
    else:
        content = _img(pngs, "metric.png", data, "metric against labeled items and cost")
    return _section("metric", "Metric", content)


def _kappa_html(
    pngs: dict[str, bytes], rounds: list[RoundSummary], threshold: float, window: int
) -> str:
    _, stop_round = _stop_round(rounds, threshold, window)
    data = _kappa_figure(rounds, threshold, stop_round)
    if data is None:
        content = "<p>No kappa yet: it needs two rounds' predictions on the stop set.</p>"
    else:
        content = _img(pngs, "kappa.png", data, "kappa between consecutive rounds")
    return _section("kappa", "Agreement between consecutive rounds", content)


def _scores_html(pngs: dict[str, bytes], flat: np.ndarray) -> str:
    if flat.size == 0:
        content = "<p>No scored pool this round.</p>"
    else:
        summary = (
            f"{flat.size:,} scored items; min {flat.min():.4g}, median "
            f"{float(np.median(flat)):.4g}, max {flat.max():.4g}."
        )
        figure = _img(pngs, "scores.png", _scores_figure(flat), "score histogram")
        content = f"<p>{_esc(summary)}</p>\n{figure}"
    return _section("scores", "Score distribution", content)


def _classes_html(pngs: dict[str, bytes], pairs: list[tuple[str, int]]) -> str:
    total = sum(c for _, c in pairs)
    if total == 0:
        content = "<p>No predicted classes for this batch.</p>"
    else:
        figure = _img(pngs, "classes.png", _classes_figure(pairs), "batch class counts")
        content = f"<p>{total:,} predicted labels over {len(pairs)} classes.</p>\n{figure}"
    return _section("classes", "Predicted classes in the batch", content)


def _gallery_html(pngs: dict[str, bytes], gallery: Sequence[GalleryEntry]) -> str:
    if not gallery:
        return _section("gallery", "Top queries", "<p>No queries this round.</p>")
    legend = (
        '<p class="muted">Solid red: predicted boxes. Dashed yellow: the queried box. '
        "Cyan outline: the queried region. Colour overlay: uncertainty (brighter = less "
        "certain).</p>"
    )
    figures = []
    for i, entry in enumerate(gallery, start=1):
        img = _img(pngs, f"gallery_{i:02d}.png", _gallery_figure(entry), entry.title)
        figures.append(f"<figure>{img}<figcaption>{_esc(entry.title)}</figcaption></figure>")
    grid = '<div class="gallery">\n' + "\n".join(figures) + "\n</div>"
    return _section("gallery", "Top queries", f"{legend}\n{grid}")


def _rounds_table_html(rounds: list[RoundSummary], cost_unit: str) -> str:
    head = "".join(
        f"<th>{_esc(h)}</th>"
        for h in ("round", "strategy", "labeled", f"cost ({cost_unit})", "metric", "kappa")
    )
    rows = []
    for r in rounds:
        metric = "—" if r.metric is None else f"{r.metric:.4g} {r.metric_name or ''}".strip()
        kappa = "—" if r.kappa is None else f"{r.kappa:.4f}"
        cells = (r.round, r.strategy, _fmt(r.labeled), _fmt(r.cost), metric, kappa)
        rows.append("<tr>" + "".join(f"<td>{_esc(c)}</td>" for c in cells) + "</tr>")
    table = f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"
    return _section("rounds", "Rounds", table)


# --------------------------------------------------------------------------- figures


def _new_figure(width: float, height: float) -> Figure:
    """A bare Agg figure (not registered with pyplot: nothing to close)."""
    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def _png(fig: Figure) -> bytes:
    """``fig`` as PNG bytes, without the software tag (same input, same bytes)."""
    buf = io.BytesIO()
    with matplotlib.rc_context(_RC):
        fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    data = buf.getvalue()
    assert data.startswith(_PNG_SIGNATURE)
    return data


def _plain(text: str) -> str:
    """``text`` for matplotlib, with ``$`` escaped so it is never parsed as mathtext."""
    return str(text).replace("$", r"\$")


def _metric_figure(rounds: list[RoundSummary], cost_unit: str) -> bytes | None:
    pts = [r for r in rounds if r.metric is not None]
    if not pts:
        return None
    names = [r.metric_name for r in rounds if r.metric_name]
    name = _plain(names[-1] if names else "metric")
    with_cost = [r for r in pts if r.cost is not None]
    with matplotlib.rc_context(_RC):
        fig = _new_figure(3.4 * (2 if with_cost else 1), 2.6)
        axes = fig.subplots(1, 2 if with_cost else 1, squeeze=False)[0]
        _line(axes[0], [r.labeled for r in pts], [r.metric for r in pts], "labeled items", name)
        if with_cost:
            xs = [r.cost for r in with_cost]
            ys = [r.metric for r in with_cost]
            _line(axes[1], xs, ys, _plain(f"cost ({cost_unit})"), name)
        fig.tight_layout()
    return _png(fig)


def _line(ax: Any, xs: Sequence[Any], ys: Sequence[Any], xlabel: str, ylabel: str) -> None:
    ax.plot(xs, ys, marker="o", markersize=3, linewidth=1.2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)


def _kappa_figure(
    rounds: list[RoundSummary], threshold: float, stop_round: int | None
) -> bytes | None:
    pts = [r for r in rounds if r.kappa is not None]
    if not pts:
        return None
    kappas = [float(r.kappa) for r in pts if r.kappa is not None]
    with matplotlib.rc_context(_RC):
        fig = _new_figure(4.2, 2.4)
        ax = fig.subplots()
        ax.plot([r.round for r in pts], kappas, marker="o", markersize=3, linewidth=1.2)
        ax.axhline(threshold, color="#2e7d32", linestyle="--", linewidth=1, label="threshold")
        if stop_round is not None:
            ax.axvline(stop_round, color="#2e7d32", linestyle=":", linewidth=1.2, label="stop")
        ax.set_ylim(min(0.0, *kappas) - 0.05, 1.03)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("round")
        ax.set_ylabel("kappa vs previous round")
        ax.legend(loc="lower right")
        ax.grid(alpha=0.3)
        # every label is known (ticks in [-1, 1]): fixed margins, no layout pass
        fig.subplots_adjust(left=0.14, right=0.97, bottom=0.17, top=0.96)
    return _png(fig)


def _scores_figure(flat: np.ndarray) -> bytes:
    bins = int(min(50, max(10, round(math.sqrt(flat.size)))))
    with matplotlib.rc_context(_RC):
        fig = _new_figure(4.2, 2.4)
        ax = fig.subplots()
        ax.hist(flat, bins=bins, color="#1f77b4")
        ax.set_xlabel("score (higher = label first)")
        ax.set_ylabel("items")
        ax.grid(alpha=0.3)
        fig.tight_layout()
    return _png(fig)


def _classes_figure(pairs: list[tuple[str, int]]) -> bytes:
    shown = pairs[:MAX_CLASS_BARS]
    rest = pairs[MAX_CLASS_BARS:]
    if rest:
        shown = [*shown, (f"other ({len(rest)} classes)", sum(c for _, c in rest))]
    names = [_plain(n) for n, _ in shown][::-1]
    values = [c for _, c in shown][::-1]
    with matplotlib.rc_context(_RC):
        fig = _new_figure(4.2, 0.9 + 0.18 * len(shown))
        ax = fig.subplots()
        ax.barh(range(len(values)), values, color="#6a51a3")
        ax.set_yticks(range(len(values)), names)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("queried items")
        ax.grid(alpha=0.3, axis="x")
        fig.tight_layout()
    return _png(fig)


# --------------------------------------------------------------------------- gallery


def _check_entry(entry: GalleryEntry) -> GalleryEntry:
    """A copy of ``entry`` with checked arrays: image ``[H, W(, 3)]`` uint8, boxes ``[N, 4]``
    float64, heat map and mask ``[H, W]``, region box 4 floats."""
    image = _check_image(entry.image)
    hw = (int(image.shape[0]), int(image.shape[1]))
    boxes = None if entry.boxes is None else _check_boxes(entry.boxes)
    labels = None if entry.box_labels is None else [str(s) for s in entry.box_labels]
    if labels and boxes is None:
        raise ValueError("box_labels were given without boxes")
    if labels is not None and boxes is not None and len(labels) != len(boxes):
        raise ValueError(f"{len(labels)} box_labels for {len(boxes)} boxes")
    region_box = None
    if entry.region_box is not None:
        coords = np.asarray(entry.region_box, dtype=np.float64)
        if coords.shape != (4,) or not np.isfinite(coords).all():
            raise ValueError(
                f"region_box must be 4 finite numbers x1, y1, x2, y2, got {entry.region_box!r}"
            )
        region_box = (float(coords[0]), float(coords[1]), float(coords[2]), float(coords[3]))
    heatmap = None if entry.heatmap is None else _check_map(entry.heatmap, hw, "heatmap")
    mask = None if entry.region_mask is None else _check_map(entry.region_mask, hw, "region_mask")
    return replace(
        entry,
        image=image,
        boxes=boxes,
        box_labels=labels,
        region_box=region_box,
        heatmap=None if heatmap is None else heatmap.astype(np.float64),
        region_mask=None if mask is None else mask.astype(bool),
    )


def _check_image(image: np.ndarray) -> np.ndarray:
    """``image`` as ``[H, W, 3]`` or ``[H, W]`` uint8 (``[H, W, 1]`` is squeezed)."""
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] == 3)) or 0 in arr.shape:
        raise ValueError(
            f"gallery image must be [H, W, 3] RGB or [H, W] gray, got shape {arr.shape}"
        )
    if arr.dtype != np.uint8:
        raise ValueError(
            f"gallery image must be uint8, got {arr.dtype}; convert floats in [0, 1] with "
            "(image * 255).round().astype(np.uint8)"
        )
    return arr


def _check_map(arr: np.ndarray, hw: tuple[int, int], name: str) -> np.ndarray:
    out = np.asarray(arr)
    if out.shape != hw:
        raise ValueError(f"{name} must be [H, W] = {list(hw)} like its image, got {out.shape}")
    return out


def _check_boxes(boxes: np.ndarray) -> np.ndarray:
    """``boxes`` as finite ``[N, 4]`` float64 (an empty array of any shape is no box)."""
    arr = np.asarray(boxes, dtype=np.float64)
    if arr.size == 0:
        return arr.reshape(0, 4)
    if arr.ndim != 2 or arr.shape[1] != 4 or not np.isfinite(arr).all():
        raise ValueError(f"boxes must be finite [N, 4] xyxy pixels, got shape {arr.shape}")
    return arr


def _gallery_figure(entry: GalleryEntry) -> bytes:
    """One checked query (see :func:`_check_entry`): the image, its heat map, predicted
    boxes, queried region outline and queried box, in that order (the query on top)."""
    image = entry.image
    h, w = image.shape[:2]
    with matplotlib.rc_context(_RC):
        fig = _new_figure(3.0, min(4.5, max(1.2, 3.0 * h / w)))
        ax = fig.add_axes((0.0, 0.0, 1.0, 1.0))
        if image.ndim == 2:
            ax.imshow(image, cmap="gray", vmin=0, vmax=255, interpolation="antialiased")
        else:
            ax.imshow(image, interpolation="antialiased")
        if entry.heatmap is not None:
            _draw_heatmap(ax, entry.heatmap)
        if entry.boxes is not None:
            _draw_boxes(ax, entry.boxes, entry.box_labels)
        if entry.region_mask is not None:
            _draw_region_mask(ax, entry.region_mask)
        if entry.region_box is not None:
            _draw_region_box(ax, entry.region_box)
        ax.set_xlim(-0.5, w - 0.5)
        ax.set_ylim(h - 0.5, -0.5)
        ax.set_axis_off()
    return _png(fig)


def _draw_heatmap(ax: Any, heatmap: np.ndarray) -> None:
    values = np.ma.masked_invalid(heatmap)
    if values.count():
        ax.imshow(values, cmap="inferno", alpha=0.45, interpolation="nearest")


def _draw_boxes(ax: Any, boxes: np.ndarray, labels: list[str] | None) -> None:
    for i, (x1, y1, x2, y2) in enumerate(boxes):
        ax.add_patch(
            Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=_PRED_COLOR, linewidth=1.2)
        )
        if labels is not None:
            ax.text(
                x1,
                y1,
                _plain(labels[i]),
                fontsize=6,
                color="white",
                va="bottom",
                clip_on=True,
                bbox={"facecolor": _PRED_COLOR, "edgecolor": "none", "pad": 1.0, "alpha": 0.8},
            )


def _draw_region_box(ax: Any, box: tuple[float, float, float, float]) -> None:
    x1, y1, x2, y2 = box
    ax.add_patch(
        Rectangle(
            (x1, y1),
            x2 - x1,
            y2 - y1,
            fill=False,
            edgecolor=_QUERY_COLOR,
            linewidth=2.0,
            linestyle="--",
        )
    )


def _draw_region_mask(ax: Any, region: np.ndarray) -> None:
    if not region.any():
        return
    # pad with False so a region touching the border (or the whole image) is closed
    h, w = region.shape
    padded = np.pad(region, 1).astype(np.float64)
    ax.contour(
        np.arange(-1, w + 1),
        np.arange(-1, h + 1),
        padded,
        levels=[0.5],
        colors=_MASK_COLOR,
        linewidths=1.5,
    )


# --------------------------------------------------------------------------- files


def _write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _remove_stale(files_dir: Path, keep: set[str]) -> None:
    """Remove PNGs an earlier report wrote into ``files_dir`` that this one did not."""
    for child in files_dir.iterdir():
        if _OWN_PNG.fullmatch(child.name) and child.name not in keep:
            with contextlib.suppress(FileNotFoundError):
                child.unlink()
