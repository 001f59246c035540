"""What every task module provides to the pipeline, to distillation and to the cards, and the helpers they share.

Nothing branches on the task's name: the pipeline asks a [`Task`] for the columns, the preprocessing, the collator,
the evaluation and the card's metadata; distillation asks its [`~hf_compress.tasks.layout.LogitLayout`]
(`Task.logit_layout`) how the logits are laid out. A task is one subclass in one module, listed once in
`hf_compress.tasks.TASK_CLASSES` (whose names are `hf_compress.tasks.TASKS`).
"""

from __future__ import annotations

import torch

from .layout import LogitLayout


class CompressionInputError(ValueError):
    """Bad input found before any training: the message is one line naming the value and the fix."""


def pick_column(columns: list[str], given: str | None, candidates, what: str, flag: str, dataset: str, required=True):
    """The column `given` by the user (checked) or the first of `candidates` present; one-line error when none."""
    if given is not None:
        if given not in columns:
            raise CompressionInputError(
                f"Dataset {dataset!r} has no {what} column {given!r} (columns: {', '.join(columns)}); fix `{flag}`."
            )
        return given
    found = next((c for c in candidates if c in columns), None)
    if found is None and required:
        raise CompressionInputError(
            f"Dataset {dataset!r} has no {what} column (columns: {', '.join(columns)}); pass `{flag}`."
        )
    return found


def is_string_feature(feature) -> bool:
    return getattr(feature, "dtype", None) in ("string", "large_string")


def encode_labels(train_values, eval_values, label_column: str, eval_split: str, feature=None) -> tuple[list[str], dict]:
    """
    Class names and a value -> id map from the training labels, checked against the held-out ones.

    `ClassLabel` keeps its names; booleans become `False`/`True`; non-negative integers (or integral floats, which is
    what a CSV column with a gap reads as) keep their value as id; strings are sorted. Held-out string labels absent
    from train raise one line naming them (a model cannot predict a class it never saw).
    """
    import datasets

    if isinstance(feature, datasets.ClassLabel):
        return list(feature.names), {i: i for i in range(feature.num_classes)}
    values = {v for v in train_values if v is not None}
    if not values:
        raise CompressionInputError(f"The label column {label_column!r} is empty in train; pass labelled data.")
    held = {v for v in eval_values if v is not None}
    if all(isinstance(v, bool) for v in values | held):
        return ["False", "True"], {False: 0, True: 1}
    if all(isinstance(v, float) for v in values) and not all(float(v).is_integer() for v in values | held):
        raise CompressionInputError(
            f"The label column {label_column!r} holds non-integer numbers (e.g. {sorted(values)[0]!r}); pass class "
            "labels (ints, bools or strings) for classification."
        )
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values | held):
        ints = {int(v) for v in values | held}
        if min(ints) < 0:
            raise CompressionInputError(
                f"The label column {label_column!r} has negative class ids ({min(ints)}); use ids 0..N-1 or strings."
            )
        return [str(i) for i in range(max(ints) + 1)], {v: int(v) for v in values | held}
    names = sorted(str(v) for v in values)
    unseen = sorted({str(v) for v in held} - set(names))
    if unseen:
        shown = ", ".join(repr(u) for u in unseen[:5]) + (f" and {len(unseen) - 5} more" if len(unseen) > 5 else "")
        raise CompressionInputError(
            f"Labels {shown} of the held-out split {eval_split!r} do not occur in train (train has {', '.join(names[:10])}"
            f"{'...' if len(names) > 10 else ''}); fix the labels or pick another `--eval_split`."
        )
    index = {name: i for i, name in enumerate(names)}
    return names, {v: index[str(v)] for v in values | held}


def batched_outputs(model, features, collator, batch_size: int, desc: str):
    """Yield `(batch, outputs)` of `model` over `features` in eval mode without grad, with one progress bar."""
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    model.eval()
    device = next(model.parameters()).device
    loader = DataLoader(features, batch_size=batch_size, collate_fn=collator)
    with torch.no_grad():
        for batch in tqdm(loader, desc=desc, leave=False):
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            yield batch, model(**batch)


class Task:
    """
    One task of the pipeline. Subclasses set the class attributes and implement the methods.

    Attributes:
        name (`str`): the `--task` value.
        auto_class (`str`): the transformers `AutoModelFor*` class.
        class_suffixes (`tuple[str]`): how the names of this task's model classes end (`BertForSequenceClassification`,
            `GPT2LMHeadModel`): the task of a loaded model or of a card's `architecture`.
        mapping_names (`str`): the `transformers.models.auto.modeling_auto` mapping of the model types that have a
            class for this task.
        optimum_tasks (`tuple[str]`): what optimum's `TasksManager.infer_task_from_model` calls this task.
        pipeline_tag (`str`): the card's `pipeline_tag` and model-index task type.
        metric_names (`tuple[str]`): the metrics `evaluate` returns, the first one is the headline.
        lower_is_better (`tuple[str]`): metrics where smaller is better (perplexity).
        new_head (`bool`): a headless checkpoint gets this task's head when `--task auto`.
        logit_layout ([`~hf_compress.tasks.layout.LogitLayout`]): how the logits are laid out, what distillation reads.
        verification_outputs (`tuple[str]`): the model outputs recorded for `--verify_push` (`verification_sample`):
            the distilled outputs of `logit_layout`.
        verification_reduce (`bool`): record them by argmax and max along the last axis (a vocabulary), not in full.
    """

    name = ""
    auto_class = ""
    class_suffixes: tuple = ()
    mapping_names = ""
    optimum_tasks: tuple = ()
    pipeline_tag = ""
    metric_names: tuple = ()
    lower_is_better: tuple = ()
    new_head = False
    logit_layout = LogitLayout()

    @property
    def verification_outputs(self) -> tuple:
        return self.logit_layout.outputs

    @property
    def verification_reduce(self) -> bool:
        # [positions, vocabulary] logits: recorded by argmax and max per position
        return self.logit_layout.over_vocabulary

    def __init__(self, data_args, dataset_name: str):
        self.data_args = data_args
        self.dataset_name = dataset_name
        self.columns: dict = {}
        self.label_names: list[str] | None = None
        # What preprocessing dropped or cut, per split: reported in the plan and in the report.
        self.data_notes: dict = {}

    # -- data ---------------------------------------------------------------------------------------------------
    def resolve(self, train, evaluation, eval_split: str):
        """Detect and check columns (and labels) on the raw splits; return the cleaned `(train, evaluation)`."""
        raise NotImplementedError

    def check_tokenizer(self, tokenizer) -> None:
        """Raise a one-line error, before any work, when the tokenizer cannot preprocess this data."""

    def prepare_tokenizer(self, tokenizer):
        """Adjust the tokenizer the task needs (e.g. a pad token for causal LMs); returns it."""
        return tokenizer

    def preprocess(self, dataset, tokenizer, train: bool):
        """Model inputs of a raw split (`train=False`: the held-out split, with what `evaluate` needs)."""
        raise NotImplementedError

    def collator(self, tokenizer):
        raise NotImplementedError

    # -- model --------------------------------------------------------------------------------------------------
    def model_kwargs(self, has_head: bool) -> dict:
        """`from_pretrained` keyword arguments (labels for a new head)."""
        return {}

    def check_model(self, config, has_head: bool) -> None:
        """Raise a one-line error when the model does not fit the data (e.g. its head has another label count)."""

    # -- evaluation ---------------------------------------------------------------------------------------------
    def evaluate(self, model, features, tokenizer, examples=None, batch_size: int = 32, desc: str = "Evaluating") -> dict:
        """The task's metrics of `model` on preprocessed held-out `features` (`examples`: their raw rows)."""
        raise NotImplementedError

    def verification_sample(self, model, features, tokenizer, num_examples: int = 8) -> dict:
        """A few preprocessed held-out rows with the model's outputs on them, recorded in the report so that
        `--verify_push` checks that the downloaded checkpoint reproduces them (`tasks.evaluation.output_sample`)."""
        from .evaluation import output_sample

        return output_sample(model, features, self.collator(tokenizer), self.verification_outputs, num_examples,
                             self.verification_reduce)

    # -- card ---------------------------------------------------------------------------------------------------
    def card_metadata(self) -> dict:
        """`pipeline_tag`, model-index `task` type, the auto class for the usage snippet, and the label names."""
        return {"pipeline_tag": self.pipeline_tag, "task": self.pipeline_tag, "auto_class": self.auto_class,
                "label_names": self.label_names, "metric_names": list(self.metric_names)}

    def describe(self) -> str:
        """One line for the plan: the columns used."""
        return ", ".join(f"{k} `{v}`" for k, v in self.columns.items() if v)

    def _tokenize(self, dataset, fn, split: str):
        """`dataset.map(fn)` in batches, replacing the columns; `fn` also returns a `truncated` flag per row, which
        is counted into `data_notes[split]` and dropped."""
        ds = dataset.map(fn, batched=True, remove_columns=dataset.column_names, desc="Tokenizing")
        self._note(split, truncated=sum(ds["truncated"]))
        return ds.remove_columns("truncated")

    def _note(self, split: str, **counts) -> None:
        entry = self.data_notes.setdefault(split, {})
        for k, v in counts.items():
            entry[k] = entry.get(k, 0) + int(v)


class LabelledTask(Task):
    """A task whose head predicts one of `label_names` (per text or per token): the head's label maps and check."""

    label_key = "label"  # the `columns` entry that holds the labels
    label_noun = "labels"

    def model_kwargs(self, has_head):
        if has_head:
            return {}
        id2label = dict(enumerate(self.label_names))
        return dict(num_labels=len(id2label), id2label=id2label, label2id={v: k for k, v in id2label.items()})

    def check_model(self, config, has_head):
        if has_head and config.num_labels != len(self.label_names):
            raise CompressionInputError(
                f"The model's head has {config.num_labels} labels but column {self.columns[self.label_key]!r} has "
                f"{len(self.label_names)} {self.label_noun}; use a model with a matching head or a headless one."
            )
