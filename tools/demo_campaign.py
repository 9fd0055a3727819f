"""The demo label campaign: two rounds of segmentation active learning on CPU, with a simulated
annotator answering the queries in between, using the same commands a real campaign uses.

    python tools/demo_campaign.py                      # work_dirs/demo_campaign/<time>/
    python tools/demo_campaign.py --rounds 3 --work-dir work_dirs/my_demo
    python tools/demo_campaign.py --task det           # mmdet's RetinaNet on synthetic shapes

It writes the bundled synthetic medical demo data once (work_dirs/data/campaign_medical: 8
labeled images, a pool of 120 without labels, 40 for evaluation), then per round:

    python tools/al_round.py configs/campaign/unet_s5_synthetic_medical.py --work-dir DIR --train
    (the simulated annotator paints the true labels of the queried images into DIR/returned_N/)
    python tools/campaign.py import DIR DIR/returned_N --config configs/campaign/...

and ends with the report's path. The model is mmseg's shipped UNet-S5 (inherited through
_base_), trained from scratch through mmengine's Runner each round.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path
from typing import Any

from taskal.campaign.cli import quiet_third_party

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = {
    "seg": ROOT / "configs" / "campaign" / "unet_s5_synthetic_medical.py",
    "det": ROOT / "configs" / "campaign" / "retinanet_r18_synthetic_shapes.py",
}


def _tool(name: str) -> Any:
    spec = importlib.util.spec_from_file_location(f"_tool_{name}", ROOT / "tools" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


quiet_third_party()


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--work-dir", help="the campaign's folder (default work_dirs/demo_campaign/<time>)"
    )
    p.add_argument("--rounds", type=int, default=2, help="rounds to run (default 2)")
    p.add_argument(
        "--task",
        choices=sorted(CONFIGS),
        default="seg",
        help="seg: mmseg's UNet on synthetic medical images (default); det: mmdet's RetinaNet "
        "R-18 on synthetic shapes",
    )
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return p


def main(args: argparse.Namespace) -> int:
    from taskal.campaign import demo

    if args.rounds < 1:
        print("demo_campaign: error: --rounds must be >= 1", file=sys.stderr)
        return 2
    stamp = time.strftime("%Y%m%d_%H%M%S")
    work = Path(args.work_dir or ROOT / "work_dirs" / "demo_campaign" / stamp)
    if (work / "campaign.sqlite").exists():
        print(
            f"demo_campaign: error: {work} holds a campaign already; choose a new --work-dir",
            file=sys.stderr,
        )
        return 2
    config = CONFIGS[args.task]
    if args.task == "seg":
        folders = demo.make_demo_segmentation(ROOT / "work_dirs" / "data" / "campaign_medical")
    else:
        folders = demo.make_demo_detection(ROOT / "work_dirs" / "data" / "campaign_shapes")
    al_round, campaign = _tool("al_round"), _tool("campaign")
    extra = ["--no-progress"] if args.no_progress else []
    for r in range(args.rounds):
        if r > 0:
            asked = work / "rounds" / f"round_{r - 1:03d}" / "queries"
            if args.task == "seg":
                returned = demo.answer_queries(
                    asked, folders["oracle_masks"], work / f"returned_{r - 1}"
                )
            else:
                returned = demo.answer_detection_queries(
                    asked, folders["oracle"], work / f"returned_{r - 1}.json"
                )
            print(f"[demo] the simulated annotator labeled round {r - 1}'s queries: {returned}")
            code = campaign.run(["import", str(work), str(returned), "--config", str(config)])
            if code:
                return int(code)
        code = al_round.run([str(config), "--work-dir", str(work), "--train", *extra])
        if code:
            return int(code)
    print(f"[demo] done: open {work / 'report.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
