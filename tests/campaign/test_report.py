"""Tests for the campaign's HTML report."""

from __future__ import annotations

import base64
import io
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from taskal.campaign.report import GalleryEntry, RoundSummary, write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SECTIONS = ("summary", "stopping", "metric", "kappa", "scores", "classes", "gallery", "rounds")


def _rounds(kappas: list[float | None], metric: bool = False, cost: bool = True) -> list:
    return [
        RoundSummary(
            round=i,
            strategy="entropy",
            labeled=100 * (i + 1),
            cost=1500.0 * (i + 1) if cost else None,
            metric=0.5 + 0.04 * i if metric else None,
            metric_name="mIoU" if metric else None,
            kappa=k,
        )
        for i, k in enumerate(kappas)
    ]


def _gray(h: int = 40, w: int = 48) -> np.ndarray:
    return np.full((h, w), 128, dtype=np.uint8)


def _full_gallery() -> list[GalleryEntry]:
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)
    mask = np.zeros((40, 56), dtype=bool)
    mask[10:30, 20:40] = True
    return [
        GalleryEntry(
            title="#1 img_017.png  score 0.93",
            image=rgb,
            boxes=np.array([[2.0, 3.0, 20.0, 25.0], [30.0, 5.0, 50.0, 35.0]]),
            box_labels=["cat", "dog $5"],
            region_box=(20.0, 10.0, 40.0, 30.0),
            heatmap=rng.random((40, 56)),
            region_mask=mask,
        ),
        GalleryEntry(title="#2 gray.png", image=_gray(), region_mask=np.ones((40, 48), bool)),
        GalleryEntry(title="#3 gray1.png", image=_gray()[:, :, None], boxes=np.zeros((0, 4))),
    ]


def _write(path: Path, **overrides: object) -> str:
    """Write a report (by default a lean one: the kappa figure only) and return its HTML."""
    kwargs: dict = {
        "title": "Parcels campaign",
        "task": "detection",
        "rounds": _rounds([None, 0.9, 0.995, 0.996, 0.999]),
        "scores": np.zeros(0),
        "batch_class_counts": {},
        "gallery": [],
        "cost_unit": "boxes",
    }
    kwargs.update(overrides)
    out = write_report(path, **kwargs)
    assert out == path
    return path.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def full(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    path = tmp_path_factory.mktemp("report") / "campaign.html"
    page = _write(
        path,
        rounds=_rounds([None, 0.9, 0.995, 0.996, 0.999], metric=True),
        scores=np.linspace(0.0, 1.0, 200),
        batch_class_counts={"car": 4, "bus": 1, "van": 0},
        gallery=_full_gallery(),
        notes=["seed set: 100 random images"],
    )
    return path, page


def _images(page: str) -> list[tuple[str, bytes]]:
    """``(data-file, decoded bytes)`` of every ``<img>``; fails on a non-PNG data URI."""
    out = []
    for tag in re.findall(r"<img\b[^>]*>", page):
        src = re.search(r'src="([^"]*)"', tag)
        name = re.search(r'data-file="([^"]*)"', tag)
        assert src is not None and name is not None, tag[:80]
        prefix = "data:image/png;base64,"
        assert src.group(1).startswith(prefix), src.group(1)[:40]
        out.append((name.group(1), base64.b64decode(src.group(1)[len(prefix) :], validate=True)))
    return out


def _pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(int)


def test_all_sections_and_header_facts(full: tuple[Path, str]) -> None:
    _, page = full
    for anchor in (*SECTIONS, "notes"):
        assert f'id="{anchor}"' in page
    assert "<h1>Parcels campaign</h1>" in page
    assert "<dd>4 (entropy)</dd>" in page  # latest round
    assert "<dd>500</dd>" in page  # labeled items
    assert "<dd>7,500 boxes</dd>" in page  # cost
    assert "seed set: 100 random images" in page


def test_every_image_is_an_embedded_png_also_on_disk(full: tuple[Path, str]) -> None:
    path, page = full
    images = _images(page)
    expected = {"metric.png", "kappa.png", "scores.png", "classes.png"}
    expected |= {f"gallery_0{i}.png" for i in (1, 2, 3)}
    assert {name for name, _ in images} == expected and len(images) == len(expected)
    files_dir = path.parent / "campaign_files"
    on_disk = {p.name: p.read_bytes() for p in files_dir.iterdir()}
    assert on_disk == dict(images)
    for _, data in images:
        assert data.startswith(PNG_SIGNATURE)
        assert b"Software" not in data and b"matplotlib" not in data  # no version stamp
        Image.open(io.BytesIO(data)).verify()
    assert not [p for p in path.parent.rglob("*") if p.name.endswith(".tmp")]


def test_no_network_resources(full: tuple[Path, str]) -> None:
    _, page = full
    assert "http://" not in page and "https://" not in page
    assert "<link" not in page and "<script" not in page


def test_gallery_draws_boxes_region_box_mask_and_heatmap(tmp_path: Path) -> None:
    """On a flat gray image each overlay brings its own colour: red boxes, yellow dashed
    queried box, cyan mask outline, a coloured heat map."""
    h, w = 40, 48
    mask = np.zeros((h, w), bool)
    mask[5:20, 5:20] = True
    entries = {
        "plain": GalleryEntry("plain", _gray()),
        "boxes": GalleryEntry("b", _gray(), boxes=np.array([[25, 22, 45, 38]]), box_labels=["x"]),
        "query": GalleryEntry("q", _gray(), region_box=(25, 22, 45, 38)),
        "mask": GalleryEntry("m", _gray(), region_mask=mask),
        "heat": GalleryEntry("h", _gray(), heatmap=np.linspace(0, 1, h * w).reshape(h, w)),
    }
    page = _write(tmp_path / "g.html", gallery=list(entries.values()))
    pixels = dict(
        zip(entries, [_pixels(d) for n, d in _images(page) if "gallery" in n], strict=True)
    )

    def red(img: np.ndarray) -> int:
        return int(((img[..., 0] > 180) & (img[..., 1] < 140) & (img[..., 2] < 140)).sum())

    def yellow(img: np.ndarray) -> int:
        return int(((img[..., 0] > 180) & (img[..., 1] > 150) & (img[..., 2] < 100)).sum())

    def cyan(img: np.ndarray) -> int:
        return int(((img[..., 0] < 100) & (img[..., 1] > 150) & (img[..., 2] > 180)).sum())

    assert np.ptp(pixels["plain"], axis=-1).max() == 0  # gray stays gray
    assert red(pixels["boxes"]) > 100 and yellow(pixels["boxes"]) == 0
    assert yellow(pixels["query"]) > 100 and red(pixels["query"]) == 0
    assert cyan(pixels["mask"]) > 100 and yellow(pixels["mask"]) == 0
    assert np.ptp(pixels["heat"], axis=-1).mean() > 20  # colour overlay everywhere


def test_text_is_html_escaped(tmp_path: Path) -> None:
    evil = "<script>alert('x')</script>"
    page = _write(
        tmp_path / "e.html",
        title=evil,
        task=f"seg {evil}",
        batch_class_counts={evil: 2},
        gallery=[GalleryEntry(title=evil, image=_gray())],
        notes=[evil],
        cost_unit="<b>px</b>",
    )
    assert "<script" not in page and "<b>" not in page
    assert page.count("&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;") >= 5


def test_no_metric_gives_a_sentence_and_no_figure(tmp_path: Path) -> None:
    rounds = _rounds([None, 0.9], cost=False)
    page = _write(tmp_path / "m.html", rounds=rounds, batch_class_counts={"car": 1})
    assert "No round has a metric" in page
    assert "metric.png" not in {n for n, _ in _images(page)}
    assert "<dd>not tracked</dd>" in page
    assert not (tmp_path / "m_files" / "metric.png").exists()


def test_stop_text_stabilised(tmp_path: Path) -> None:
    page = _write(tmp_path / "s.html", rounds=_rounds([None, 0.9, 0.995, 0.996, 0.999]))
    # windows ending at rounds 3 (mean .964) and 4 (mean .9967 >= .99)
    assert "Predictions have stabilised since round 4" in page
    assert "Not yet" not in page


def test_stop_text_stabilised_uses_round_numbers_not_positions(tmp_path: Path) -> None:
    rounds = _rounds([None, 1.0, 1.0, 1.0])
    for r in rounds:
        r.round += 10
    page = _write(tmp_path / "s.html", rounds=rounds, stop_window=2)
    assert "Predictions have stabilised since round 12" in page


def test_stop_text_not_yet(tmp_path: Path) -> None:
    page = _write(tmp_path / "n.html", rounds=_rounds([None, 0.5, 0.9, 0.95, 0.97]))
    assert "Not yet: last kappas 0.900, 0.950, 0.970 (mean 0.940" in page
    assert "stabilised" not in page


def test_stop_text_needs_more_rounds(tmp_path: Path) -> None:
    page = _write(tmp_path / "f.html", rounds=_rounds([None, 1.0, 1.0]))
    assert "needs at least 4 rounds" in page
    page = _write(tmp_path / "f.html", rounds=_rounds([None]), stop_window=1)
    assert "needs at least 2 rounds" in page
    assert "No kappa yet" in page


def test_non_finite_scores_raise_and_leave_the_old_report(tmp_path: Path) -> None:
    path = tmp_path / "r.html"
    before = _write(path)
    for bad in (np.array([0.1, np.nan]), np.array([[np.inf, 0.0]])):
        with pytest.raises(ValueError, match="non-finite"):
            _write(path, scores=bad, title="new")
    assert path.read_text(encoding="utf-8") == before
    assert not (tmp_path / "x.html").exists()
    with pytest.raises(ValueError, match="non-finite"):
        _write(tmp_path / "x.html", scores=np.array([np.nan]))
    assert not (tmp_path / "x.html").exists() and not (tmp_path / "x_files").exists()


def test_same_input_same_bytes_and_stale_pngs_removed(tmp_path: Path) -> None:
    path, files_dir = tmp_path / "d.html", tmp_path / "d_files"
    two = [GalleryEntry("a", _gray()), GalleryEntry("b", _gray())]
    kwargs = {"rounds": _rounds([None]), "gallery": two, "batch_class_counts": {"car": 2}}
    first = _write(path, **kwargs)
    first_files = {p.name: p.read_bytes() for p in files_dir.iterdir()}
    assert set(first_files) == {"classes.png", "gallery_01.png", "gallery_02.png"}
    assert _write(path, **kwargs) == first
    assert {p.name: p.read_bytes() for p in files_dir.iterdir()} == first_files
    page = _write(path, rounds=_rounds([None]), gallery=two[:1])
    assert "No predicted classes for this batch." in page
    assert {p.name for p in files_dir.iterdir()} == {"gallery_01.png"}
    (files_dir / "mine.png").write_bytes(b"not ours")
    _write(path, rounds=_rounds([None]))
    assert {p.name for p in files_dir.iterdir()} == {"mine.png"}  # only our own names go


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"rounds": []}, "at least one"),
        ({"rounds": _rounds([None, 1.5])}, r"kappas\[0\]"),
        ({"stop_window": 0}, "window"),
        ({"batch_class_counts": {"car": -1}}, "non-negative"),
        ({"gallery": [GalleryEntry("f", np.zeros((4, 4, 3)))]}, "uint8"),
        ({"gallery": [GalleryEntry("f", np.zeros((4, 4, 2), np.uint8))]}, "shape"),
        ({"gallery": [GalleryEntry("h", _gray(), heatmap=np.zeros((3, 3)))]}, "heatmap"),
        ({"gallery": [GalleryEntry("m", _gray(), region_mask=np.ones((3, 3), bool))]}, "mask"),
        ({"gallery": [GalleryEntry("b", _gray(), boxes=np.ones((2, 3)))]}, "boxes"),
        (
            {"gallery": [GalleryEntry("l", _gray(), boxes=np.ones((2, 4)), box_labels=["a"])]},
            "box_labels",
        ),
        ({"gallery": [GalleryEntry("r", _gray(), region_box=(0, 0, 1))]}, "region_box"),  # type: ignore[arg-type]
    ],
)
def test_invalid_inputs_raise(tmp_path: Path, overrides: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        _write(tmp_path / "bad.html", **overrides)
    assert not (tmp_path / "bad.html").exists()
