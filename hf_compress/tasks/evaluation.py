"""Evaluation helpers the tasks share: a sequence classifier's predictions and metrics, and the verification records
that `--verify_push` checks a downloaded checkpoint against (`verification_sample`, `output_sample`,
`compare_outputs`).

They sit below the tasks (and are re-exported by `hf_compress.model_cards.report`, where the report code finds them), so
the task table imports nothing from the card code.
"""

from __future__ import annotations

import torch


def _batches(dataset, tokenizer, batch_size: int):
    cols = [c for c in dataset.column_names if c in ("input_ids", "attention_mask", "token_type_ids", "label", "labels")]
    rows = dataset.select_columns(cols)
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        labels = torch.tensor(chunk.pop("labels", None) or chunk.pop("label"))
        feats = [dict(zip(chunk, vals)) for vals in zip(*chunk.values())]
        if tokenizer is not None:
            batch = tokenizer.pad(feats, return_tensors="pt")
        else:  # right-pad with 0, the usual [PAD] id, and mask the padding
            width = max(len(f["input_ids"]) for f in feats)
            batch = {k: torch.tensor([list(f[k]) + [0] * (width - len(f[k])) for f in feats]) for k in feats[0]}
        yield dict(batch), labels


@torch.no_grad()
def predict_classifier(model, dataset, tokenizer=None, batch_size: int = 64, desc: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`(logits, labels)` of a sequence classifier over a tokenized dataset, in eval mode, without grad (with a
    progress bar when `desc` is given)."""
    model.eval()
    device = next(model.parameters()).device
    all_logits, all_labels = [], []
    batches = _batches(dataset, tokenizer, batch_size)
    if desc is not None:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc=desc, total=-(-len(dataset) // batch_size), leave=False)
    for batch, labels in batches:
        logits = model(**{k: v.to(device) for k, v in batch.items()}).logits
        all_logits.append(logits.float().cpu())
        all_labels.append(labels)
    return torch.cat(all_logits), torch.cat(all_labels)


def evaluate_classifier(model, dataset, tokenizer=None, metrics=("accuracy",), batch_size: int = 64, desc: str | None = None) -> dict:
    """
    Evaluate a sequence classifier with `evaluate` metrics (`hf_compress.metrics.load_metric`).

    Args:
        model: a `*ForSequenceClassification` model.
        dataset (`datasets.Dataset`): tokenized rows with `input_ids` (and `attention_mask`) and `label`/`labels`.
        tokenizer (*optional*): used to pad batches; without it batches are right-padded with id 0.
        metrics (`tuple[str]`, defaults to `("accuracy",)`): metric names for `load_metric`.

    Returns:
        `dict`: `{metric name: value}` plus `num_examples`.
    """
    from hf_compress.metrics import load_metric

    if len(dataset) == 0:
        raise ValueError("evaluate_classifier got an empty dataset; pass at least one labelled row.")
    logits, labels = predict_classifier(model, dataset, tokenizer, batch_size, desc)
    preds = logits.argmax(-1).tolist()
    out = {}
    for name in metrics:
        out.update(load_metric(name).compute(predictions=preds, references=labels.tolist()))
    out["num_examples"] = len(labels)
    return out


def verification_sample(model, dataset, tokenizer=None, num_examples: int = 8, metrics=("accuracy",)) -> dict:
    """
    A few examples with the compressed model's logits, predictions and metric on them, stored in the report
    so that `push_to_hub(..., verify=True)` can check that the downloaded checkpoint reproduces them.
    """
    rows = dataset.select(range(min(num_examples, len(dataset))))
    logits, labels = predict_classifier(model, rows, tokenizer)
    # The inputs as the model saw them: one padded batch, so they reload as rectangular tensors.
    batch, _ = next(_batches(rows, tokenizer, len(rows)))
    keep = [c for c in ("input_ids", "attention_mask", "token_type_ids") if c in batch]
    return {
        "inputs": {c: batch[c].tolist() for c in keep},
        "labels": labels.tolist(),
        "logits": [[round(float(v), 6) for v in row] for row in logits],
        "predictions": logits.argmax(-1).tolist(),
        "metrics": {k: v for k, v in evaluate_classifier(model, rows, tokenizer, metrics).items() if k != "num_examples"},
    }


def _output_record(tensor, reduce: bool) -> dict:
    t = tensor.float().cpu()
    if reduce:
        return {"argmax": t.argmax(-1).tolist(), "max": torch.round(t.max(-1).values, decimals=6).tolist()}
    return {"values": torch.round(t, decimals=6).tolist()}


@torch.no_grad()
def output_sample(model, features, collator, outputs=("logits",), num_examples: int = 8, reduce: bool = False) -> dict:
    """
    Any task's verification record: the first `num_examples` preprocessed held-out `features`, batched by the task's
    `collator`, with the model's `outputs` on them (in full, or with `reduce` as argmax and max along the last axis: a
    causal LM's [positions, vocabulary] logits), so that `push_to_hub(..., verify=True)` checks that the downloaded
    checkpoint reproduces them.
    """
    import inspect

    accepted = set(inspect.signature(model.forward).parameters)
    skip = {"labels", "label", "start_positions", "end_positions"}
    rows = features.select(range(min(num_examples, len(features))))
    rows = rows.select_columns([c for c in rows.column_names if c in accepted or c in skip])
    batch = collator([rows[i] for i in range(len(rows))])
    inputs = {k: v for k, v in batch.items() if k in accepted and k not in skip}
    model.eval()
    device = next(model.parameters()).device
    out = model(**{k: v.to(device) for k, v in inputs.items()})
    return {"inputs": {k: v.tolist() for k, v in inputs.items()},
            "outputs": {name: _output_record(getattr(out, name), reduce) for name in outputs}}


def compare_outputs(model, sample: dict) -> float:
    """Max |difference| between `model`'s outputs on `sample["inputs"]` and those recorded by `output_sample`
    (`inf` when a recorded argmax differs)."""
    inputs = {k: torch.tensor(v) for k, v in sample["inputs"].items()}
    model.eval()
    with torch.no_grad():
        out = model(**inputs)
    worst = 0.0
    for name, recorded in sample["outputs"].items():
        now = _output_record(getattr(out, name), "argmax" in recorded)
        if "values" in recorded:
            worst = max(worst, float((torch.tensor(now["values"]) - torch.tensor(recorded["values"])).abs().max()))
        elif now["argmax"] != recorded["argmax"]:
            return float("inf")
        else:
            worst = max(worst, float((torch.tensor(now["max"]) - torch.tensor(recorded["max"])).abs().max()))
    return worst
