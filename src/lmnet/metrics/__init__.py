"""Segmentation metrics of the LM-Net paper, precisely defined, in both Dice/IoU conventions."""
from lmnet.metrics.boundary import (
           BOUNDARY_CASES,
           boundary_metrics,
           mask_boundary,
           surface_distances,
)
from lmnet.metrics.confusion import class_scores, confusion_counts, lesion_scores
from lmnet.metrics.evaluator import SegmentationEvaluator, mean_std, summarize
from lmnet.metrics.report import (
           aggregate_runs,
           markdown_table,
           runs_table,
           write_report,
)

__all__ = ["BOUNDARY_CASES", "boundary_metrics", "mask_boundary", "surface_distances",
           "class_scores", "confusion_counts", "lesion_scores", "SegmentationEvaluator",
           "mean_std", "summarize", "aggregate_runs", "markdown_table", "runs_table",
           "write_report"]
