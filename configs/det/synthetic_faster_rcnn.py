# Detection AL on the bundled synthetic shapes (written on first use, no download):
# a small torchvision Faster R-CNN trained from scratch each round, COCO box mAP from
# pycocotools on a fixed held-out split. Sized to finish 7 strategies x 3 seeds on a
# 2-core CPU within an hour:  python tools/simulate.py --task det
_base_ = ["../_base_/det/synthetic_shapes.py"]

# torchvision FasterRCNN on a 4-stage CNN + FPN (taskal.detectors.small_detector);
# num_classes (C + 1 with the background) comes from the data.
model = dict(type="small_detector", arch="faster_rcnn", image_size=96, width=16)
train = dict(
    epochs=6, batch_size=4, lr=0.02, min_epoch_items=80, warmup_iters=30, max_grad_norm=10.0
)
llal = dict(stop_grad_fraction=0.6)
al = dict(
    strategies=[
        dict(type="entropy", reduction="sum"),
        dict(type="bald", n_samples=20, reduction="sum"),
        "llal",
        "coreset",
        "badge",
        dict(
            type="two_stage",
            name="ppal_hybrid",  # difficulty-calibrated uncertainty, then core-set
            first=dict(type="difficulty_calibrated"),
            second="coreset",
            candidates_factor=4,
        ),
    ],
    seeds=[0, 1, 2],
)
