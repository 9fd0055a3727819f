adapter = dict(
    mean=(
        0.5,
        0.5,
        0.5,
    ), std=(
        0.25,
        0.25,
        0.25,
    ))
al = dict(
    budget=8,
    initial=8,
    reference=True,
    region_caps=dict(max_item_share=0.05),
    regions=dict(compactness=10.0, kind='superpixel', n_segments=64),
    rounds=4,
    seeds=[
        0,
        1,
        2,
    ],
    strategies=[
        dict(reduction='mean', type='entropy'),
        dict(name='random_regions', query='region', type='random'),
        dict(
            name='entropy_regions',
            query='region',
            reduction='mean',
            type='entropy'),
        dict(name='ripu_regions', query='region', type='region_impurity'),
    ])
batch_size = 16
dataset = dict(
    classes=(
        'background',
        'liver',
        'kidney',
        'lesion',
    ),
    image_size=(
        64,
        64,
    ),
    num_images=500,
    root='work_dirs/data/synthetic_medical_64',
    seed=0,
    type='synthetic_segmentation')
device = 'cpu'
model = dict(arch='fcn', type='small_segmenter', width=16)
task = 'seg'
test_fraction = 0.2
train = dict(
    batch_size=8, epochs=30, lr=0.05, min_epoch_items=128, warmup_iters=20)
