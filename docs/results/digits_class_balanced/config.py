adapter = dict(type='classification')
al = dict(
    budget=20,
    ensemble_size=5,
    initial=20,
    llal=dict(hidden=128, margin=1.0, stop_grad_fraction=0.6, weight=1.0),
    rounds=10,
    seeds=[
        0,
        1,
        2,
        3,
        4,
    ],
    strategies=[
        'entropy',
        'class_balanced',
    ])
dataset = dict(type='digits')
device = 'cpu'
model = dict(dropout=0.25, type='SmallCNN', width=16)
task = 'cls'
test_fraction = 0.25
train = dict(
    batch_size=32,
    epochs=15,
    lr=0.001,
    min_epoch_items=256,
    weight_decay=0.0005)
