"""Pure measurements (no I/O): retrieval recall, representational alignment, sharpness, k-NN search, zero-shot
classification, and ``measure``, which applies them to a head or to raw embeddings under the metric names the
results files use. Imports ``align.cache.embeddings`` (the PairedEmbeddings type) and ``align.common`` only."""
from align.metrics.alignment import cka, cknna, cycle_knn, mutual_knn, svcca, unbiased_cka
from align.metrics.retrieval import approximate_retrieval_recall, retrieval_recall
from align.metrics.sharpness import hessian_top_eigenvalue, hessian_trace, worst_case_sharpness

__all__ = ["retrieval_recall", "approximate_retrieval_recall", "mutual_knn", "cycle_knn", "cka", "unbiased_cka",
           "cknna", "svcca", "worst_case_sharpness", "hessian_top_eigenvalue", "hessian_trace"]
