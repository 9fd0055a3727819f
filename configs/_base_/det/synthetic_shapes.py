# What every detection simulation on the bundled synthetic shapes shares: the data set
# (written on first use, no download), its fixed held-out split and the round sizes.
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
batch_size = 16  # images per forward while scoring and evaluating
device = "cpu"
al = dict(initial=40, budget=40, rounds=3)
