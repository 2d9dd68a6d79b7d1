"""Object detection and instance segmentation task modules, by name (the class paths recipes and checkpoints use).

One concern per file: :mod:`ptft.vision.detection_base` (what the detectors share: labels, mAP, prediction rows),
:mod:`ptft.vision.detection_rcnn` (torchvision's Faster / Mask R-CNN), :mod:`ptft.vision.detection_hf` (Hugging Face
DETR / YOLOS), :mod:`ptft.vision.detection_data` (COCO data).
"""

from ptft.vision.detection_base import LOGGED_MAP, DetectionModule
from ptft.vision.detection_hf import HFBatchEncoder, HFObjectDetector
from ptft.vision.detection_rcnn import FasterRCNN, MaskRCNN, TimmFPNBackbone

__all__ = ["LOGGED_MAP", "DetectionModule", "FasterRCNN", "HFBatchEncoder", "HFObjectDetector", "MaskRCNN", "TimmFPNBackbone"]
