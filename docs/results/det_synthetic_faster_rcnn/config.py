al = dict(
    budget=40,
    initial=40,
    rounds=3,
    seeds=[
        0,
        1,
        2,
    ],
    strategies=[
        dict(reduction='sum', type='entropy'),
        dict(n_samples=20, reduction='sum', type='bald'),
        'llal',
        'coreset',
        'badge',
        dict(
            candidates_factor=4,
            first=dict(type='difficulty_calibrated'),
            name='ppal_hybrid',
            second='coreset',
            type='two_stage'),
    ])
batch_size = 16
dataset = dict(
    classes=(
        'circle',
        'square',
        'triangle',
    ),
    image_size=(
        96,
        96,
    ),
    imbalance=0.6,
    num_images=600,
    object_scale=(
        0.15,
        0.5,
    ),
    objects_per_image=(
        1,
        4,
    ),
    root='work_dirs/data/synthetic_shapes_96',
    seed=0,
    type='synthetic_detection')
device = 'cpu'
llal = dict(stop_grad_fraction=0.6)
model = dict(
    arch='faster_rcnn', image_size=96, type='small_detector', width=16)
task = 'det'
test_fraction = 0.16666666666666666
train = dict(
    batch_size=4,
    epochs=6,
    lr=0.02,
    max_grad_norm=10.0,
    min_epoch_items=80,
    warmup_iters=30)
