"""align: align frozen vision and text encoders with sharpness-aware optimizers (SAM, Monge SAM and peers).

The packages follow the pipeline: ``data`` (datasets, frozen encoders) → ``cache`` (embeddings on disk) →
``train`` (heads, losses, the loop, run directories) → ``eval`` (a run or a cache measured from disk) → ``study``
(optimizer grids, statistics, reports). ``optim`` (the optimizers), ``metrics`` (pure measurements) and ``common``
(errors, configs, files, devices, ranks) serve them; ``toy`` runs the paper's 2-D experiments.
"""
