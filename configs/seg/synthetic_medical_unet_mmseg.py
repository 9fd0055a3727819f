# Segmentation AL on the bundled synthetic medical set with an mmseg 1.x model: the
# repository's UNet-S5 config (configs/seg/unet_s5_synthetic_medical.py, mmseg's shipped DRIVE
# UNet inherited) trained from scratch through mmengine's Runner each round, scored by
# MMSegAdapter, mIoU on the same held-out split as synthetic_medical_fcn.py:
#
#   python tools/simulate.py --config configs/seg/synthetic_medical_unet_mmseg.py
#
# Sized for a 2-core CPU (seed 0, 300 iterations of 8 images per round: 14 minutes); raise
# mmseg_train.max_iters for stronger models. An "llal" entry would train the UNet inside
# taskal.llal.openmmlab.LLALSegmentor (its encoder stages feed the loss predictor).
_base_ = ["../_base_/seg/synthetic_medical.py"]

mmseg_config = "configs/seg/unet_s5_synthetic_medical.py"  # relative to the repository
mmseg_cfg_options = dict(
    # no decay over the few hundred iterations of a round (the shipped PolyLR spans 40k)
    param_scheduler=[dict(type="ConstantLR", factor=1.0, by_epoch=False, begin=0, end=1)],
    log_level="WARNING",
)
mmseg_train = dict(max_iters=300, batch_size=8, lr=0.01, num_workers=0)
work_dir = None  # the Runner's runs go to temporary folders; a path keeps them there
al = dict(
    strategies=[
        dict(type="entropy", reduction="mean"),
        dict(type="random", name="random_regions", query="region"),
        dict(type="entropy", name="entropy_regions", query="region", reduction="mean"),
    ],
    region_caps=dict(max_item_share=0.05),
    regions=dict(kind="superpixel", n_segments=64, compactness=10.0),
    reference=True,
    seeds=[0],
)
