"""The modality-independent core: base module, optimization, labels, tracking, model loading."""

from ptft.core.callbacks import BeforeAfterReport
from ptft.core.errors import PtftError
from ptft.core.module import FineTuneModule
from ptft.core.optim import OptimizerConfig, SchedulerConfig, build_optimizer, build_param_groups, build_scheduler
from ptft.core.tracking import WandbLogger

__all__ = [
    "BeforeAfterReport",
    "FineTuneModule",
    "OptimizerConfig",
    "PtftError",
    "SchedulerConfig",
    "WandbLogger",
    "build_optimizer",
    "build_param_groups",
    "build_scheduler",
]
