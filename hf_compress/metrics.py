"""`evaluate` metrics that work offline.

`evaluate.load("accuracy")` fetches the metric script from the Hub; these are the same metrics written as
`evaluate.Metric` subclasses, so they run with no network. Any other name goes to `evaluate.load`.
"""

from __future__ import annotations

import numpy as np


def _classification_metric(name: str, fn):
    import datasets
    import evaluate

    class _Metric(evaluate.Metric):
        def _info(self):
            return evaluate.MetricInfo(
                description=f"{name} of integer class predictions.",
                citation="",
                inputs_description="predictions and references: lists of integer class ids.",
                features=datasets.Features(
                    {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
                ),
            )

        def _compute(self, predictions, references):
            return {name: float(fn(np.asarray(predictions), np.asarray(references)))}

    _Metric.__name__ = name.capitalize()
    return _Metric()


def _macro_f1(pred, ref):
    scores = []
    for c in np.union1d(pred, ref):
        tp = np.sum((pred == c) & (ref == c))
        denom = np.sum(pred == c) + np.sum(ref == c)
        scores.append(2 * tp / denom if denom else 0.0)
    return np.mean(scores) if scores else 0.0


_OFFLINE = {"accuracy": lambda p, r: np.mean(p == r), "f1": _macro_f1}


def load_metric(name: str = "accuracy"):
    """An `evaluate` metric by name: `accuracy` and `f1` (macro) offline, anything else via `evaluate.load`."""
    if name in _OFFLINE:
        return _classification_metric(name, _OFFLINE[name])
    import evaluate

    return evaluate.load(name)


def classification_compute_metrics(metric_name: str = "accuracy"):
    """A `compute_metrics` for `Trainer` that takes the arg-max of the logits."""
    metric = load_metric(metric_name)

    def compute_metrics(eval_pred):
        logits, labels = eval_pred
        logits = logits[0] if isinstance(logits, tuple) else logits
        return metric.compute(predictions=np.argmax(logits, axis=-1), references=labels)

    return compute_metrics
