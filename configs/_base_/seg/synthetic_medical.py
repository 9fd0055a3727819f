# What every segmentation simulation on the bundled synthetic medical set shares: the data
# (organ-like blobs with texture, a bias field and noise, rare lesions; written on first
# use, no download), its fixed held-out split and the round sizes.
task = "seg"
dataset = dict(
    type="synthetic_segmentation",
    root="work_dirs/data/synthetic_medical_64",  # relative to the repository
    num_images=500,
    image_size=(64, 64),
    classes=("background", "liver", "kidney", "lesion"),
    seed=0,
)
test_fraction = 1 / 5  # 100 test images, 400 in the pool (split seed 0)
batch_size = 16  # images per forward while scoring and evaluating
device = "cpu"
# 8 images (2 % of the pool's pixels) to start, then 2 % per round: 10 % after 4 rounds.
al = dict(initial=8, budget=8, rounds=4)
