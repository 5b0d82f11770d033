"""align: align frozen vision and text encoders with sharpness-aware optimizers."""
from pathlib import Path as _Path

from align._layout import map_checkout_folders as _map_checkout_folders

_map_checkout_folders(_Path(__file__).resolve().parent)
