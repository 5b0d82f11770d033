"""The embedding cache: ``key`` (the embed config and what a key hashes), ``write`` (``align embed``: sharded,
resumable, torchrun-shared), ``read`` (verified, memory-mapped loads → ``embeddings.PairedEmbeddings``) and
``store`` (list, resolve, verify, remove).

Imports ``align.data`` and ``align.common``; validating a config imports ``key`` alone.
"""
