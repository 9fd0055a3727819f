# Box queries against image queries at equal annotation cost, on the bundled synthetic
# shapes with the small torchvision Faster R-CNN of synthetic_faster_rcnn.py:
#   python tools/simulate.py configs/det/synthetic_faster_rcnn_boxes.py
# A box query shows the annotator one predicted box: they verify or correct it and label
# every object overlapping it; the detector trains on a crop around it (unlabeled pixels
# filled, never background). Curves compare by annotation cost (second panel of the plot).
_base_ = ["./synthetic_faster_rcnn.py"]

al = dict(
    strategies=[
        dict(type="entropy", reduction="sum"),
        dict(type="random", name="random_boxes", query="region"),
        dict(type="entropy", name="entropy_boxes", query="region"),
    ],
    region_budget=100,  # boxes shown per round (about the objects in 40 images)
    # opening an image, drawing a box, verifying a proposed one (Papadopoulos et al. 2016
    # report about 7 s to draw a box and 1.6 s to verify one)
    annotation_cost=dict(per_image=1.0, per_box_drawn=1.0, per_box_verified=0.25),
)
