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


def _seqeval_metric():
    """Entity-level precision / recall / F1 (and token accuracy) of IOB tag sequences with `seqeval`, the library
    behind the Hub's `seqeval` metric script (which `evaluate.load` would download)."""
    import datasets
    import evaluate

    class Seqeval(evaluate.Metric):
        def _info(self):
            seq = datasets.Sequence(datasets.Value("string"))
            return evaluate.MetricInfo(
                description="seqeval entity-level scores of IOB tag sequences.", citation="",
                inputs_description="predictions and references: lists of tag sequences (strings).",
                features=datasets.Features({"predictions": seq, "references": seq}),
            )

        def _compute(self, predictions, references):
            from seqeval.metrics import accuracy_score, f1_score, precision_score, recall_score

            kw = dict(zero_division=0)
            return {"f1": float(f1_score(references, predictions, **kw)),
                    "precision": float(precision_score(references, predictions, **kw)),
                    "recall": float(recall_score(references, predictions, **kw)),
                    "accuracy": float(accuracy_score(references, predictions))}

    return Seqeval()


def _normalize_answer(s: str) -> str:
    """SQuAD v1.1's answer normalization: lower case, no punctuation, no articles, single spaces."""
    import re
    import string

    s = "".join(ch for ch in s.lower() if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def squad_scores(prediction: str, answers: list[str]) -> tuple[float, float]:
    """`(exact_match, f1)` of one predicted answer against its gold answers, as the official SQuAD v1.1 script
    scores them (the best over the gold answers; token-overlap F1 after normalization)."""
    from collections import Counter

    pred = _normalize_answer(prediction)
    em = f1 = 0.0
    for gold in answers:
        g = _normalize_answer(gold)
        em = max(em, float(pred == g))
        common = Counter(pred.split()) & Counter(g.split())
        same = sum(common.values())
        if same:
            p, r = same / len(pred.split()), same / len(g.split())
            f1 = max(f1, 2 * p * r / (p + r))
    return em, f1


def _squad_metric():
    """SQuAD v1.1 exact match and F1 as fractions in [0, 1] (the Hub's `squad` script reports percentages)."""
    import datasets
    import evaluate

    class Squad(evaluate.Metric):
        def _info(self):
            return evaluate.MetricInfo(
                description="SQuAD v1.1 exact match and F1.", citation="",
                inputs_description="predictions: answer strings; references: lists of gold answer strings.",
                features=datasets.Features(
                    {"predictions": datasets.Value("string"), "references": datasets.Sequence(datasets.Value("string"))}
                ),
            )

        def _compute(self, predictions, references):
            scores = [squad_scores(p, r) for p, r in zip(predictions, references)]
            n = max(1, len(scores))
            return {"exact_match": sum(s[0] for s in scores) / n, "f1": sum(s[1] for s in scores) / n}

    return Squad()


_OFFLINE_FACTORIES = {"seqeval": _seqeval_metric, "squad": _squad_metric}


def load_metric(name: str = "accuracy"):
    """An `evaluate` metric by name: `accuracy`, `f1` (macro), `seqeval` and `squad` offline, anything else via
    `evaluate.load`."""
    if name in _OFFLINE:
        return _classification_metric(name, _OFFLINE[name])
    if name in _OFFLINE_FACTORIES:
        return _OFFLINE_FACTORIES[name]()
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
