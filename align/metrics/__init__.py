"""Pure evaluation metrics: retrieval recall, representational alignment, sharpness (no I/O here)."""
from align.metrics.alignment import cka, cknna, cycle_knn, mutual_knn, svcca, unbiased_cka
from align.metrics.retrieval import retrieval_recall
from align.metrics.sharpness import hessian_top_eigenvalue, hessian_trace, worst_case_sharpness

__all__ = ["retrieval_recall", "mutual_knn", "cycle_knn", "cka", "unbiased_cka", "cknna", "svcca",
           "worst_case_sharpness", "hessian_top_eigenvalue", "hessian_trace"]
