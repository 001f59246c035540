"""Compression report and model card: what was done, how big, how accurate, against the base model."""

from .card import (
    BASE_MODEL_RELATIONS,
    PLOT_NAME,
    base_model_relation,
    build_model_card,
    plot_accuracy_vs_size,
    validate_card_metadata,
    write_model_card,
)
from ..tasks.evaluation import evaluate_classifier, predict_classifier, verification_sample
from .report import (
    REPORT_NAME,
    build_report,
    checkpoint_bytes,
    load_report,
    quantization_summary,
    save_report,
    weight_stats,
)

__all__ = [
    "BASE_MODEL_RELATIONS",
    "PLOT_NAME",
    "REPORT_NAME",
    "base_model_relation",
    "build_model_card",
    "build_report",
    "checkpoint_bytes",
    "evaluate_classifier",
    "load_report",
    "plot_accuracy_vs_size",
    "predict_classifier",
    "quantization_summary",
    "save_report",
    "validate_card_metadata",
    "verification_sample",
    "weight_stats",
    "write_model_card",
]
