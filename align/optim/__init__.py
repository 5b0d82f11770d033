"""Sharpness-aware optimizers as drop-in ``torch.optim.Optimizer`` s (one file per method, its stacked-heads rule
beside its class), the registry that builds them, and the step."""
from align.optim.asam import ASAM
from align.optim.friendly_sam import FriendlySAM
from align.optim.fsam import FisherSAM
from align.optim.gsam import GSAM
from align.optim.lion import Lion
from align.optim.looksam import LookSAM
from align.optim.msam import MSAM
from align.optim.registry import (BASE_OPTIMIZERS, OPTIMIZERS, OptimizerInfo, create_optimizer, default_hparams,
                                  optimizer_info)
from align.optim.sam import SAM
from align.optim.step import backward_closure, take_step
from align.optim.two_pass import SharpnessAware

__all__ = ["SAM", "MSAM", "ASAM", "FisherSAM", "GSAM", "FriendlySAM", "LookSAM", "Lion", "SharpnessAware",
           "OPTIMIZERS", "BASE_OPTIMIZERS", "OptimizerInfo", "create_optimizer", "default_hparams", "optimizer_info",
           "backward_closure", "take_step"]
