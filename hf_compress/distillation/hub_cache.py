"""Teacher logits on the Hub: the top-k (+ tail mass) teacher cache of a dataset as a Hub *dataset* repo.

A 7-70B teacher does not fit beside its student. [`push_teacher_cache`] runs it once, wherever it fits, over the
tokenized training set ([`~hf_compress.distillation.cache.compute_teacher_cache`], the same code as the local
cache) and pushes the result as one commit: Parquet shards `data/train-XXXXX-of-YYYYY.parquet` (one row per
example, in dataset order) and a `README.md` whose YAML metadata holds the key under `hf_compress_teacher_cache`.
[`load_hub_teacher_cache`] downloads a pushed cache and [`check_hub_cache_key`] compares its key with the
training run, so `DistillationTrainer(teacher_logits="user/repo", teacher_model=None)` trains with no teacher in
memory, exactly as with the local cache.

The key names what the cached values depend on: the teacher (id, revision, class, a digest of sampled weights),
its tokenizer (name and a digest of its vocabulary), the task, `top_k`, the temperature (top-k only), the stored
dtype and width, the teacher's label set, how left-padded rows were read, and the dataset (its `datasets`
fingerprint, a digest of the model-input columns, and its size).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile

from ..tasks import TASKS, get_task, task_of_model
from . import cache as teacher_cache

logger = logging.getLogger(__name__)

KEY_FIELD = "hf_compress_teacher_cache"  # the card's metadata field that holds the key
FORMAT = 1
DATA_DIR = "data"
DEFAULT_SHARD_BYTES = 500 << 20
DEFAULT_COMMIT_MESSAGE = "Upload teacher logits (hf_compress)"


def tokenizer_digest(tokenizer) -> str:
    """A digest of the tokenizer's vocabulary (every token and its id): equal exactly when the ids mean the same."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: (item[1], item[0]))
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()[:32]


def dataset_digest(dataset) -> str:
    """A digest of the model-input columns (`input_ids`, `attention_mask`, `token_type_ids`, `position_ids`) of
    `dataset`, row by row: what the teacher read. Unlike `Dataset._fingerprint` it is the same for the same rows
    built in another process or loaded from another path."""
    import pyarrow as pa
    import pyarrow.compute as pc

    cols = [c for c in teacher_cache.MODEL_INPUTS if c in dataset.column_names]
    h = hashlib.sha256(json.dumps(cols).encode())
    for batch in dataset.select_columns(cols).with_format("arrow").iter(batch_size=4096):
        for name in cols:
            column = batch.column(name)
            column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
            if pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
                h.update(pc.list_value_length(column).to_numpy(zero_copy_only=False).astype("int64").tobytes())
                column = column.flatten()
            h.update(column.cast(pa.int64()).to_numpy(zero_copy_only=False).tobytes())
    return h.hexdigest()[:32]


def _num_classes(teacher, task: str) -> int | None:
    """The teacher's vocabulary rows or label count; `None` when the classes are the sequence's positions (QA)."""
    layout = get_task(task).logit_layout
    return None if layout.over_positions else int(layout.class_count(teacher)[1])


def public_name(name: str | None) -> str | None:
    """A Hub id as it is; a local folder by its last component, so no machine path reaches a public card."""
    return os.path.basename(os.path.normpath(name)) if name and os.path.isdir(name) else name


def hub_cache_key(teacher, dataset, tokenizer, task: str, top_k: int | None, temperature: float, dtype: str,
                  width: int | None, positions: bool, teacher_id: str | None = None,
                  teacher_revision: str | None = None) -> dict:
    """The key of a Hub teacher cache: every value the cached logits depend on (see the module docstring)."""
    from .teacher import input_vocabulary_rows

    cfg = teacher.config
    key = {
        "format": FORMAT,
        "teacher_id": public_name(teacher_id or getattr(cfg, "_name_or_path", None) or None),
        "teacher_revision": teacher_revision or getattr(cfg, "_commit_hash", None) or None,
        "teacher_class": type(teacher).__name__,
        "teacher_digest": teacher_cache.teacher_fingerprint(teacher),
        "tokenizer_name": public_name(getattr(tokenizer, "name_or_path", None) or None),
        "tokenizer_digest": tokenizer_digest(tokenizer),
        "tokenizer_size": len(tokenizer),
        "task": task,
        "top_k": top_k,
        # Without top_k the raw logits are stored and the temperature is applied in the loss.
        "temperature": float(temperature) if top_k is not None else None,
        "dtype": dtype,
        "width": width,
        "num_classes": _num_classes(teacher, task),
        "input_vocabulary_rows": input_vocabulary_rows(teacher),
        "id2label": {str(k): v for k, v in cfg.id2label.items()} if get_task(task).logit_layout.compares_label_maps else None,
        "left_padding_positions": bool(positions),
        "teacher_reads_absolute_positions": teacher_cache.reads_absolute_positions(teacher),
        "teacher_accepts_position_ids": teacher_cache.accepts_position_ids(teacher),
        "dataset_fingerprint": getattr(dataset, "_fingerprint", None),
        "dataset_digest": dataset_digest(dataset),
        "num_rows": len(dataset),
    }
    return key


def check_push_inputs(repo_id, top_k, temperature, dtype, task, dataset=None, tokenizer=None, batch_size=32) -> None:
    """Refuse, in one line and before any teacher forward, what cannot give a usable Hub cache."""
    from huggingface_hub.utils import validate_repo_id

    if not isinstance(repo_id, str) or not repo_id:
        raise ValueError(f"hub_repo must be a dataset repo id `namespace/name`, got {repo_id!r}; pass e.g. `--hub_repo me/teacher-logits`.")
    try:
        validate_repo_id(repo_id)
    except Exception:
        raise ValueError(f"hub_repo must look like `namespace/name`, got {repo_id!r}.") from None
    if "/" not in repo_id:
        raise ValueError(f"hub_repo must look like `namespace/name`, got {repo_id!r}.")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be an integer >= 1 (or None for full logits), got {top_k!r}.")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"temperature must be a number > 0, got {temperature!r}; use the `temperature` of the training run.")
    if dtype not in teacher_cache.CACHE_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(teacher_cache.CACHE_DTYPES)}, got {dtype!r}.")
    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}.")
    if tokenizer is not None and not hasattr(tokenizer, "get_vocab"):
        raise ValueError(f"tokenizer must be a tokenizer with `get_vocab`, got {type(tokenizer).__name__}; pass the teacher's tokenizer.")
    if dataset is not None:
        cols = getattr(dataset, "column_names", None)
        if cols is None or not hasattr(dataset, "select_columns"):
            raise ValueError(f"dataset must be a `datasets.Dataset`, got {type(dataset).__name__}.")
        if "input_ids" not in cols:
            raise ValueError(f"dataset has no `input_ids` column (columns: {cols}); tokenize it first, as for training.")
        if len(dataset) == 0:
            raise ValueError("dataset has no rows; pass the tokenized training set.")


def dataset_card(key: dict, repo_id: str | None, files: list[str]) -> str:
    """The `README.md` of a Hub teacher cache: YAML metadata with the key, and a short description."""
    import yaml

    meta = {
        "tags": ["hf-compress", "teacher-logits", "knowledge-distillation"],
        "configs": [{"config_name": "default", "data_files": [{"split": "train", "path": f"{DATA_DIR}/train-*.parquet"}]}],
        KEY_FIELD: key,
    }
    what = f"top-{key['top_k']} log-probabilities at temperature {key['temperature']:g} plus their ids" if key["top_k"] else (
        f"full logits in {key['dtype']}")
    use = repo_id or "<this repo>"
    return (
        "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---\n\n"
        f"# Teacher logits of `{key['teacher_id']}`\n\n"
        f"The {key['task']} teacher `{key['teacher_id']}` (revision `{key['teacher_revision']}`) run once over "
        f"{key['num_rows']} tokenized examples: {what}, one row per example in dataset order, in "
        f"{len(files)} Parquet shard(s). Written by `hf_compress` (`hf-compress cache-teacher`).\n\n"
        "Train a student on them with no teacher in memory:\n\n"
        "```python\n"
        "from hf_compress.distillation import DistillationArguments\n"
        "from hf_compress.trainers import DistillationTrainer\n\n"
        f"args = DistillationArguments(\"out\", temperature={key['temperature'] or 2.0:g}, teacher_logits=\"{use}\")\n"
        "DistillationTrainer(model=student, args=args, train_dataset=train, processing_class=tokenizer).train()\n"
        "```\n\n"
        f"The metadata field `{KEY_FIELD}` is the key: the training set (digest of its model-input columns and size), "
        "the tokenizer's vocabulary digest, the task and the temperature are checked against it before training.\n"
    )


def write_teacher_cache_folder(folder: str, teacher, dataset, tokenizer, task: str | None = None, top_k: int | None = 64,
                               temperature: float = 1.0, dtype: str = "float32", batch_size: int = 32, collator=None,
                               teacher_id: str | None = None, teacher_revision: str | None = None,
                               positions: bool | None = None, repo_id: str | None = None,
                               shard_bytes: int = DEFAULT_SHARD_BYTES) -> dict:
    """Compute the teacher cache of `dataset` and write it to `folder` as the Hub repo will hold it.

    `folder` gets `README.md` (the card, with the key in its metadata) and `data/train-XXXXX-of-YYYYY.parquet`; it is
    written whole or not at all (a temporary folder renamed into place). Returns the key.
    """
    from ..atomic import atomic_output_dir

    task = task or task_of_model(teacher)
    check_push_inputs(repo_id or "local/folder", top_k, temperature, dtype, task, dataset, tokenizer, batch_size)
    if collator is None:
        from transformers import DataCollatorWithPadding

        collator = DataCollatorWithPadding(tokenizer)
    if positions is None:
        positions = teacher_cache.unpadded_positions_apply(teacher)
    width = int(teacher.get_output_embeddings().weight.shape[0]) if get_task(task).logit_layout.over_vocabulary else None
    key = hub_cache_key(teacher, dataset, tokenizer, task, top_k, temperature, dtype, width, positions, teacher_id,
                        teacher_revision)
    padding_side = getattr(tokenizer, "padding_side", "right") if getattr(tokenizer, "padding_side", None) in ("left", "right") else "right"
    columns = [c for c in teacher_cache.MODEL_INPUTS if c in dataset.column_names]
    with tempfile.TemporaryDirectory(prefix="hf_compress_teacher_") as work, atomic_output_dir(folder) as tmp:
        cache = teacher_cache.compute_teacher_cache(
            teacher, dataset, collator, task, top_k, batch_size, os.path.join(work, teacher_cache.DATA_FILE),
            temperature, dtype, width, padding_side, columns, positions,
        )
        shards = max(1, math.ceil(cache.data.nbytes / max(1, shard_bytes)))
        os.makedirs(os.path.join(tmp, DATA_DIR))
        files = []
        for i in range(shards):
            name = f"{DATA_DIR}/train-{i:05d}-of-{shards:05d}.parquet"
            cache.shard(shards, i, contiguous=True).to_parquet(os.path.join(tmp, name))
            files.append(name)
        with open(os.path.join(tmp, "README.md"), "w") as f:
            f.write(dataset_card(key, repo_id, files))
    return key


def push_teacher_cache_folder(folder: str, repo_id: str, endpoint: str | None = None, token: str | None = None,
                              private: bool = False, commit_message: str = DEFAULT_COMMIT_MESSAGE):
    """Push a folder written by [`write_teacher_cache_folder`] to the dataset repo `repo_id` in one commit.

    A repo this call created is deleted again when the commit fails, so a failed push leaves the Hub as it was.

    Returns:
        [`~hf_compress.hub.PushResult`]. Raises [`~hf_compress.hub.HubPushError`] in one line (never the token).
    """
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError

    from ..hub.push import HubPushError, PushResult, describe_failure, resolve_endpoint, transport_errors

    check_push_inputs(repo_id, None, 1.0, "float32", "causal-lm")
    if not os.path.isfile(os.path.join(folder, "README.md")) or not os.path.isdir(os.path.join(folder, DATA_DIR)):
        raise ValueError(f"folder {folder!r} is not a teacher cache; write it with `write_teacher_cache_folder` first.")
    endpoint = resolve_endpoint(endpoint)
    files = sorted(
        os.path.relpath(os.path.join(d, n), folder).replace(os.sep, "/") for d, _, names in os.walk(folder) for n in names
    )
    api = HfApi(endpoint=endpoint, token=token)
    created = False
    try:
        if not api.repo_exists(repo_id, repo_type="dataset"):
            api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=False)
            created = True
        # One `create_commit` with every file: the Hub gets a single commit, or none if anything fails before it.
        operations = [CommitOperationAdd(path_in_repo=f, path_or_fileobj=os.path.join(folder, f)) for f in files]
        info = api.create_commit(repo_id, operations, commit_message=commit_message, repo_type="dataset")
    except (HfHubHTTPError, *transport_errors()) as err:
        message = describe_failure(err, endpoint, token)
        if created:
            try:
                api.delete_repo(repo_id, repo_type="dataset")
                message += f" The dataset repo {repo_id} that this push created was deleted again."
            except Exception as undo:  # the message must still say where the remote stands
                message += f" Deleting the dataset repo {repo_id} it created failed too ({type(undo).__name__}): delete it by hand."
        raise HubPushError(message) from None
    logger.info("Pushed the teacher cache %s (%d files) to %s/datasets/%s at %s", folder, len(files), endpoint, repo_id, info.oid)
    return PushResult(repo_id=repo_id, endpoint=endpoint, commit_oid=info.oid, commit_url=info.commit_url, files=files)


def push_teacher_cache(teacher, dataset, repo_id: str, tokenizer, task: str | None = None, top_k: int | None = 64,
                       temperature: float = 1.0, dtype: str = "float32", batch_size: int = 32, collator=None,
                       teacher_id: str | None = None, teacher_revision: str | None = None, positions: bool | None = None,
                       endpoint: str | None = None, token: str | None = None, private: bool = False,
                       commit_message: str = DEFAULT_COMMIT_MESSAGE, local_dir: str | None = None,
                       shard_bytes: int = DEFAULT_SHARD_BYTES):
    """
    Run `teacher` once over the tokenized `dataset` and push its cache to the Hub dataset repo `repo_id`.

    Args:
        teacher (`PreTrainedModel`): the teacher, loaded wherever it fits (it is only run forward, without gradients).
        dataset (`datasets.Dataset`): the tokenized training set, exactly as the student will be trained on it.
        repo_id (`str`): the dataset repo `namespace/name`; created if it does not exist.
        tokenizer: the teacher's tokenizer (pads the batches; its vocabulary digest goes into the key).
        task (`str`, *optional*): inferred from the teacher's class.
        top_k (`int`, *optional*, defaults to `64`): keep the k most probable classes per position, as
            log-probabilities at `temperature` (the loss adds the tail mass); `None` stores full logits.
        temperature (`float`, defaults to `1.0`): the distillation temperature of the training run (top-k only).
        dtype (`str`, defaults to `"float32"`): stored dtype of full logits.
        batch_size (`int`, defaults to `32`): teacher batch size.
        collator (*optional*): pads the batches; defaults to `DataCollatorWithPadding(tokenizer)`.
        teacher_id, teacher_revision (`str`, *optional*): recorded in the key; default the teacher's
            `config._name_or_path` and `config._commit_hash`.
        positions (`bool`, *optional*): read left-padded rows at their unpadded positions; default from the teacher.
        endpoint, token, private, commit_message: as [`~hf_compress.hub.push_to_hub`].
        local_dir (`str`, *optional*): keep the pushed folder there (default: a temporary folder).
        shard_bytes (`int`, defaults to 500 MiB): size of a Parquet shard, before compression.

    Returns:
        `(PushResult, key)`.
    """
    task = task or task_of_model(teacher)
    # Everything checkable is checked before the teacher runs.
    check_push_inputs(repo_id, top_k, temperature, dtype, task, dataset, tokenizer, batch_size)
    with tempfile.TemporaryDirectory(prefix="hf_compress_teacher_push_") as tmp:
        folder = local_dir or os.path.join(tmp, "cache")
        key = write_teacher_cache_folder(folder, teacher, dataset, tokenizer, task, top_k, temperature, dtype, batch_size,
                                         collator, teacher_id, teacher_revision, positions, repo_id, shard_bytes)
        result = push_teacher_cache_folder(folder, repo_id, endpoint, token, private, commit_message)
    return result, key


def split_repo_revision(spec: str) -> tuple[str, str | None]:
    """`"user/repo@rev"` -> `("user/repo", "rev")`; `"user/repo"` -> `("user/repo", None)`."""
    repo, _, revision = spec.partition("@")
    return repo, revision or None


def load_hub_teacher_cache(repo_id: str, revision: str | None = None, endpoint: str | None = None,
                           token: str | None = None):
    """Download a pushed teacher cache (a dataset repo, or a local folder holding one) and read it.

    Returns `(cache, key)`: the cache `datasets.Dataset` (memory-mapped, one row per example) and its key.
    """
    import datasets
    from huggingface_hub import metadata_load, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError

    from ..hub.push import HubPushError, describe_failure, resolve_endpoint, transport_errors

    if os.path.isdir(repo_id):
        local = repo_id
    else:
        endpoint = resolve_endpoint(endpoint)
        try:
            local = snapshot_download(repo_id, repo_type="dataset", revision=revision, endpoint=endpoint, token=token)
        except (HfHubHTTPError, *transport_errors()) as err:
            message = describe_failure(err, endpoint, token).replace("Push to", "Download of the teacher logits from")
            raise HubPushError(message) from None
    meta = metadata_load(os.path.join(local, "README.md")) if os.path.isfile(os.path.join(local, "README.md")) else None
    key = (meta or {}).get(KEY_FIELD)
    if not isinstance(key, dict):
        raise ValueError(
            f"teacher_logits={repo_id!r} has no `{KEY_FIELD}` key in its README.md metadata; it is not a teacher "
            "cache: push one with `hf-compress cache-teacher`."
        )
    if key.get("format") != FORMAT:
        raise ValueError(
            f"teacher_logits={repo_id!r} has cache format {key.get('format')!r}, this version reads {FORMAT}; "
            "push it again with this version's `hf-compress cache-teacher`."
        )
    data = os.path.join(local, DATA_DIR)
    files = sorted(os.path.join(data, f) for f in os.listdir(data) if f.endswith(".parquet")) if os.path.isdir(data) else []
    if not files:
        raise ValueError(f"teacher_logits={repo_id!r} has no `{DATA_DIR}/*.parquet` shards; push the cache again.")
    features = teacher_cache.cache_features(key["task"], key["dtype"], key["top_k"])
    cache = datasets.Dataset.from_parquet(files, features=features)
    if len(cache) != key["num_rows"]:
        raise ValueError(
            f"teacher_logits={repo_id!r} holds {len(cache)} rows but its key says {key['num_rows']}; push the cache again."
        )
    return cache, key


def expected_key(dataset, tokenizer, task: str, temperature: float, teacher_id: str | None = None,
                 teacher_revision: str | None = None) -> dict:
    """What a training run needs from a Hub cache key: compared field by field by [`check_hub_cache_key`].

    `teacher_id` / `teacher_revision` are checked only when given.
    """
    expected = {"task": task, "num_rows": len(dataset), "dataset_digest": dataset_digest(dataset)}
    if tokenizer is not None:
        expected["tokenizer_digest"] = tokenizer_digest(tokenizer)
    expected["temperature"] = float(temperature)
    if teacher_id is not None:
        expected["teacher_id"] = public_name(teacher_id)
    if teacher_revision is not None:
        expected["teacher_revision"] = teacher_revision
    return expected


def open_checked_cache(source: str, dataset, tokenizer, task: str, temperature: float, teacher_id: str | None = None,
                       teacher_revision: str | None = None):
    """Download the Hub teacher cache `source` (`user/repo`, `user/repo@revision` or a local folder) and check its key
    against the run that will train on `dataset` ([`expected_key`], [`check_hub_cache_key`]).

    Returns `(cache, key)` as [`load_hub_teacher_cache`]; raises `ValueError` (one line) for a cache made for
    another run.
    """
    expected = expected_key(dataset, tokenizer, task, temperature, teacher_id, teacher_revision)
    repo, revision = split_repo_revision(source)
    cache, key = load_hub_teacher_cache(repo, revision)
    check_hub_cache_key(key, expected, source)
    return cache, key


_FIXES = {
    "task": "distil a student of the cache's task, or push a cache for this task",
    "num_rows": "train on the exact tokenized set the cache was computed on, or push a cache for this one",
    "dataset_digest": "train on the exact tokenized set the cache was computed on (same rows, order and "
                      "tokenization), or push a cache for this one with `hf-compress cache-teacher`",
    "tokenizer_digest": "pass the teacher's tokenizer as `processing_class`, or push a cache made with this tokenizer",
    "temperature": "set `temperature` to the cache's, or push a cache at this temperature (`--temperature`)",
    "teacher_id": "point `teacher_logits` at the cache of this teacher, or drop the expected teacher",
    "teacher_revision": "point `teacher_logits` at the cache of this revision, or push one with `--teacher_revision`",
}


class CacheKeyMismatch(ValueError):
    """A Hub teacher cache whose key `field` differs from the run's (one line naming both values and the fix)."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


# The key fields that say the cache was computed on other rows (a command-line run can rebuild it for its own data).
ROW_FIELDS = ("num_rows", "dataset_digest")


def check_hub_cache_key(key: dict, expected: dict, source: str) -> None:
    """Refuse, in one line naming the field, both values and the fix, a Hub cache made for another run.

    Raises:
        [`CacheKeyMismatch`] (a `ValueError`): its `field` is the first key field that differs.
    """
    for name, want in expected.items():
        have = key.get(name)
        if name == "temperature" and key.get("top_k") is None:
            continue  # full logits: the temperature is applied in the loss
        if name == "tokenizer_digest" and have != want:
            raise CacheKeyMismatch(name,
                f"The teacher logits {source} were made with tokenizer {key.get('tokenizer_name')!r} (`tokenizer_digest` "
                f"{have}) but `processing_class` has `tokenizer_digest` {want}; {_FIXES[name]}."
            )
        if have != want:
            raise CacheKeyMismatch(name, f"The teacher logits {source} have `{name}` {have!r} but this run has {want!r}; "
                                         f"{_FIXES[name]}.")


def check_student_against_key(student, key: dict, task: str, tokenizer, source: str) -> int | None:
    """The checks `check_compatible` makes against a live teacher, made against the key instead.

    Returns the logit width to slice the student's logits to (a causal-LM student whose head is padded past the
    cache's width), or `None`.
    """
    from .teacher import input_vocabulary_rows

    s_in, t_in = input_vocabulary_rows(student), key.get("input_vocabulary_rows")
    if s_in is not None and t_in is not None and s_in != t_in and len(tokenizer) > min(s_in, t_in):
        raise ValueError(
            f"The student has input-embedding size {s_in} but the teacher of {source} had {t_in} and the tokenizer has "
            f"{len(tokenizer)} tokens; use a student with the teacher's tokenizer."
        )
    layout = get_task(task).logit_layout
    if layout.over_vocabulary:
        out = student.get_output_embeddings()
        s = int(out.weight.shape[0]) if out is not None else int(student.config.vocab_size)
        width = key["width"]
        if s == width:
            return None
        if s > width and len(tokenizer) <= width:
            return width  # the student's extra head rows are padding past the tokenizer
        raise ValueError(
            f"The student has vocab_size {s} but the teacher logits {source} have width {width}; use a student with "
            "the teacher's tokenizer and vocabulary."
        )
    if layout.compares_label_maps:
        if student.config.num_labels != key["num_classes"]:
            raise ValueError(
                f"The student has num_labels {student.config.num_labels} but the teacher logits {source} have "
                f"{key['num_classes']}; use a student with the teacher's labels."
            )
        s_map = {str(k): v for k, v in student.config.id2label.items()}
        t_map = key.get("id2label") or {}
        generic = lambda m: all(v == f"LABEL_{k}" for k, v in m.items())  # noqa: E731
        if not generic(s_map) and not generic(t_map) and s_map != t_map:
            raise ValueError(
                f"The student's labels {s_map} differ from the teacher's {t_map} in {source}; align `id2label` before distilling."
            )
    return None
