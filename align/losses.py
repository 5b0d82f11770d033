"""Kept for scripts that import ``align.losses``: the losses live in ``align.train.losses``."""
from align.train.losses import (LossConfig, clip_loss, clip_loss_rows, loss_for, rows_loss_for, siglip_loss,
                                siglip_loss_rows)

__all__ = ["LossConfig", "clip_loss", "siglip_loss", "clip_loss_rows", "siglip_loss_rows", "loss_for", "rows_loss_for"]
