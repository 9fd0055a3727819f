# A segmentation label campaign with mmseg's UNet-S5 (unet/unet-s5-d16_fcn_4xb4-40k_drive-64x64.py,
# inherited unchanged through configs/seg/unet_s5_synthetic_medical.py: only the data, the 4
# classes, the widths and the image handling differ) on the bundled synthetic medical demo
# (python tools/demo_campaign.py writes it: 8 labeled images, a pool of 120, 40 for eval):
#
#   python tools/al_round.py configs/campaign/unet_s5_synthetic_medical.py \
#       --work-dir work_dirs/campaign_medical --train
#   python tools/campaign.py import work_dirs/campaign_medical RETURNED_MASKS \
#       --config configs/campaign/unet_s5_synthetic_medical.py
#
# The labeled images the campaign starts with are the training data below; the pool,
# al.pool.img_dir, has no labels at all.
_base_ = ["../seg/unet_s5_synthetic_medical.py"]

data_root = "work_dirs/data/campaign_medical"
train_dataloader = dict(
    dataset=dict(
        dataset=dict(
            data_root=data_root,
            data_prefix=dict(img_path="labeled/images", seg_map_path="labeled/masks"),
            img_suffix=".png",
            seg_map_suffix=".png",
        )
    )
)
# no decay over the few hundred iterations of a round (the shipped PolyLR spans 40k)
param_scheduler = [dict(type="ConstantLR", factor=1.0, by_epoch=False, begin=0, end=1)]
log_level = "WARNING"
al = dict(
    pool=dict(img_dir=data_root + "/pool/images"),
    strategy=dict(type="entropy", reduction="mean"),
    budget=8,  # images per round
    seed=0,
    stop_set=16,  # pool images kept for the stopping signal
    eval=dict(img_dir=data_root + "/eval/images", ann_dir=data_root + "/eval/masks"),
    train=dict(max_iters=200, batch_size=8, lr=0.01, num_workers=0),
)
