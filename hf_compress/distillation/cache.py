"""Teacher-logit cache: run the teacher once over the training set and store its logits with `datasets`."""

from __future__ import annotations

import json
import os

import torch

LOGITS, INDICES, START, END = "teacher_logits", "teacher_indices", "teacher_start_logits", "teacher_end_logits"
CACHE_COLUMNS = (LOGITS, INDICES, START, END)
_PAD_LOGIT = -1e4  # QA positions added by padding get no teacher probability


@torch.no_grad()
def teacher_forward(teacher, batch: dict, task: str) -> dict[str, torch.Tensor]:
    """The teacher's logits for a batch, on the teacher's device; labels are never passed to it."""
    device = next(teacher.parameters()).device
    inputs = {
        k: v.to(device) for k, v in batch.items()
        if k in ("input_ids", "attention_mask", "token_type_ids", "position_ids") and torch.is_tensor(v)
    }
    out = teacher(**inputs)
    if task == "question-answering":
        return {START: out.start_logits, END: out.end_logits}
    return {LOGITS: out.logits}


def compute_teacher_cache(teacher, dataset, collator, task: str, top_k: int | None = None, batch_size: int = 32):
    """`dataset` with the teacher's logits added as columns, one row per example, in dataset order.

    Per-position logits are stored without padding (only the positions where `attention_mask` is 1); with
    `top_k`, only the k largest logits and their ids (`teacher_indices`) are kept per position.
    """
    model_cols = [c for c in dataset.column_names if c in ("input_ids", "attention_mask", "token_type_ids")]
    columns: dict[str, list] = {}
    for start in range(0, len(dataset), batch_size):
        rows = dataset.select_columns(model_cols).select(range(start, min(start + batch_size, len(dataset))))
        batch = collator([dict(r) for r in rows])
        out = teacher_forward(teacher, batch, task)
        mask = batch.get("attention_mask")
        for key, logits in out.items():
            logits = logits.float().cpu()
            if top_k is not None and key == LOGITS:
                values, indices = logits.topk(min(top_k, logits.shape[-1]), dim=-1)
                parts = {LOGITS: values, INDICES: indices}
            else:
                parts = {key: logits}
            for name, tensor in parts.items():
                for i in range(tensor.shape[0]):
                    row = tensor[i]
                    if task != "sequence-classification" and mask is not None:
                        row = row[mask[i].bool()]
                    columns.setdefault(name, []).append(row.tolist())
    for name, values in columns.items():
        dataset = dataset.add_column(name, values)
    return dataset


def load_or_compute_teacher_cache(teacher, dataset, collator, task, top_k=None, batch_size=32, cache_dir=None):
    """[`compute_teacher_cache`], saved to / reused from `cache_dir` when given (keyed on the data and `top_k`)."""
    import datasets

    key = {"fingerprint": getattr(dataset, "_fingerprint", None), "num_rows": len(dataset), "top_k": top_k, "task": task}
    meta = os.path.join(cache_dir, "hf_compress_teacher_cache.json") if cache_dir else None
    if meta and os.path.exists(meta):
        with open(meta) as f:
            if json.load(f) == key:
                return datasets.load_from_disk(cache_dir)
    cached = compute_teacher_cache(teacher, dataset, collator, task, top_k, batch_size)
    if cache_dir:
        tmp = cache_dir.rstrip("/") + ".tmp"
        cached.save_to_disk(tmp)
        with open(os.path.join(tmp, "hf_compress_teacher_cache.json"), "w") as f:
            json.dump(key, f)
        if os.path.exists(cache_dir):
            import shutil

            shutil.rmtree(cache_dir)
        os.replace(tmp, cache_dir)
        cached = datasets.load_from_disk(cache_dir)
    return cached


class TeacherCacheCollator:
    """Wraps a data collator: collates the inputs as usual, then pads and stacks the cached teacher logits."""

    def __init__(self, collator, task: str, padding_side: str = "right"):
        self.collator = collator
        self.task = task
        self.padding_side = padding_side

    def __call__(self, features):
        cached = {k: [torch.as_tensor(f[k]) for f in features] for k in CACHE_COLUMNS if k in features[0]}
        batch = self.collator([{k: v for k, v in f.items() if k not in CACHE_COLUMNS} for f in features])
        for key, rows in cached.items():
            if self.task == "sequence-classification":
                batch[key] = torch.stack(rows)
                continue
            length = batch["input_ids"].shape[1]
            pad_value = _PAD_LOGIT if key in (START, END) else 0
            out = torch.full((len(rows), length, *rows[0].shape[1:]), pad_value, dtype=rows[0].dtype)
            for i, row in enumerate(rows):
                if self.padding_side == "left":
                    out[i, length - row.shape[0]:] = row
                else:
                    out[i, : row.shape[0]] = row
            batch[key] = out
        return batch
