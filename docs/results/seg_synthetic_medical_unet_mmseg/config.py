al = dict(
    budget=8,
    initial=8,
    reference=True,
    region_caps=dict(max_item_share=0.05),
    regions=dict(compactness=10.0, kind='superpixel', n_segments=64),
    rounds=4,
    seeds=[
        0,
    ],
    strategies=[
        dict(reduction='mean', type='entropy'),
        dict(name='random_regions', query='region', type='random'),
        dict(
            name='entropy_regions',
            query='region',
            reduction='mean',
            type='entropy'),
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
mmseg_cfg_options = dict(
    log_level='WARNING',
    param_scheduler=[
        dict(begin=0, by_epoch=False, end=1, factor=1.0, type='ConstantLR'),
    ])
mmseg_config = 'configs/seg/unet_s5_synthetic_medical.py'
mmseg_train = dict(batch_size=8, lr=0.01, max_iters=300, num_workers=0)
task = 'seg'
test_fraction = 0.2
work_dir = None
