# A detection label campaign with mmdet's RetinaNet R-18 FPN
# (retinanet/retinanet_r18_fpn_1x_coco.py, inherited unchanged through
# configs/det/retinanet_r18_synthetic.py: only the data, the 3 classes and the image size
# differ) on synthetic shapes, trained from scratch on a CPU:
#
#   python tools/al_round.py configs/campaign/retinanet_r18_synthetic_shapes.py \
#       --work-dir work_dirs/campaign_shapes --train
#   python tools/campaign.py import work_dirs/campaign_shapes RETURNED.json \
#       --config configs/campaign/retinanet_r18_synthetic_shapes.py
#
# RETURNED.json is a COCO json of the queried images (file_name as in queries.json, categories
# by name, [x, y, w, h] boxes; an image listed without annotations is labeled empty) or a
# Label Studio JSON export of rounds/round_NNN/queries/label_studio_tasks.json.
#
# The data: `python tools/demo_campaign.py --task det` writes it (taskal.campaign.demo.
# make_demo_detection: synthetic shapes, 96x96) and runs two rounds; any COCO set split the
# same way works:
#   labeled/annotations.json + labeled/images/   the labeled images the campaign starts with
#   pool/images/                                 the pool, al.pool.img_dir: no labels at all
#   eval/annotations.json + eval/images/         held out, for the mAP of each round
# Images should be 96x96: MMDetAdapter scores images at their own size and the inherited train
# pipeline resizes to (96, 96).
_base_ = ["../det/retinanet_r18_synthetic.py"]

data_root = "work_dirs/data/campaign_shapes"
train_dataloader = dict(
    dataset=dict(
        data_root=data_root,
        ann_file="labeled/annotations.json",
        data_prefix=dict(img="labeled/images/"),
    )
)
# what configs/det/synthetic_retinanet_mmdet.py sets through mmdet_cfg_options, for a few
# hundred CPU steps per round: a lighter head (2 convs of 128 channels instead of 4 of 256),
model = dict(bbox_head=dict(feat_channels=128, stacked_convs=2))
# a warm-up over 20 steps instead of 500 (a round has fewer than 500) and no decay,
param_scheduler = [dict(type="LinearLR", start_factor=0.1, by_epoch=False, begin=0, end=20)]
# clipping (from scratch with a frozen-BN stem, the R-18 diverges at this lr without it)
optim_wrapper = dict(clip_grad=dict(max_norm=10, norm_type=2))
log_level = "WARNING"
al = dict(
    pool=dict(img_dir=data_root + "/pool/images"),
    strategy=dict(type="entropy", reduction="sum"),
    budget=8,  # images per round
    seed=0,
    stop_set=16,  # pool images kept for the stopping signal
    eval=dict(ann_file=data_root + "/eval/annotations.json", img_dir=data_root + "/eval/images"),
    # MMDetTrainConfig: epochs, images per step, lr, and an epoch of at least 80 images
    train=dict(max_epochs=6, batch_size=4, lr=0.02, min_epoch_items=80, num_workers=0),
)
