# A classification label campaign with torchvision's ResNet-18 (trained from scratch: taskal
# never downloads weights) on your own images. Not an OpenMMLab model config: without a
# default_scope the campaign is a classification one (task "cls").
#
#   data/my_labeled/<class>/<image>   the labeled images you start with (ImageFolder layout;
#                                     the sorted sub-folder names are the classes)
#   data/my_pool/...                  the unlabeled images to select from (any layout)
#
#   python tools/al_round.py configs/campaign/resnet18_image_folder.py \
#       --work-dir work_dirs/campaign_cls --train
#   python tools/campaign.py import work_dirs/campaign_cls LABELS.json \
#       --config configs/campaign/resnet18_image_folder.py
#
# LABELS.json is a Label Studio JSON export of the round's label_studio_tasks.json, or a plain
# JSON object {item: class name or index}, e.g. {"img_017.png": "cat"}. Images are resized to
# al.image_size; add grayscale=True to al.labeled for one-channel images,
# eval=dict(root="data/my_eval") (same class folders) for the accuracy per round, and
# device="cuda" to train and score on a GPU.
model = dict(type="torchvision", name="resnet18")
al = dict(
    pool=dict(img_dir="data/my_pool"),
    labeled=dict(root="data/my_labeled"),
    strategy="entropy",
    budget=20,  # images per round
    seed=0,
    stop_set=16,  # pool images kept for the stopping signal
    image_size=(32, 32),  # (H, W)
    train=dict(epochs=15, batch_size=32, lr=1e-3, min_epoch_items=256),
)
