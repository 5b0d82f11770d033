"""Image–caption datasets (hub, local folders, CSV, the built-in synthetic set, MNIST digits) and the frozen image
and text encoders that embed them (open_clip, transformers, the offline pair).

Imports only ``align.common``.
"""
