"""What every stage shares: AlignError, strict configs and YAML, the data root, devices, progress bars, torchrun
ranks, atomic files, locks, the packaged configs and figure saving.

Imports no other package of align.
"""
