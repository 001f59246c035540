"""Teacher-logit cache: run the teacher once over the training set and keep its logits on disk (Arrow).

Layout: one Arrow file (`teacher_logits.arrow`, memory-mapped by `datasets`) with one row per training example, in
dataset order. Per-position tasks store only the example's own positions (no padding), flattened: `length * width`
values per row. The file is written batch by batch as the teacher runs, in float32, float16 or bfloat16 (kept as
its 16-bit pattern: Arrow has no bfloat16), so a large cache never passes through Python lists of floats. With
`top_k`, only the k most probable classes per position are kept, as log-probabilities at the distillation
temperature plus their ids ([`~hf_compress.distillation.teacher_top_k`]); the loss adds the tail bucket.

The training set only gains an integer column (`teacher_cache_row`); [`TeacherCacheCollator`] reads those rows from
the cache and places them where the collator put each example's tokens (found by matching the token ids, so right
or left padding, a collator that drops `attention_mask`, and padding-free packing all line up).

The cache is keyed on the teacher (name or path, revision, class, dtype and a digest of sampled weights), the task,
`top_k`, the temperature (top-k only), the stored dtype and width, and the dataset's fingerprint and size: switching
teachers or data never reuses stale logits.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil

import numpy as np
import torch

from ..tasks import get_task

logger = logging.getLogger(__name__)



def teacher_key(output: str) -> str:
    """The batch / cache entry that holds the teacher's values of the model output `output` (`logits` ->
    `teacher_logits`)."""
    return f"teacher_{output}"


LOGITS, START, END = teacher_key("logits"), teacher_key("start_logits"), teacher_key("end_logits")
INDICES = "teacher_indices"  # the class ids of top-k log-probabilities
CACHE_COLUMNS = (LOGITS, INDICES, START, END)
ROW = "teacher_cache_row"  # the training set's pointer into the cache
LENGTH = "length"
COVERED = "teacher_cache_mask"  # the batch positions that hold cached logits
KEY_FILE = "hf_compress_teacher_cache.json"
DATA_FILE = "teacher_logits.arrow"
CACHE_DTYPES = ("float32", "float16", "bfloat16")
# A full-vocabulary cache larger than this gets a one-line warning suggesting `teacher_logits_top_k`.
FULL_CACHE_WARN_BYTES = 2 << 30
PAD_LOGIT = -1e4  # QA positions added by padding get no teacher probability
# The batch entries a model reads (labels never reach the teacher): what the cached values depend on.
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")


@torch.no_grad()
def teacher_forward(teacher, batch: dict, task: str, width: int | None = None) -> dict[str, torch.Tensor]:
    """The teacher's logits for a batch (labels are never passed to it), sliced to `width` classes if given.

    The inputs go to the device of the teacher's input embedding, so a teacher spread with `device_map` stays
    where it was loaded.
    """
    device = _input_device(teacher)
    inputs = {k: v.to(device) for k, v in batch.items() if k in MODEL_INPUTS and torch.is_tensor(v)}
    out = teacher(**inputs)
    values = {}
    for name in get_task(task).logit_layout.outputs:
        logits = getattr(out, name)
        if width is not None and logits.shape[-1] > width:
            logits = logits[..., :width]
        values[teacher_key(name)] = logits
    return values


def left_padding_position_ids(batch: dict) -> torch.Tensor | None:
    """Positions counted from each row's first attended token, for a left-padded batch without `position_ids`.

    A model with absolute position embeddings (BERT, GPT-2) reads a left-padded row at positions shifted by its
    padding, so its logits would depend on the batch it landed in: the cached teacher (computed in other batches)
    and the live one would disagree, and neither would match the example alone. With these positions every row
    is read as if unpadded. Returns
    `None` when the batch already has `position_ids`, has no 2-D `attention_mask`, or no row starts with padding.
    """
    mask = batch.get("attention_mask")
    if "position_ids" in batch or not torch.is_tensor(mask) or mask.dim() != 2 or mask.shape[1] == 0:
        return None
    mask = mask.long()
    if not bool(((mask[:, 0] == 0) & (mask.sum(-1) > 0)).any()):
        return None
    return (mask.cumsum(-1) - 1).clamp(min=0)


_ABSOLUTE_POSITION_TABLES = ("position_embeddings", "wpe")


def reads_absolute_positions(model) -> bool:
    """Whether the model adds a learned table of absolute positions indexed from 0 (BERT's `position_embeddings`,
    GPT-2's `wpe`), so that left padding shifts what it computes.

    A table with a `padding_idx` (RoBERTa, XLM-R) counts positions from the padding itself, and rotary models are
    relative: neither needs [`left_padding_position_ids`], and RoBERTa would read given ones at the wrong offset.
    """
    return any(
        type(m) is torch.nn.Embedding and name.rsplit(".", 1)[-1] in _ABSOLUTE_POSITION_TABLES and m.padding_idx is None
        for name, m in model.named_modules()
    )


def unpadded_positions_apply(*models) -> bool:
    """Whether a left-padded batch should carry [`left_padding_position_ids`] for these models: one of them reads
    absolute positions ([`reads_absolute_positions`]) and every one takes `position_ids`."""
    return any(reads_absolute_positions(m) for m in models) and all(accepts_position_ids(m) for m in models)


def accepts_position_ids(model) -> bool:
    """Whether `model.forward` takes a `position_ids` argument (looked up through a PEFT wrapper)."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:  # the class's forward: what the architecture takes, whatever is patched on the instance
        return "position_ids" in inspect.signature(type(base).forward).parameters
    except (TypeError, ValueError):
        return False


def _input_device(model) -> torch.device:
    try:
        return model.get_input_embeddings().weight.device
    except (AttributeError, NotImplementedError):
        return next(model.parameters()).device


def teacher_fingerprint(teacher) -> str:
    """A digest of the teacher: name or path, revision, class, dtype, shapes and a strided sample of every weight.

    Sampling keeps it cheap for a large teacher (about 256 values per tensor) while a fine-tuned or swapped teacher
    still changes it.
    """
    h = hashlib.sha256()
    cfg = getattr(teacher, "config", None)
    for part in (
        type(teacher).__name__, getattr(cfg, "_name_or_path", ""), getattr(cfg, "_commit_hash", None) or "",
        str(getattr(cfg, "vocab_size", "")),
    ):
        h.update(str(part).encode() + b"\0")
    for name, tensor in teacher.state_dict().items():
        h.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        if tensor.device.type == "meta" or tensor.numel() == 0:
            continue
        flat = tensor.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 256)][:256]
        h.update(sample.float().cpu().numpy().tobytes())
    return h.hexdigest()[:32]


def cache_key(teacher, dataset, task, top_k, temperature, dtype, width) -> dict:
    """Everything the cached values depend on; a cache is reused only when its key is equal."""
    return {
        "format": 3,  # 3: left-padded rows read at their unpadded positions
        "teacher": teacher_fingerprint(teacher),
        "task": task,
        "top_k": top_k,
        # Without top_k the raw logits are stored and the temperature is applied in the loss.
        "temperature": float(temperature) if top_k is not None else None,
        "dtype": dtype,
        "width": width,
        "dataset_fingerprint": getattr(dataset, "_fingerprint", None),
        "num_rows": len(dataset),
    }


def example_spans(input_ids: torch.Tensor, examples: list, padding_side: str = "right") -> list[tuple[int, int, int]]:
    """Where each example's tokens sit in a collated batch: `(row, start, length)` per example.

    Found by matching token ids, so it holds for right and left padding with or without an `attention_mask`,
    and for padding-free collators that concatenate a batch into one row. `padding_side` only breaks ties (a row
    whose pad token equals its own tokens).
    """
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    rows, width = input_ids.shape
    ids = [torch.as_tensor(e).reshape(-1).to(input_ids.device) for e in examples]
    spans = []
    if rows == len(ids):
        for i, e in enumerate(ids):
            n = e.numel()
            right = n <= width and torch.equal(input_ids[i, :n], e)
            left = n <= width and torch.equal(input_ids[i, width - n :], e)
            if right and (not left or padding_side != "left"):
                spans.append((i, 0, n))
            elif left:
                spans.append((i, width - n, n))
            else:
                break
        else:
            return spans
    elif rows == 1:  # padding-free: the examples concatenated into one row
        start = 0
        for e in ids:
            n = e.numel()
            if start + n > width or not torch.equal(input_ids[0, start : start + n], e):
                break
            spans.append((0, start, n))
            start += n
        else:
            return spans
    raise ValueError(
        "The data collator changed the examples' `input_ids` (truncation, masking or reordering), so the cached "
        "teacher logits cannot be placed; use a collator that only pads, or train with `cache_teacher_logits=False`."
    )


def _span_mask(input_ids: torch.Tensor, spans) -> torch.Tensor:
    mask = torch.zeros(input_ids.shape if input_ids.dim() == 2 else (1, input_ids.numel()), dtype=torch.long)
    for r, s, n in spans:
        mask[r, s : s + n] = 1
    return mask.reshape(input_ids.shape)


def stored_dtype(key: str, dtype: str, top_k: bool, over_positions: bool) -> str:
    """The dtype a cache column holds: int32 class ids, float32 for logits over positions (QA) and for top-k
    log-probabilities, else the cache's `dtype`."""
    if key == INDICES:
        return "int32"
    return "float32" if over_positions or top_k else dtype


def cache_features(task: str, dtype: str, top_k: int | None):
    """The `datasets.Features` of a cache row for `task`, stored `dtype` and `top_k` (bfloat16 kept as int16).

    Logits over positions are always kept whole (no top-k): there are only as many classes as tokens.
    """
    import datasets

    layout = get_task(task).logit_layout
    top = top_k is not None and not layout.over_positions
    keys = [teacher_key(name) for name in layout.outputs] + ([INDICES] if top else [])
    feats = {LENGTH: datasets.Value("int32")}
    for key in keys:
        value = stored_dtype(key, dtype, top, layout.over_positions)
        feats[key] = datasets.Sequence(datasets.Value("int16" if value == "bfloat16" else value))
    return datasets.Features(feats)


def _to_numpy(tensor: torch.Tensor, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        return tensor.to(torch.bfloat16).contiguous().view(torch.int16).numpy()
    return tensor.to(getattr(torch, dtype)).contiguous().numpy()


def _from_numpy(array: np.ndarray, dtype: str) -> torch.Tensor:
    tensor = torch.from_numpy(np.array(array, copy=True))  # Arrow buffers are read-only
    return tensor.view(torch.bfloat16) if dtype == "bfloat16" else tensor


def estimated_cache_bytes(dataset, width: int, dtype: str, top_k: int | None) -> int:
    """Bytes the per-position cache will take: tokens x (width, or 2 k) x bytes per value."""
    tokens = sum(len(x) for batch in dataset.select_columns(["input_ids"]).iter(batch_size=4096) for x in batch["input_ids"])
    per_value = 4 if dtype == "float32" else 2
    return tokens * (8 * top_k if top_k is not None else width * per_value)


def compute_teacher_cache(
    teacher, dataset, collator, task: str, top_k: int | None = None, batch_size: int = 32, path: str | None = None,
    temperature: float = 1.0, dtype: str = "float32", width: int | None = None, padding_side: str = "right",
    columns: list[str] | None = None, positions: bool | None = None,
):
    """Run the teacher over `dataset` and write its logits, batch by batch, to the Arrow file `path`.

    `positions`: give left-padded rows the positions of the unpadded example ([`left_padding_position_ids`]), as
    the training step does; `None` decides from the teacher ([`unpadded_positions_apply`]).

    Returns the cache as a `datasets.Dataset` (memory-mapped, one row per example, in dataset order).
    """
    import datasets
    from datasets.arrow_writer import ArrowWriter

    from .loss import teacher_top_k

    if dtype not in CACHE_DTYPES:
        raise ValueError(f"teacher cache dtype must be one of {', '.join(CACHE_DTYPES)}, got {dtype!r}.")
    if path is None:
        import tempfile

        path = os.path.join(tempfile.mkdtemp(prefix="hf_compress_teacher_"), DATA_FILE)
    cols = [c for c in (columns or dataset.column_names) if c in dataset.column_names and c != ROW]
    if positions is None:
        positions = unpadded_positions_apply(teacher)
    layout = get_task(task).logit_layout
    per_position = layout.per_position
    features = cache_features(task, dtype, top_k)
    writer = ArrowWriter(features=features, path=path, writer_batch_size=max(1, batch_size))
    try:
        for start in range(0, len(dataset), batch_size):
            examples = [dict(r) for r in dataset.select_columns(cols).select(range(start, min(start + batch_size, len(dataset))))]
            batch = collator(examples)
            spans = example_spans(batch["input_ids"], [e["input_ids"] for e in examples], padding_side) if per_position else None
            if per_position and "attention_mask" not in batch and "position_ids" not in batch:
                # The collator dropped the mask: give the teacher one, so padding never leaks into cached logits.
                batch = dict(batch, attention_mask=_span_mask(batch["input_ids"], spans))
            shifted = left_padding_position_ids(batch) if positions else None
            if shifted is not None:  # the positions the training step gives (see `DistillationMixin.compute_loss`)
                batch = dict(batch, position_ids=shifted)
            out = teacher_forward(teacher, batch, task, width)
            rows = {name: [] for name in features}
            for i in range(len(examples)):
                parts = {}
                for key, logits in out.items():
                    if per_position:
                        r, s, n = spans[i]
                        value = logits[r, s : s + n]
                    else:
                        value = logits[i]
                    parts[key] = value
                length = parts[next(iter(parts))].shape[0] if per_position else 1
                if top_k is not None and LOGITS in parts:
                    logp, idx = teacher_top_k(parts[LOGITS], top_k, temperature)
                    rows[LOGITS].append(logp.cpu().reshape(-1).numpy())
                    rows[INDICES].append(idx.to(torch.int32).cpu().reshape(-1).numpy())
                else:
                    for key, value in parts.items():
                        stored = stored_dtype(key, dtype, False, layout.over_positions)
                        rows[key].append(_to_numpy(value.cpu().reshape(-1), stored))
                rows[LENGTH].append(length)
            writer.write_batch(rows)
        writer.finalize()
    finally:
        writer.close()
    return datasets.Dataset.from_file(path)


def load_or_compute_teacher_cache(
    teacher, dataset, collator, task, top_k=None, batch_size=32, cache_dir=None, *, temperature: float = 1.0,
    dtype: str = "float32", width: int | None = None, padding_side: str = "right", columns: list[str] | None = None,
    positions: bool | None = None,
):
    """The teacher cache for `dataset`: read from `cache_dir` when its key matches, else computed and saved there.

    Without `cache_dir` it goes to `$HF_DATASETS_CACHE/hf_compress_teacher_logits/<key digest>`. The write is
    atomic (a temporary folder renamed into place), so a reader never sees half a cache. Call it on the main
    process first (`TrainingArguments.main_process_first`): the other processes then find and read the file.

    Returns `(cache, key)`: the cache `datasets.Dataset` (memory-mapped) and its key.
    """
    import datasets

    from ..distributed import atomic_output_dir

    if positions is None:
        positions = unpadded_positions_apply(teacher)
    key = dict(cache_key(teacher, dataset, task, top_k, temperature, dtype, width), left_padding_positions=positions)
    if cache_dir is None:
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
        cache_dir = os.path.join(datasets.config.HF_DATASETS_CACHE, "hf_compress_teacher_logits", digest)
    meta = os.path.join(cache_dir, KEY_FILE)
    if os.path.exists(meta):
        with open(meta) as f:
            if json.load(f) == key:
                return datasets.Dataset.from_file(os.path.join(cache_dir, DATA_FILE)), key
        logger.info("The teacher cache in %s was made for another teacher or data set: recomputing it.", cache_dir)
    if top_k is None and get_task(task).logit_layout.per_position:
        size = estimated_cache_bytes(dataset, width or 0, dtype, None)
        parent = os.path.dirname(os.path.abspath(cache_dir))
        os.makedirs(parent, exist_ok=True)
        free = shutil.disk_usage(parent).free
        if size > min(FULL_CACHE_WARN_BYTES, free):
            top = estimated_cache_bytes(dataset, width or 0, dtype, 64)
            logger.warning(
                f"The full-vocabulary teacher cache will take {size / 1e9:.2f} GB ({free / 1e9:.1f} GB free at "
                f"{parent}); set `teacher_logits_top_k=64` to store {top / 1e9:.3f} GB instead."
            )
    with atomic_output_dir(cache_dir) as tmp:
        compute_teacher_cache(
            teacher, dataset, collator, task, top_k, batch_size, os.path.join(tmp, DATA_FILE), temperature, dtype,
            width, padding_side, columns, positions,
        )
        with open(os.path.join(tmp, KEY_FILE), "w") as f:
            json.dump(key, f)
    return datasets.Dataset.from_file(os.path.join(cache_dir, DATA_FILE)), key


class TeacherCacheCollator:
    """Wraps a data collator: collates the inputs as usual, then places each example's cached teacher logits.

    Args:
        collator: the data collator of the run.
        task (`str`): the distillation task.
        cache (`datasets.Dataset`): the cache from [`load_or_compute_teacher_cache`].
        padding_side (`str`, *optional*, defaults to `"right"`): breaks ties in [`example_spans`].
        dtype (`str`, *optional*, defaults to `"float32"`): the cache's stored dtype.
        width (`int`, *optional*): the number of classes (vocabulary) per position.
    """

    def __init__(self, collator, task: str, cache=None, padding_side: str = "right", dtype: str = "float32", width=None):
        self.collator = collator
        self.task = task
        self.layout = get_task(task).logit_layout
        self.cache = cache.with_format("arrow") if cache is not None else None
        self.padding_side = padding_side
        self.dtype = dtype
        self.width = width

    def _column(self, table, name: str, dtype: str) -> list[torch.Tensor]:
        column = table.column(name).combine_chunks()
        values = _from_numpy(column.flatten().to_numpy(zero_copy_only=False), dtype)
        offsets = column.offsets.to_numpy()
        return [values[offsets[i] : offsets[i + 1]] for i in range(len(column))]

    def __call__(self, features):
        if ROW not in features[0]:  # evaluation / prediction sets: the live teacher scores them
            return self.collator(features)
        rows = [int(f[ROW]) for f in features]
        batch = self.collator([{k: v for k, v in f.items() if k != ROW} for f in features])
        table = self.cache[rows]
        lengths = table.column(LENGTH).to_pylist()
        top_k = INDICES in table.column_names  # top-k: float32 log-probabilities and their class ids
        positions = self.layout.over_positions
        keys = [k for k in (*map(teacher_key, self.layout.outputs), INDICES) if k in table.column_names]
        if not self.layout.per_position:  # one row of values per example
            for key in keys:
                batch[key] = torch.stack(self._column(table, key, stored_dtype(key, self.dtype, top_k, positions)))
            if top_k:
                batch[INDICES] = batch[INDICES].long()
            return batch
        spans = example_spans(batch["input_ids"], [f["input_ids"] for f in features], self.padding_side)
        ids = batch["input_ids"] if batch["input_ids"].dim() == 2 else batch["input_ids"][None]
        shape = ids.shape
        covered = torch.zeros(shape, dtype=torch.bool)
        for key in keys:
            values = self._column(table, key, stored_dtype(key, self.dtype, top_k, positions))
            # Logits over positions hold one value per position; the others a row of classes (or top-k) each.
            per_pos = 1 if positions else next((v.numel() // n for v, n in zip(values, lengths) if n), 1)
            # Padding positions get no probability (over positions) or a valid, empty top-k log-probability row, so
            # the placed cache is a well-formed teacher everywhere. Padding is masked out of the loss regardless.
            pad = PAD_LOGIT if positions or (top_k and key != INDICES) else 0
            out = torch.full((*shape, per_pos), pad, dtype=values[0].dtype)
            for (r, s, n), value, length in zip(spans, values, lengths):
                if length != n:
                    raise ValueError(
                        f"A cached teacher row has {length} positions but its example has {n} tokens; the training set "
                        "changed after the cache was made: delete `teacher_cache_dir` or recompute the cache."
                    )
                out[r, s : s + n] = value.reshape(n, per_pos)
                covered[r, s : s + n] = True
            batch[key] = out[..., 0] if positions else out
        if INDICES in batch:
            batch[INDICES] = batch[INDICES].long()
        batch[COVERED] = covered
        return batch
