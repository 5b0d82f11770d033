"""Kept for scripts that import ``align.study_stats``: the statistics live in ``align.study.stats``."""
from align.study.stats import (
    SCORE, ALIGNMENT, ZEROSHOT, SUMMARY_METRICS, SCORES, METHOD_AXES, config_key, key_axes, used_axes,
    config_means, best_configs, summary, table3, robustness, rank_agreement, max_paired_gap, MIN_PAIRS,
    VERDICTS, student_t_two_sided_p, student_t_quantile, paired_intervals, paired_interval, paired_t_test,
    holm_adjust, best_config_scores, verdicts_vs_reference)

__all__ = ["SCORE", "ALIGNMENT", "ZEROSHOT", "SUMMARY_METRICS", "SCORES", "METHOD_AXES", "config_key", "key_axes",
           "used_axes", "config_means", "best_configs", "summary", "table3", "robustness", "rank_agreement",
           "max_paired_gap", "MIN_PAIRS", "VERDICTS", "student_t_two_sided_p", "student_t_quantile",
           "paired_intervals", "paired_interval", "paired_t_test", "holm_adjust", "best_config_scores",
           "verdicts_vs_reference"]
