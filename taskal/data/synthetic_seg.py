"""Synthetic medical-like segmentation data written to disk: PNG slices or NIfTI volumes.

Organ-like blobs (ellipses or ellipsoids deformed by low-frequency noise) of several
classes on a textured background, small rare lesions inside the organs, a smooth intensity
drift (bias field) across the image and Gaussian noise. Classes differ in mean intensity,
texture and shape, with overlapping intensity ranges, so a small CNN can learn them but a
single threshold cannot. Class 0 is background, classes ``1..C-2`` are organs and the last
class is the lesion class (with only two classes there is one organ class and no lesions).

The files are what real data looks like on disk, so demos and tests go through the same
loaders as real data::

    files = make_synthetic_segmentation("work_dirs/organs", num_images=200)
    pool = load_segmentation_folder(files.img_dir, files.ann_dir, classes=...)  # mmseg layout

    vols = make_synthetic_volumes("work_dirs/organs3d")  # nnU-Net / MSD layout
    slices = load_volume_slices(vols.image_dir, vols.label_dir)

Everything is drawn with numpy from one seed: image ``i`` depends only on ``(seed, i)``
and the drawing parameters, so the same call writes byte-identical files.
"""

from __future__ import annotations

import inspect
import json
import math
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image

from taskal.registry import DATASETS

#: the generators' default classes: background, two organs and a lesion class.
SYNTHETIC_SEG_CLASSES = ("background", "liver", "kidney", "lesion")

# Appearance of each class on a [0, 1] intensity scale: (mean, texture amplitude, texture
# scale in pixels). Organs cycle through _ORGAN_LOOKS; their means overlap within the
# texture, bias and noise spread, so texture and shape are needed to tell them apart.
_BACKGROUND_LOOK = (0.32, 0.07, 4.0)
_ORGAN_LOOKS = ((0.56, 0.09, 0.7), (0.60, 0.035, 3.0), (0.48, 0.07, 1.5))
_LESION_LOOK = (0.42, 0.06, 1.2)
#: extra brightness of the rim (cortex) of organs with an odd index (the "kidney" look).
_RIM = 0.12
#: organ semi-axes as fractions of each side, drawn uniformly; larger in 3D so that organs
#: fill a similar share of a volume as of an image.
_ORGAN_RADII = {2: (0.12, 0.28), 3: (0.18, 0.36)}
_LESION_RADII = {2: (0.03, 0.07), 3: (0.05, 0.10)}


class SyntheticSegmentationFiles(NamedTuple):
    """Paths of a written 2D set: pass ``img_dir`` and ``ann_dir`` to
    :func:`taskal.data.load_segmentation_folder`."""

    root: Path
    img_dir: Path
    ann_dir: Path
    meta_file: Path


class SyntheticVolumeFiles(NamedTuple):
    """Paths of a written 3D set: pass ``image_dir`` and ``label_dir`` to
    :func:`taskal.data.load_volume_slices`."""

    root: Path
    image_dir: Path
    label_dir: Path


def _gaussian(x: np.ndarray, sigma: Sequence[float]) -> Any:
    """A Gaussian blur of ``x`` with ``sigma`` pixels per axis (periodic borders, via FFT)."""
    spectrum = np.fft.rfftn(x)
    freqs = [np.fft.fftfreq(n) for n in x.shape[:-1]] + [np.fft.rfftfreq(x.shape[-1])]
    for axis, (f, s) in enumerate(zip(freqs, sigma, strict=True)):
        view = [1] * x.ndim
        view[axis] = -1
        spectrum = spectrum * np.exp(-2.0 * (math.pi * f * s) ** 2).reshape(view)
    return np.fft.irfftn(spectrum, s=x.shape, axes=tuple(range(x.ndim)))


def _smooth_field(rng: np.random.Generator, shape: tuple[int, ...], sigma: Sequence[float]) -> Any:
    """Gaussian-filtered white noise (periodic), zero mean and unit std; ``sigma`` per axis."""
    field = _gaussian(rng.standard_normal(shape), sigma)
    field -= field.mean()
    return field / (field.std() + 1e-12)


def _blob(
    rng: np.random.Generator,
    coords: list[np.ndarray],
    center: np.ndarray,
    radii: np.ndarray,
    wobble: float,
) -> tuple[np.ndarray, np.ndarray]:
    """A randomly rotated ellipsoid deformed by low-frequency noise, in normalized coords.

    Returns the mask and the level-set value ``f`` (``f < 1`` inside; ``f`` near 1 is the rim).
    """
    ndim = len(coords)
    rotation, _ = np.linalg.qr(rng.standard_normal((ndim, ndim)))
    shape = coords[0].shape
    level = np.zeros(shape)
    for k in range(ndim):
        u = sum(rotation[a, k] * (coords[a] - center[a]) for a in range(ndim))
        level += (u / radii[k]) ** 2
    deform = _smooth_field(rng, shape, [0.12 * n for n in shape])
    level += wobble * deform
    return level < 1.0, level


def _draw_labels(
    rng: np.random.Generator,
    coords: list[np.ndarray],
    num_classes: int,
    organs: tuple[int, int],
    lesion_prob: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Class indices (uint8) of one scene, and the rim of its kidney-like organs (bool)."""
    shape, ndim = coords[0].shape, len(coords)
    labels = np.zeros(shape, dtype=np.uint8)
    rim = np.zeros(shape, dtype=bool)
    has_lesion = num_classes >= 3
    organ_classes = list(range(1, num_classes - 1 if has_lesion else num_classes))
    for _ in range(int(rng.integers(organs[0], organs[1] + 1))):
        cls = int(rng.choice(organ_classes))
        kidney_like = (cls - 1) % len(_ORGAN_LOOKS) == 1
        radii = rng.uniform(*_ORGAN_RADII[ndim], size=ndim)
        if kidney_like:  # smaller and elongated
            radii = radii * np.array([0.5] + [0.8] * (ndim - 1))
        mask, level = _blob(rng, coords, rng.uniform(0.25, 0.75, ndim), radii, 0.35)
        labels[mask] = cls
        rim[mask] = kidney_like & (level[mask] > 0.55)
    if has_lesion and rng.random() < lesion_prob and (labels > 0).any():
        organ = labels > 0
        where = np.flatnonzero(organ)
        for _ in range(int(rng.integers(1, 3))):
            center = np.array([c.flat[where[rng.integers(len(where))]] for c in coords])
            radii = rng.uniform(*_LESION_RADII[ndim], ndim)
            lesion = _blob(rng, coords, center, radii, 0.3)[0] & organ
            labels[lesion] = num_classes - 1
            rim[lesion] = False
    return labels, rim


def _draw_scene(
    rng: np.random.Generator,
    shape: tuple[int, ...],
    num_classes: int,
    organs: tuple[int, int],
    lesion_prob: float,
    noise: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Intensities (float in ``[0, 1]``) and labels (uint8 class indices) of one scene."""
    coords = list(np.meshgrid(*[(np.arange(n) + 0.5) / n for n in shape], indexing="ij"))
    labels, rim = _draw_labels(rng, coords, num_classes, organs, lesion_prob)
    num_organs = num_classes - 2 if num_classes >= 3 else 1
    looks = [_BACKGROUND_LOOK] + [_ORGAN_LOOKS[k % len(_ORGAN_LOOKS)] for k in range(num_organs)]
    looks += [_LESION_LOOK] if num_classes >= 3 else []
    clean = np.zeros(shape)
    for cls, (mean, amp, scale) in enumerate(looks):
        inside = labels == cls
        if inside.any():
            texture = _smooth_field(rng, shape, [scale] * len(shape))
            clean[inside] = mean + amp * texture[inside]
    clean[rim] += _RIM
    clean = _gaussian(clean, [0.6] * len(shape))  # partial-volume edges
    ramp = sum(g * (c - 0.5) for g, c in zip(rng.normal(0, 0.3, len(shape)), coords, strict=True))
    bias = 1.0 + ramp + 0.08 * _smooth_field(rng, shape, [0.3 * n for n in shape])
    image = clean * bias + rng.normal(0.0, noise, size=shape)
    return np.clip(image, 0.0, 1.0), labels


def _check_common(
    classes: Sequence[str], count: int, what: str, organs: tuple[int, int], lesion_prob: float
) -> None:
    if len(classes) < 2 or len(set(classes)) != len(classes) or len(classes) > 255:
        raise ValueError(
            f"classes must be 2 to 255 distinct names, background first, got {list(classes)}"
        )
    if count < 1:
        raise ValueError(f"{what} must be >= 1, got {count}")
    if len(organs) != 2 or not 0 <= organs[0] <= organs[1]:
        raise ValueError(f"organs per image must be (min, max), 0 <= min <= max, got {organs}")
    if not 0.0 <= lesion_prob <= 1.0:
        raise ValueError(f"lesion_prob must lie in [0, 1], got {lesion_prob}")


def _check_shape(shape: Sequence[int], ndim: int, what: str) -> tuple[int, ...]:
    if len(shape) != ndim or not all(isinstance(n, int) and n >= 4 for n in shape):
        raise ValueError(f"{what} must be {ndim} ints >= 4, got {shape!r}")
    return tuple(shape)


def _prepare_root(root: Path, overwrite: bool, owned: Sequence[str]) -> None:
    """Make ``root`` ready for writing: new or empty, or with ``owned`` removed on overwrite."""
    if root.exists() and not root.is_dir():
        raise FileExistsError(f"{root} exists and is not a folder; choose another root")
    if root.is_dir() and any(root.iterdir()):
        if not overwrite:
            raise FileExistsError(
                f"{root} is not empty; choose an empty or new folder, or pass overwrite=True "
                f"to replace its {', '.join(owned)}"
            )
        for name in owned:
            path = root / name
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
    root.mkdir(parents=True, exist_ok=True)


def _arguments(**kwargs: Any) -> dict[str, Any]:
    """The generator's arguments as JSON stores them (tuples become lists)."""
    return dict(json.loads(json.dumps({k: v for k, v in kwargs.items() if k != "root"})))


@DATASETS.register_module(name="synthetic_segmentation")
def make_synthetic_segmentation(
    root: str | Path,
    num_images: int = 100,
    image_size: tuple[int, int] = (64, 64),
    classes: Sequence[str] = SYNTHETIC_SEG_CLASSES,
    seed: int = 0,
    organs_per_image: tuple[int, int] = (1, 3),
    lesion_prob: float = 0.5,
    noise: float = 0.08,
    overwrite: bool = False,
) -> SyntheticSegmentationFiles:
    """Write ``root/images/<index:06d>.png``, ``root/masks/<index:06d>.png`` and ``meta.json``.

    Registered in ``DATASETS`` as ``"synthetic_segmentation"``; it returns the written
    paths (not a pool): load them with :func:`taskal.data.load_segmentation_folder`.
    Images are grayscale-looking RGB PNGs (three equal channels, uint8); masks are
    single-channel uint8 PNGs of class indices ``0..C-1`` (mmseg's label-map layout).

    Args:
        root: an empty or new folder.
        num_images: how many images.
        image_size: ``(H, W)``, each at least 4.
        classes: background first, then organ classes, then the lesion class (at least 3
            classes for lesions; 2 gives one organ class and no lesions).
        seed: the one source of randomness; the same arguments write identical files.
        organs_per_image: inclusive ``(min, max)`` count of organ blobs per image (later
            ones drawn over earlier ones).
        lesion_prob: probability that an image with organs holds 1-2 small lesions.
        noise: std of the Gaussian pixel noise on the ``[0, 1]`` intensity scale.
        overwrite: replace ``images/``, ``masks/`` and ``meta.json`` of a non-empty root.

    Raises:
        FileExistsError: ``root`` is not empty and ``overwrite`` is False.
        ValueError: a parameter out of range.
    """
    _check_common(classes, num_images, "num_images", organs_per_image, lesion_prob)
    h, w = _check_shape(image_size, 2, "image_size")
    root = Path(root)
    _prepare_root(root, overwrite, ("images", "masks", "meta.json"))
    img_dir, ann_dir = root / "images", root / "masks"
    img_dir.mkdir()
    ann_dir.mkdir()
    for i in range(num_images):
        rng = np.random.default_rng([seed, i])
        image, labels = _draw_scene(rng, (h, w), len(classes), organs_per_image, lesion_prob, noise)
        gray = np.round(image * 255.0).astype(np.uint8)
        Image.fromarray(np.stack([gray] * 3, axis=-1)).save(img_dir / f"{i:06d}.png")
        Image.fromarray(labels).save(ann_dir / f"{i:06d}.png")
    meta = {
        "description": "taskal synthetic organs (2D)",
        "classes": list(classes),
        "seed": seed,
        "arguments": _arguments(**_bound(make_synthetic_segmentation, locals())),
    }
    meta_file = root / "meta.json"
    meta_file.write_text(json.dumps(meta, indent=1))
    return SyntheticSegmentationFiles(root, img_dir, ann_dir, meta_file)


@DATASETS.register_module(name="synthetic_volumes")
def make_synthetic_volumes(
    root: str | Path,
    num_volumes: int = 4,
    shape: tuple[int, int, int] = (32, 64, 64),
    classes: Sequence[str] = SYNTHETIC_SEG_CLASSES,
    seed: int = 0,
    spacing: tuple[float, float, float] = (1.0, 1.0, 2.5),
    organs_per_volume: tuple[int, int] = (1, 3),
    lesion_prob: float = 0.75,
    noise: float = 0.08,
    overwrite: bool = False,
) -> SyntheticVolumeFiles:
    """Write 3D scenes as ``root/imagesTr/case_<i:03d>.nii.gz`` + ``root/labelsTr/...``.

    Registered in ``DATASETS`` as ``"synthetic_volumes"``: the nnU-Net / Medical
    Segmentation Decathlon layout, with a ``dataset.json`` listing labels and cases (and the
    generator's arguments). The same scenes as :func:`make_synthetic_segmentation` in 3D:
    organ blobs continue across slices. Images are float32 on a CT-like scale
    (``1000 * x - 300`` for intensities ``x`` in ``[0, 1]``); labels are uint8 class
    indices. Both share one affine: diagonal ``spacing`` (mm per voxel along the array's
    three axes) and an origin that centres the volume.

    Args:
        root: an empty or new folder.
        num_volumes: how many cases.
        shape: the array shape of every volume, each side at least 4.
        classes: as for :func:`make_synthetic_segmentation`.
        seed: the one source of randomness.
        spacing: voxel size in mm along each array axis, all positive.
        organs_per_volume: inclusive ``(min, max)`` count of organ blobs per volume.
        lesion_prob: probability that a volume holds 1-2 small lesions.
        noise: std of the Gaussian noise on the ``[0, 1]`` scale.
        overwrite: replace ``imagesTr/``, ``labelsTr/`` and ``dataset.json`` of a non-empty root.

    Raises:
        FileExistsError: ``root`` is not empty and ``overwrite`` is False.
        ValueError: a parameter out of range.
    """
    import nibabel as nib

    _check_common(classes, num_volumes, "num_volumes", organs_per_volume, lesion_prob)
    dims = _check_shape(shape, 3, "shape")
    if len(spacing) != 3 or not all(s > 0 for s in spacing):
        raise ValueError(f"spacing must be 3 positive voxel sizes (mm), got {spacing!r}")
    root = Path(root)
    _prepare_root(root, overwrite, ("imagesTr", "labelsTr", "dataset.json"))
    image_dir, label_dir = root / "imagesTr", root / "labelsTr"
    image_dir.mkdir()
    label_dir.mkdir()
    affine = np.diag([*map(float, spacing), 1.0])
    affine[:3, 3] = [-0.5 * n * s for n, s in zip(dims, spacing, strict=True)]
    cases = []
    for i in range(num_volumes):
        rng = np.random.default_rng([seed, i])
        image, labels = _draw_scene(rng, dims, len(classes), organs_per_volume, lesion_prob, noise)
        name = f"case_{i:03d}.nii.gz"
        nib.save(
            nib.Nifti1Image((1000.0 * image - 300.0).astype(np.float32), affine), image_dir / name
        )
        nib.save(nib.Nifti1Image(labels, affine), label_dir / name)
        cases.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    dataset = {
        "name": "taskal synthetic organs (3D)",
        "modality": {"0": "CT"},
        "labels": {str(k): c for k, c in enumerate(classes)},
        "numTraining": num_volumes,
        "training": cases,
        "arguments": _arguments(**_bound(make_synthetic_volumes, locals())),
    }
    (root / "dataset.json").write_text(json.dumps(dataset, indent=1))
    return SyntheticVolumeFiles(root, image_dir, label_dir)


def _bound(fn: Callable[..., Any], scope: dict[str, Any]) -> dict[str, Any]:
    """``fn``'s arguments other than ``root`` and ``overwrite``, read from its ``locals()``."""
    names = [n for n in inspect.signature(fn).parameters if n not in ("root", "overwrite")]
    return {n: scope[n] for n in names}


def _ensure(
    fn: Callable[..., Any], root: Path, record: str, kwargs: dict[str, Any]
) -> dict[str, Any] | None:
    """The recorded arguments' check shared by the ``ensure_*`` functions.

    Returns ``None`` when ``root`` holds a set made with the same arguments, else the
    arguments to generate with; raises when ``root`` holds a set made with others.
    """
    if "overwrite" in kwargs:
        raise ValueError(f"ensure_* never overwrites; remove 'overwrite' (in {root})")
    params = inspect.signature(fn).parameters
    unknown = sorted(set(kwargs) - set(params) - {"root"})
    if unknown:
        raise TypeError(f"unknown {fn.__name__} arguments {unknown}")
    wanted = _arguments(
        **{n: kwargs.get(n, p.default) for n, p in params.items() if n not in ("root", "overwrite")}
    )
    path = root / record
    if not path.exists():
        return kwargs
    recorded = json.loads(path.read_text()).get("arguments")
    if recorded != wanted:
        raise ValueError(
            f"{root} holds a synthetic set made with other arguments ({recorded}, wanted "
            f"{wanted}); pick another root or delete that folder"
        )
    return None


def ensure_synthetic_segmentation(root: str | Path, **kwargs: Any) -> SyntheticSegmentationFiles:
    """The 2D synthetic set in ``root``: generated on the first call, reused on later ones.

    A set is reused only when ``root/meta.json`` records the same generator arguments;
    a folder holding a set made with other arguments is refused, never overwritten.

    Args:
        root: the set's folder.
        **kwargs: :func:`make_synthetic_segmentation` arguments other than ``root`` and
            ``overwrite``.

    Raises:
        ValueError: ``root`` holds a set made with other arguments, or ``overwrite`` given.
        TypeError: an unknown argument.
    """
    root = Path(root)
    todo = _ensure(make_synthetic_segmentation, root, "meta.json", kwargs)
    if todo is None:
        return SyntheticSegmentationFiles(root, root / "images", root / "masks", root / "meta.json")
    return make_synthetic_segmentation(root, **todo)


def ensure_synthetic_volumes(root: str | Path, **kwargs: Any) -> SyntheticVolumeFiles:
    """The 3D synthetic set in ``root``: generated once, reused when ``dataset.json`` records
    the same :func:`make_synthetic_volumes` arguments, refused (``ValueError``) otherwise."""
    root = Path(root)
    todo = _ensure(make_synthetic_volumes, root, "dataset.json", kwargs)
    if todo is None:
        return SyntheticVolumeFiles(root, root / "imagesTr", root / "labelsTr")
    return make_synthetic_volumes(root, **todo)
