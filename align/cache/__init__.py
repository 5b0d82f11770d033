"""The embedding cache: ``key`` (the embed config, the identity a key hashes, the key and its folder), ``write``
(``align embed``: an ``EmbedJob`` per split, sharded, resumable, torchrun-shared, through the ``CacheWriter``),
``encode`` (frozen encoders over the shards), ``work`` (the work/ folder of a run in progress and the atomic writes),
``read`` (verified, memory-mapped loads → ``embeddings.PairedEmbeddings``) and ``store`` (list, resolve, verify,
remove).

Imports ``align.data`` and ``align.common``; validating a config imports ``key`` alone.
"""
