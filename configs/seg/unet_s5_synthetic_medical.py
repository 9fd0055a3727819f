# mmseg's UNet-S5 FCN for retinal vessels (unet/unet-s5-d16_fcn_4xb4-40k_drive-64x64.py,
# inherited unchanged) on taskal's synthetic medical set, sized for a CPU: only the data,
# the 4 classes, the channel widths and the image handling differ; nothing is downloaded
# (the shipped config has no pretrained weights).
#
# Used by taskal.training_mmseg.train_mmseg, which points the train dataset at each round's
# labeled (or partially labeled) images and keeps this config's schedule and optimizer:
#
#   cfg = Config.fromfile("configs/seg/unet_s5_synthetic_medical.py")
#   model = train_mmseg(cfg, pool, labeled_ids, MMSegTrainConfig(work_dir="work_dirs/r0"), 0)
#   adapter = MMSegAdapter(model)
_base_ = "mmseg::unet/unet-s5-d16_fcn_4xb4-40k_drive-64x64.py"

classes = ("background", "liver", "kidney", "lesion")
norm_cfg = dict(type="BN", requires_grad=True)  # one process: no SyncBN
model = dict(
    type="mmseg.EncoderDecoder",  # scoped, so that taskal.registry.MODELS builds it too
    # the images' own size, padded to a multiple of 16 (UNet halves it four times)
    data_preprocessor=dict(size=None, size_divisor=16),
    backbone=dict(base_channels=16, norm_cfg=norm_cfg),
    decode_head=dict(in_channels=16, channels=16, num_classes=4, norm_cfg=norm_cfg),
    auxiliary_head=dict(in_channels=32, channels=16, num_classes=4, norm_cfg=norm_cfg),
    # 64x64 images: one window is the whole image
    test_cfg=dict(_delete_=True, mode="whole"),
)
# train at the images' own size (the shipped pipeline resizes to 584x565, then crops)
train_pipeline = [
    dict(type="LoadImageFromFile"),
    dict(type="LoadAnnotations"),
    dict(type="RandomFlip", prob=0.5),
    dict(type="PackSegInputs"),
]
train_dataloader = dict(
    batch_size=8,
    num_workers=0,
    persistent_workers=False,
    dataset=dict(dataset=dict(pipeline=train_pipeline, metainfo=dict(classes=classes))),
)
