# Segmentation AL on the bundled synthetic medical set: torchvision's FCN on a small CNN
# (taskal.segmenters.small_segmenter) trained from scratch each round, mIoU on a fixed
# held-out split, against the labeled pixels. Image queries, region queries (superpixels:
# random, mean entropy, RIPU's impurity x entropy) at the same pixels per round, plus a
# full-supervision reference:
#   python tools/simulate.py --task seg
_base_ = ["../_base_/seg/synthetic_medical.py"]

model = dict(type="small_segmenter", arch="fcn", width=16)
# the images are grey on a CT-like scale: no ImageNet statistics
adapter = dict(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
train = dict(epochs=30, batch_size=8, lr=0.05, min_epoch_items=128, warmup_iters=20)
al = dict(
    strategies=[
        dict(type="entropy", reduction="mean"),
        dict(type="random", name="random_regions", query="region"),
        dict(type="entropy", name="entropy_regions", query="region", reduction="mean"),
        dict(type="region_impurity", name="ripu_regions", query="region"),
    ],
    # one image may take at most 5 % of a round's pixels (40 % of a 64x64 image)
    region_caps=dict(max_item_share=0.05),
    regions=dict(kind="superpixel", n_segments=64, compactness=10.0),  # about 40 per image
    reference=True,
    seeds=[0, 1, 2],
)
