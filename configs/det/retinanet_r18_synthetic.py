# mmdet's RetinaNet R-18 FPN (retinanet/retinanet_r18_fpn_1x_coco.py, inherited unchanged)
# on taskal's synthetic shapes, sized for a CPU: only the data, the 3 classes and the image
# size differ, and the backbone starts from scratch (init_cfg=None: nothing is downloaded).
#
# Used by taskal.training_mmdet.train_mmdet, which points the train dataset at each round's
# labeled images and keeps this config's schedule, optimizer and pipeline:
#
#   files = make_synthetic_detection("work_dirs/data/synthetic_shapes_96", num_images=600,
#                                    image_size=(96, 96), classes=CLASSES)
#   pool = load_coco_detection(files.ann_file, files.img_dir)
#   cfg = Config.fromfile("configs/det/retinanet_r18_synthetic.py")
#   model = train_mmdet(cfg, pool, labeled_ids, MMDetTrainConfig(work_dir="work_dirs/r0"), 0)
#   adapter = MMDetAdapter(model)
#
# It is also a complete mmdet config (data_root holds images/ and annotations.json, the
# files make_synthetic_detection writes), and builds through taskal.registry.MODELS.
_base_ = "mmdet::retinanet/retinanet_r18_fpn_1x_coco.py"

classes = ("circle", "square", "triangle")
data_root = "work_dirs/data/synthetic_shapes_96/"  # relative to the repository
# the images' own size: MMDetAdapter scores images unresized, so training must not rescale
# them either (the shipped (1333, 800) would also cost seconds per image on a CPU)
image_scale = (96, 96)

model = dict(
    type="mmdet.RetinaNet",  # scoped, so that taskal.registry.MODELS builds it too
    # from scratch, nothing downloaded; the shipped frozen stem and norm_eval stay as they
    # are (with random weights they act as a fixed random projection and identity BN)
    backbone=dict(init_cfg=None),
    bbox_head=dict(num_classes=3),  # len(classes)
)

train_pipeline = [
    dict(type="LoadImageFromFile"),
    dict(type="LoadAnnotations", with_bbox=True),
    dict(type="Resize", scale=image_scale, keep_ratio=True),
    dict(type="RandomFlip", prob=0.5),
    dict(type="PackDetInputs"),
]
test_pipeline = [
    dict(type="LoadImageFromFile"),
    dict(type="Resize", scale=image_scale, keep_ratio=True),
    dict(type="LoadAnnotations", with_bbox=True),
    dict(
        type="PackDetInputs",
        meta_keys=("img_id", "img_path", "ori_shape", "img_shape", "scale_factor"),
    ),
]
train_dataloader = dict(
    num_workers=0,  # small images on few cores: loading in the training process is fastest
    persistent_workers=False,
    dataset=dict(
        data_root=data_root,
        ann_file="annotations.json",
        data_prefix=dict(img="images/"),
        metainfo=dict(classes=classes),
        pipeline=train_pipeline,
    ),
)
val_dataloader = dict(
    num_workers=0,
    persistent_workers=False,
    dataset=dict(
        data_root=data_root,
        ann_file="annotations.json",
        data_prefix=dict(img="images/"),
        metainfo=dict(classes=classes),
        pipeline=test_pipeline,
    ),
)
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=data_root + "annotations.json")
test_evaluator = val_evaluator
