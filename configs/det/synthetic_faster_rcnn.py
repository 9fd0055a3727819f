# Detection AL on the bundled synthetic shapes (written on first use, no download):
# a small torchvision Faster R-CNN trained from scratch each round, COCO box mAP from
# pycocotools on a fixed held-out split. Sized to finish 7 strategies x 3 seeds on a
# 2-core CPU within an hour:  python tools/simulate.py --task det
task = "det"
dataset = dict(
    type="synthetic_detection",
    root="work_dirs/data/synthetic_shapes_96",  # relative to the repository
    num_images=600,
    image_size=(96, 96),
    classes=("circle", "square", "triangle"),
    objects_per_image=(1, 4),
    object_scale=(0.15, 0.5),
    imbalance=0.6,  # class k drawn with weight 0.6**k: triangles are the rare class
    seed=0,
)
test_fraction = 1 / 6  # 100 test images, 500 in the pool (split seed 0)
# torchvision FasterRCNN on a 4-stage CNN + FPN (taskal.detectors.small_detector);
# num_classes (C + 1 with the background) comes from the data.
model = dict(type="small_detector", arch="faster_rcnn", image_size=96, width=16)
train = dict(
    epochs=6, batch_size=4, lr=0.02, min_epoch_items=80, warmup_iters=30, max_grad_norm=10.0
)
llal = dict(stop_grad_fraction=0.6)
batch_size = 16  # images per forward while scoring and evaluating
device = "cpu"
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
    initial=40,
    budget=40,
    rounds=3,
    seeds=[0, 1, 2],
)
