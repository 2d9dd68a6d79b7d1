"""The modality-independent core: base module, optimization, layers, freezing, PEFT, labels, tracking."""

from ptft.core.adapt_bn import AdaptBatchNorm
from ptft.core.callbacks import (
    BeforeAfterReport,
    EMAWarmupWeightAveraging,
    TrainingLossCallback,
    WritePredictions,
)
from ptft.core.classification import ClassificationModule
from ptft.core.data import ClassificationDataModule, FineTuneDataModule
from ptft.core.errors import PtftError
from ptft.core.freezing import (
    BitFit,
    FreezeFeatureEncoder,
    FreezeSchedule,
    FreezeUnfreeze,
    GradualUnfreeze,
    LinearProbe,
)
from ptft.core.module import FineTuneModule, load_checkpoint
from ptft.core.objectives import WeightedObjectives
from ptft.core.optim import (
    OptimizerConfig,
    SchedulerConfig,
    build_optimizer,
    build_param_groups,
    build_scheduler,
)
from ptft.core.peft import PeftConfig
from ptft.core.tracking import WandbLogger

__all__ = [
    "AdaptBatchNorm",
    "BeforeAfterReport",
    "BitFit",
    "ClassificationDataModule",
    "ClassificationModule",
    "EMAWarmupWeightAveraging",
    "FineTuneDataModule",
    "FineTuneModule",
    "FreezeFeatureEncoder",
    "FreezeSchedule",
    "FreezeUnfreeze",
    "GradualUnfreeze",
    "LinearProbe",
    "OptimizerConfig",
    "PeftConfig",
    "PtftError",
    "SchedulerConfig",
    "TrainingLossCallback",
    "WandbLogger",
    "WeightedObjectives",
    "WritePredictions",
    "build_optimizer",
    "build_param_groups",
    "build_scheduler",
    "load_checkpoint",
]
