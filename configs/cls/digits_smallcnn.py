# Classification on scikit-learn's bundled 8x8 handwritten digits (no download).
_base_ = ["../_base_/al/default.py"]

task = "cls"
dataset = dict(type="digits")
test_fraction = 0.25  # stratified held-out test split (fixed, split seed 0)
model = dict(type="SmallCNN", width=16, dropout=0.25)  # num_classes/in_channels from data
adapter = dict(type="classification")  # input_shape from data
train = dict(epochs=15, batch_size=32, lr=1e-3, weight_decay=5e-4, min_epoch_items=256)
device = "cpu"
