"""Sharpness-aware optimizers as drop-in ``torch.optim.Optimizer`` s, the registry that builds them, and the step."""
from align.optim.registry import (BASE_OPTIMIZERS, OPTIMIZERS, OptimizerInfo, create_optimizer, default_hparams,
                                  optimizer_info)
from align.optim.sam import ASAM, MSAM, SAM, FisherSAM
from align.optim.step import backward_closure, take_step

__all__ = ["SAM", "MSAM", "ASAM", "FisherSAM", "OPTIMIZERS", "BASE_OPTIMIZERS", "OptimizerInfo",
           "create_optimizer", "default_hparams", "optimizer_info", "backward_closure", "take_step"]
