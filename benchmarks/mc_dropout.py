"""Time of MC dropout (``T`` samples) against one deterministic pass and ``T`` full passes.

Every adapter that taskal ships runs one batch of random images (models with random
weights, nothing downloaded), in one process:

* ``classification``: torchvision's ResNet-18 (dropout injected on the ``fc`` input);
* ``tv_seg``: torchvision's DeepLabV3 on ResNet-50, 21 classes (dropout injected before the
  head's final convolution; ``--seg-model`` picks another); ``tv_seg_mobilenet``: the same
  on MobileNetV3-Large, a light network whose per-pixel output is a large share of a pass;
* ``mmseg``: the repository's mmseg UNet-S5 (``configs/seg/unet_s5_synthetic_medical.py``,
  the decode head's ``cls_seg`` re-run);
* ``tv_faster_rcnn``, ``tv_retinanet``, ``tv_fcos``: torchvision's detectors on taskal's
  small backbone (:func:`taskal.detectors.small_detector`);
* ``mmdet_faster_rcnn``: mmdet's shipped Faster R-CNN config with a ResNet-18;
  ``mmdet_retinanet``: the repository's ``configs/det/retinanet_r18_synthetic.py``.

Per adapter the script prints the seconds of one pass (``predict(batch)``), of ``T``
samples (``predict(batch, n_samples=T)``, the re-run part on cached inputs) and of ``T``
full passes (the reference, measured in the same run: ``T`` forwards of the classifier
under MC dropout, which is what the classification adapter did before; for the other
adapters ``T`` calls of ``predict(batch)`` inside ``adapter.stochastic()``, which costs what
a full pass per sample costs), their ratios to one pass, and the re-run part's share of one
pass ``s``: the time of one run of that part alone on the cached inputs (what one MC sample
runs), divided by one pass. The floor of ``T`` samples is ``1 + (T - 1) * s`` passes;
``measured / floor`` tells how much more the adapter spends. Targets (issue 9): ``T`` = 20
samples at most 1.2x one pass for classification and segmentation, within 10 % of the floor
for detection. Times are the best of ``--repeats`` runs (5; one pass and ``T`` samples
called in turn, so that a drifting machine slows both alike); the reference times
``--full-runs`` full passes (5; ``T`` of them with ``--full-runs 20``) one by one and counts
``T`` times their median, so that a busy shared machine does not inflate it. Torch runs on
``--threads`` threads (1 by default: steadier timings on a shared machine).

For segmentation the script also times the first write of a fresh buffer as large as the
``T``-sample per-pixel output (``[pixels, C, T]`` float32): the memory it must fault in
once, which the floor leaves out (one sample's part writes a map of one sample's size,
whose memory the allocator hands back from the run before at the default sizes). The
segmentation adapters reuse the memory of their last output once nothing holds it, so only
a run's first ``T``-sample call pays that write; the best of 5 is a later call. It also
times ``T - 1`` runs of ``exp`` over one sample's ``[pixels, C]`` map into a second one:
with torch's ``exp`` on this machine, a lower bound beyond one pass of any MC sampling that
gives per-pixel softmax probabilities at full resolution, however it is organised.

An mmdet dense head without dropout of its own re-runs only its class layer (``retina_cls``)
on the cached inputs; with dropout of its own it re-runs the whole ``bbox_head``, and then the
script also times the module that holds the dropout alone: the share a finer part would have.

    python benchmarks/mc_dropout.py                      # every adapter, T=20
    python benchmarks/mc_dropout.py --only classification tv_seg --samples 10
    python benchmarks/mc_dropout.py --only tv_seg tv_seg_mobilenet
    python benchmarks/mc_dropout.py --only tv_seg --seg-model fcn_resnet50
    python benchmarks/mc_dropout.py --images 2 --repeats 2   # a quicker look
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from _common import best_of, best_of_interleaved, machine
from torch.nn import functional as F

from taskal.types import Adapter, Batch

ROOT = Path(__file__).resolve().parents[1]

#: mmdet's shipped Faster R-CNN with a ResNet-18 (the neck's inputs follow), 3 classes.
MMDET_FASTER_RCNN = """
_base_ = 'mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py'
model = dict(
    type='mmdet.FasterRCNN',
    backbone=dict(depth=18, init_cfg=None),
    neck=dict(in_channels=[64, 128, 256, 512]),
    roi_head=dict(bbox_head=dict(num_classes=3)))
"""


@dataclass
class Case:
    """One adapter on one batch, and what an MC sample re-runs."""

    name: str
    task: str
    adapter: Adapter
    batch: Batch
    part: str  # the re-run part, in words
    rerun: Callable[[], object]  # one run of the part on cached inputs (run with dropout on)
    reference: Callable[[int], object]  # T full passes
    finest: tuple[str, Callable[[], object]] | None = None  # a finer part, for information


def _images(n: int, size: tuple[int, int], seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, *size, generator=g) for _ in range(n)]


def _predict_reference(adapter: Adapter, batch: Batch) -> Callable[[int], object]:
    def run(t: int) -> object:
        with adapter.stochastic():
            return [adapter.predict(batch) for _ in range(t)]

    return run


def classification(args: argparse.Namespace) -> Case:
    from taskal.adapters import ClassificationAdapter
    from taskal.adapters._hooks import eval_mode
    from taskal.adapters.classification import _record_calls
    from taskal.models import torchvision_classifier

    size = args.cls_size
    model = torchvision_classifier("resnet18", num_classes=10)
    adapter = ClassificationAdapter(model, input_shape=(3, size, size))
    x = torch.stack(_images(args.images, (size, size)))
    batch = Batch(x, [str(i) for i in range(len(x))])
    adapter.predict(batch, n_samples=2)  # finds and checks the re-run part
    rerun = adapter._mc[1] if adapter._mc is not None else None
    if rerun is None:
        raise SystemExit("the classification adapter found no re-run part for ResNet-18")
    with torch.no_grad(), eval_mode(model), _record_calls({rerun.names[0]: rerun.modules[0]}) as c:
        model(x)
    call = c[rerun.names[0]][0]

    def part() -> object:
        return F.softmax(rerun(call).float(), dim=1)

    def reference(t: int) -> object:  # the adapter before issue 9: t full forwards
        with torch.no_grad(), adapter.stochastic():
            return [F.softmax(model(x).float(), dim=1) for _ in range(t)]

    names = " + ".join(rerun.names)
    return Case(
        f"classification (resnet18, {len(x)} x {size}x{size})",
        "cls",
        adapter,
        batch,
        f"{names} on its cached input",
        part,
        reference,
    )


def tv_seg(args: argparse.Namespace, name: str) -> Case:
    from taskal.adapters import TorchvisionSegmentationAdapter
    from taskal.adapters._hooks import eval_mode
    from taskal.adapters.torchvision_segmentation import torchvision_segmenter

    size = args.seg_size
    model = torchvision_segmenter(name, num_classes=args.seg_classes)
    adapter = TorchvisionSegmentationAdapter(model)
    batch = Batch(_images(args.images, (size, size)), [str(i) for i in range(args.images)])
    x, _ = adapter.preprocess(batch.inputs)
    with torch.no_grad(), eval_mode(model), adapter._capture_rerun_input() as store:
        model(x)
    cached = store["input"]

    def part() -> object:
        return adapter._resample(cached, x.shape[-2:])

    return Case(
        f"tv_seg ({name}, {args.images} x {size}x{size}, {args.seg_classes} classes)",
        "seg",
        adapter,
        batch,
        f"{adapter._cache_module} on its cached input, upsampling, softmax",
        part,
        _predict_reference(adapter, batch),
    )


def mmseg(args: argparse.Namespace) -> Case:
    from mmengine.config import Config

    from taskal.adapters import MMSegAdapter
    from taskal.adapters import _mmseg_inference as infer
    from taskal.adapters._hooks import eval_mode
    from taskal.registry import MODELS, build

    size = args.mmseg_size
    cfg = Config.fromfile(str(ROOT / "configs/seg/unet_s5_synthetic_medical.py"))
    adapter = MMSegAdapter(build(MODELS, dict(cfg.model)))
    batch = Batch(_images(args.images, (size, size)), [str(i) for i in range(args.images)])
    inputs, _ = adapter.preprocess(batch.inputs)
    shape = inputs.shape[-2:]
    wins = infer.windows(adapter._seg.test_cfg, *shape)
    with torch.no_grad(), eval_mode(adapter.model):
        _, cached = infer.run_windows(adapter._seg, inputs, wins)

    def part() -> object:  # one sample as the adapter draws it (one product when folded)
        return next(adapter._draws(cached, wins, shape, 1))

    return Case(
        f"mmseg (UNet-S5 configs/seg, {args.images} x {size}x{size}, 4 classes)",
        "seg",
        adapter,
        batch,
        "decode_head.cls_seg, one sample (Dropout2d folded into conv_seg), softmax",
        part,
        _predict_reference(adapter, batch),
    )


def _tv_det(arch: str, args: argparse.Namespace) -> Case:
    from taskal.adapters import TorchvisionDetectionAdapter
    from taskal.adapters._hooks import eval_mode
    from taskal.detectors import small_detector

    size = args.det_size
    classes = 4 if arch == "faster_rcnn" else 3
    model = small_detector(arch, classes, image_size=size, width=32, fpn_channels=128)
    adapter = TorchvisionDetectionAdapter(model)
    batch = Batch(_images(args.images, (size, size)), [str(i) for i in range(args.images)])
    images, original = adapter._images(batch)
    with torch.no_grad(), eval_mode(model):
        image_list, feats = adapter._forward_backbone(images)
        if adapter.two_stage:
            units, cached, _ = adapter._two_stage(image_list, feats, original, None)
        else:
            units, cached, _ = adapter._dense(image_list, feats, original, None)

    def part() -> object:
        return adapter._resample(cached, units)

    what = (
        "box_head + box_predictor on the kept boxes' cached RoI features"
        if adapter.two_stage
        else "cls_logits on the cached classification tower"
        if adapter._tower is not None
        else "the classification head on the cached FPN levels"
    )
    return Case(
        f"tv_{arch} (small_detector width 32 FPN 128, {args.images} x {size}x{size}, "
        f"{len(units)} boxes)",
        "det",
        adapter,
        batch,
        what,
        part,
        _predict_reference(adapter, batch),
    )


def _mmdet(family: str, args: argparse.Namespace) -> Case:
    from mmengine.config import Config

    from taskal.adapters import MMDetAdapter, _mmdet_dense, _mmdet_two_stage
    from taskal.adapters._hooks import active_dropout, eval_mode
    from taskal.adapters.mmdet_detection import _layer_inputs
    from taskal.registry import MODELS, build

    if family == "faster_rcnn":
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "faster_rcnn_r18.py"
            path.write_text(MMDET_FASTER_RCNN)
            cfg = Config.fromfile(str(path))
        label = "mmdet faster-rcnn_r50_fpn_1x_coco with R-18"
    else:
        cfg = Config.fromfile(str(ROOT / "configs/det/retinanet_r18_synthetic.py"))
        label = "configs/det/retinanet_r18_synthetic.py"
    adapter = MMDetAdapter(build(MODELS, dict(cfg.model)))
    det: Any = adapter.model
    size = args.det_size
    batch = Batch(_images(args.images, (size, size)), [str(i) for i in range(args.images)])
    with torch.no_grad(), eval_mode(det):
        inputs, samples = adapter._preprocess(batch)
        feats = det.extract_feat(inputs)
        if adapter.two_stage:
            units, cached, _ = _mmdet_two_stage.two_stage(det, feats, samples, None)
        else:
            with _layer_inputs(adapter._cls_layer) as cls_inputs:
                units, cached, _ = _mmdet_dense.dense(
                    det.bbox_head, feats, samples, None, adapter.match_iou
                )
            if adapter._cls_layer is not None:
                cached.levels = cls_inputs

    def part() -> object:
        return adapter._resample(cached)

    what = (
        "roi_head.bbox_head on the kept boxes' cached RoI features"
        if adapter.two_stage
        else "the whole bbox_head on the cached neck levels"
        if adapter._cls_layer is None
        else "bbox_head's class layer alone on its cached inputs"
    )
    finest = None
    if not adapter.two_stage and adapter._cls_layer is None:  # the dropout's module alone
        (name,) = active_dropout(det)
        module = det.get_submodule(name)
        inputs_of: list[torch.Tensor] = []
        hook = module.register_forward_pre_hook(lambda _m, a: inputs_of.append(a[0]), prepend=True)
        with torch.no_grad(), eval_mode(det):
            det.bbox_head(feats)
        hook.remove()

        def alone() -> object:
            return [module(x) for x in inputs_of]

        finest = (name, alone)
    return Case(
        f"mmdet_{family} ({label}, {args.images} x {size}x{size}, {len(units)} boxes)",
        "det",
        adapter,
        batch,
        what,
        part,
        _predict_reference(adapter, batch),
        finest,
    )


CASES: dict[str, Callable[[argparse.Namespace], Case]] = {
    "classification": classification,
    "tv_seg": lambda a: tv_seg(a, a.seg_model),
    "tv_seg_mobilenet": lambda a: tv_seg(a, "deeplabv3_mobilenet_v3_large"),
    "mmseg": mmseg,
    "tv_faster_rcnn": lambda a: _tv_det("faster_rcnn", a),
    "tv_retinanet": lambda a: _tv_det("retinanet", a),
    "tv_fcos": lambda a: _tv_det("fcos", a),
    "mmdet_faster_rcnn": lambda a: _mmdet("faster_rcnn", a),
    "mmdet_retinanet": lambda a: _mmdet("retinanet", a),
}


def run_case(case: Case, t: int, repeats: int, full_runs: int) -> dict[str, float]:
    adapter, batch = case.adapter, case.batch
    adapter.predict(batch)  # warm-up (allocator, first-call set-up)
    adapter.predict(batch, n_samples=2)
    one, cached = best_of_interleaved(
        [lambda: adapter.predict(batch), lambda: adapter.predict(batch, n_samples=t)], repeats
    )
    with torch.no_grad(), adapter.stochastic():  # entered once, as predict does
        part = best_of(case.rerun, repeats)
        finest = best_of(case.finest[1], repeats) if case.finest is not None else None
    each = []  # full passes, each timed: T x their median resists a busy machine
    for _ in range(min(t, full_runs)):
        start = time.perf_counter()
        case.reference(1)
        each.append(time.perf_counter() - start)
    full = t * statistics.median(each)
    s = part / one
    floor = 1 + (t - 1) * s
    out = {"one": one, "cached": cached, "full": full, "part": part, "s": s, "floor": floor}
    if finest is not None:
        out["finest"] = finest / one
    if case.task == "seg":  # first write of a fresh buffer the size of the T-sample output
        pixels = sum(int(x.shape[-2]) * int(x.shape[-1]) for x in batch.inputs)
        numel = pixels * adapter.num_classes * t  # [pixels, C, T]
        out["first_write"] = best_of(lambda: torch.empty(numel).fill_(0.5), repeats)
        logits, probs = torch.rand(numel // t), torch.empty(numel // t)  # one sample's map
        out["exp"] = (t - 1) * best_of(lambda: torch.exp(logits, out=probs), repeats)
    return out


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--only", nargs="+", choices=list(CASES), default=list(CASES))
    p.add_argument("--samples", type=int, default=20, help="T, MC samples per prediction")
    p.add_argument("--images", type=int, default=4, help="images per batch")
    p.add_argument("--cls-size", type=int, default=224)
    p.add_argument("--seg-size", type=int, default=256)
    p.add_argument("--seg-classes", type=int, default=21)
    p.add_argument(
        "--seg-model",
        default="deeplabv3_resnet50",
        help="torchvision segmenter of tv_seg (fcn_resnet50, deeplabv3_mobilenet_v3_large, ...)",
    )
    p.add_argument("--mmseg-size", type=int, default=128)
    p.add_argument("--det-size", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument(
        "--full-runs",
        type=int,
        default=5,
        help="full passes timed for the reference (T x their median; T: all of them)",
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*has no dropout with p > 0")
    t = args.samples
    print(machine())
    print(
        f"T={t} MC samples, {args.images} images per batch; times: best of {args.repeats}; "
        "T full passes: T x the median of "
        f"{min(t, args.full_runs)} timed full passes"
    )
    rows = []
    for name in args.only:
        torch.manual_seed(0)
        case = CASES[name](args)
        r = run_case(case, t, args.repeats, args.full_runs)
        measured = r["cached"] / r["one"]
        if case.task == "det":
            ok = measured / r["floor"] <= 1.1
            verdict = "met" if ok else "MISSED"
            target = f"measured/floor {measured / r['floor']:.3f} <= 1.10: {verdict}"
        else:
            ok = measured <= 1.2
            target = f"T samples / one pass {measured:.3f} <= 1.20: {'met' if ok else 'MISSED'}"
        print(
            f"\n{case.name}\n  re-run part: {case.part}\n"
            f"  one pass {r['one']:.3f} s | T={t} cached {r['cached']:.3f} s "
            f"({measured:.2f}x) | T full passes {r['full']:.3f} s ({r['full'] / r['one']:.2f}x) "
            f"| cached / full {r['cached'] / r['full']:.3f}\n"
            f"  re-run part {r['part'] * 1e3:.2f} ms, share of one pass s = {r['s']:.4f}, "
            f"floor 1 + (T-1) s = {r['floor']:.3f}x, measured / floor "
            f"{measured / r['floor']:.3f}\n  target: {target}",
            flush=True,
        )
        if case.finest is not None:
            fine = r["finest"]
            print(
                f"  finer part: {case.finest[0]} alone on its cached inputs, s = {fine:.4f}, "
                f"floor {1 + (t - 1) * fine:.3f}x (the adapter re-runs the whole head)",
                flush=True,
            )
        if "first_write" in r:
            w = r["first_write"]
            print(
                f"  writing a fresh buffer of the T-sample output's size once: {w * 1e3:.1f} ms "
                f"({w / r['one']:.3f} of one pass; a run's first T-sample call pays it, "
                "later calls reuse the memory)",
                flush=True,
            )
        if "exp" in r:
            e = r["exp"]
            print(
                f"  T-1 = {t - 1} exp over one sample's map: "
                f"{e * 1e3:.1f} ms ({e / r['one']:.3f} of one pass): what a full-resolution "
                "softmax per extra sample spends at least",
                flush=True,
            )
        rows.append((name, r, measured, ok))
        del case
    print("\nsummary (x one pass):")
    print(
        f"  {'adapter':<18} {'one s':>7} {'T cached':>9} {'T full':>8} {'s':>7} {'floor':>7} "
        f"{'meas/floor':>10}  target"
    )
    for name, r, measured, ok in rows:
        print(
            f"  {name:<18} {r['one']:7.3f} {measured:9.2f} {r['full'] / r['one']:8.2f} "
            f"{r['s']:7.4f} {r['floor']:7.3f} {measured / r['floor']:10.3f}  "
            f"{'met' if ok else 'MISSED'}"
        )


if __name__ == "__main__":
    main()
