"""Vision tasks on timm, torchvision, segmentation_models_pytorch and Hugging Face transformers."""

from ptft.vision.data import ImageClassificationDataModule
from ptft.vision.detection import FasterRCNN, HFObjectDetector, MaskRCNN
from ptft.vision.detection_data import CocoDetectionDataModule
from ptft.vision.embedding import ImageEmbedder, ImageEmbeddingDataModule
from ptft.vision.mae import MAE
from ptft.vision.modules import ImageClassifier
from ptft.vision.moco import MoCo
from ptft.vision.pretrain import SimCLR, UnlabeledImageDataModule
from ptft.vision.segmentation import HFSemanticSegmenter, SemanticSegmenter
from ptft.vision.segmentation_data import SegmentationDataModule

__all__ = [
    "CocoDetectionDataModule",
    "FasterRCNN",
    "HFObjectDetector",
    "HFSemanticSegmenter",
    "ImageClassificationDataModule",
    "ImageClassifier",
    "ImageEmbedder",
    "ImageEmbeddingDataModule",
    "MaskRCNN",
    "SegmentationDataModule",
    "SemanticSegmenter",
    "MAE",
    "MoCo",
    "SimCLR",
    "UnlabeledImageDataModule",
]
