"""align: align frozen vision and text encoders with sharpness-aware optimizers."""
