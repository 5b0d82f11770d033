"""Sharpness-aware optimizers as drop-in ``torch.optim.Optimizer`` s, and the registry that builds them."""
from align.optim.registry import (BASE_OPTIMIZERS, OPTIMIZERS, OptimizerInfo, create_optimizer, default_hparams,
                                  optimizer_info)
from align.optim.sam import ASAM, MSAM, SAM, FisherSAM

__all__ = ["SAM", "MSAM", "ASAM", "FisherSAM", "OPTIMIZERS", "BASE_OPTIMIZERS", "OptimizerInfo",
           "create_optimizer", "default_hparams", "optimizer_info"]
