# Detection AL on the bundled synthetic shapes with an mmdet 3.x detector: the repository's
# RetinaNet R-18 config (configs/det/retinanet_r18_synthetic.py, mmdet's shipped one
# inherited) trained from scratch through mmengine's Runner each round, scored by
# MMDetAdapter, COCO box mAP from pycocotools on the same held-out split as
# synthetic_faster_rcnn.py:
#
#   python tools/simulate.py --config configs/det/synthetic_retinanet_mmdet.py
#
# Sized for a 2-core CPU: 6 epochs of at least 80 images per round and a lighter head
# (below); from scratch RetinaNet stays weak at this budget, so raise
# mmdet_train.max_epochs for curves that separate more clearly.
# llal trains the detector inside taskal.llal.openmmlab.LLALDetector (one more training per
# round's cost); no badge (RetinaNet's classifier is sigmoid, BADGE's gradient embedding
# needs a softmax).
_base_ = ["../_base_/det/synthetic_shapes.py"]

mmdet_config = "configs/det/retinanet_r18_synthetic.py"  # relative to the repository
# What differs from that config for a few hundred CPU steps per round:
mmdet_cfg_options = dict(
    # a lighter head (2 convs of 128 channels instead of 4 of 256): the head dominates the
    # cost at 96x96, and BALD re-runs it 20 times on every pool image
    model=dict(bbox_head=dict(feat_channels=128, stacked_convs=2)),
    # warm up over 20 steps instead of 500 (a round has fewer than 500); no decay
    param_scheduler=[dict(type="LinearLR", start_factor=0.1, by_epoch=False, begin=0, end=20)],
    # from scratch with frozen-BN stem, the R-18 diverges at this lr without clipping
    optim_wrapper=dict(clip_grad=dict(max_norm=10, norm_type=2)),
    log_level="WARNING",  # no per-epoch log lines in the simulation's output
)
# MMDetTrainConfig: epochs, images per step, lr, and an epoch of at least 80 images
mmdet_train = dict(max_epochs=6, batch_size=4, lr=0.02, min_epoch_items=80, num_workers=0)
work_dir = None  # the Runner's runs go to temporary folders; a path keeps them there
al = dict(
    strategies=[
        dict(type="entropy", reduction="sum"),
        dict(type="bald", n_samples=20, reduction="sum"),
        "llal",
        "coreset",
        dict(
            type="two_stage",
            name="ppal_hybrid",  # difficulty-calibrated uncertainty, then core-set
            first=dict(type="difficulty_calibrated"),
            second="coreset",
            candidates_factor=4,
        ),
    ],
    seeds=[0],
)
