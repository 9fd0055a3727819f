# A user's own images in ImageFolder layout (root/<class>/<image>), with torchvision's
# ResNet-18 built from scratch (weights=None). Set the folder with --dataset PATH.
_base_ = ["../_base_/al/default.py"]

task = "cls"
dataset = dict(type="image_folder", root="data/my_images", image_size=32)
test_fraction = 0.25
model = dict(type="torchvision", name="resnet18")  # num_classes/in_channels from data
adapter = dict(type="classification")
train = dict(epochs=15, batch_size=32, lr=1e-3, weight_decay=5e-4, min_epoch_items=256)
device = "cpu"
