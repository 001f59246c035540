"""`DistillationTrainer`: a drop-in `transformers.Trainer` whose loss mixes hard labels with a teacher's soft logits.

The distillation logic lives in [`DistillationMixin`], which composes with any `Trainer` subclass that keeps the
`compute_loss` contract: `DistillationTrainer = DistillationMixin + Trainer`, and
`hf_compress.trainers.SFTDistillationTrainer = DistillationMixin + trl.SFTTrainer` (`trainers/sft.py`).
"""

from __future__ import annotations

from collections import defaultdict
from typing import NamedTuple

import torch
from transformers import Trainer

from ..distillation import cache as teacher_cache
from ..distillation.config import DistillationArguments, check_teacher_logits_placement
from ..distillation.heads import HeadInputCapture, checked_output_head, fused_saves_memory
from ..distillation.loss import distillation_loss, loss_mask
from ..distillation.teacher import (
    check_compatible, is_dispatched, is_quantized, load_teacher, prepare_teacher, resolve_teacher_placement,
)
from ..distributed import check_distributed_support
from ..tasks import get_task, task_of_model


class _LossParts(NamedTuple):
    """One batch's loss, its logged parts, the positions they count, what they are divided by, and the
    `num_items_in_batch` the loss is already normalised by (`None`: per micro-batch)."""

    loss: torch.Tensor
    hard: torch.Tensor | None
    soft: torch.Tensor
    count: object
    denominator: object
    num_items: object


class DistillationMixin:
    """Knowledge distillation (Hinton et al. 2015, https://arxiv.org/abs/1503.02531) for a `Trainer` subclass.

    Put it first in the bases: `class MyTrainer(DistillationMixin, SomeTrainer)`. It takes `teacher_model` and
    `teacher_tokenizer` as keyword arguments, passes everything else to the trainer, and replaces `compute_loss`
    with [`~hf_compress.distillation.distillation_loss`] on the student's and the teacher's logits, so whatever
    the base trainer does to the data (chat templates, completion-only labels, packing) carries over.
    """

    #: The task when the student is given as a path (the base trainer loads it): `None` infers it from the model.
    default_task: str | None = None
    #: Whether `train_dataset` must already be tokenized when the trainer is built.
    needs_tokenized_dataset: bool = True

    def __init__(self, model=None, teacher_model=None, args: DistillationArguments | None = None, teacher_tokenizer=None,
                 teacher_logits: str | None = None, **kwargs):
        args = _checked_arguments(type(self).__name__, model, teacher_model, args, teacher_logits, kwargs)
        # FSDP1, `use_cpu=True` + `fsdp` (silently DDP), callbacks that are not exact under the run's sharding.
        backend = check_distributed_support(args, kwargs.get("callbacks") or ())
        task = self._student_task(model, args)
        hub_logits = args.teacher_logits
        teacher = None  # with Hub teacher logits nothing of the teacher is ever loaded
        if hub_logits is None:
            teacher, teacher_tokenizer = self._load_teacher(model, teacher_model, task, args, teacher_tokenizer, kwargs)
            # `teacher_placement` checked against the launch and the loaded teacher before the Trainer is built.
            resolve_teacher_placement(args.teacher_placement, backend, teacher, args.cache_teacher_logits)
        if self.needs_tokenized_dataset:
            _check_tokenized(kwargs.get("train_dataset"), "train_dataset")
        super().__init__(model=model, args=args, **kwargs)
        self.task = task
        self.logit_layout = get_task(task).logit_layout
        self.teacher_cache = None
        self._output_heads = None  # (student, teacher) output heads projected in the loss, read on the first step
        # Per mode: summed hard / soft losses over counted positions, and the count (see `log`).
        self._distill_sums = {"train": defaultdict(float), "eval": defaultdict(float)}
        label_names = self.logit_layout.label_names
        if label_names and label_names[0] not in self.label_names:
            self.label_names = list(label_names)
        if hub_logits is not None:
            self.teacher = None
            self._use_hub_teacher_logits(hub_logits, teacher_model)
            return
        self._place_teacher(teacher, teacher_tokenizer)

    def _student_task(self, model, args: DistillationArguments) -> str:
        """The task: `distillation_task`, else the student's class, else the trainer's `default_task`."""
        if args.distillation_task != "auto":
            return args.distillation_task
        if isinstance(model, torch.nn.Module):
            return task_of_model(model)
        if self.default_task is not None:
            return self.default_task
        raise ValueError(f"{type(self).__name__} needs the student as a model; got {type(model).__name__}.")

    def _load_teacher(self, model, teacher_model, task: str, args, teacher_tokenizer, kwargs):
        """The teacher (loaded when given as a path) and its tokenizer, checked against the student when it can be."""
        teacher = load_teacher(teacher_model, task, args.teacher_dtype)
        if teacher_tokenizer is None and isinstance(teacher_model, str):
            teacher_tokenizer = _try_load_tokenizer(teacher_model)
        processing_class = _tokenizer_of(kwargs.get("processing_class"))
        # Checked before the Trainer sets anything up: a mismatch is a one-line error, not a crash mid-epoch. A
        # trainer that loads its own tokenizer (SFTTrainer) is checked once it has it.
        if isinstance(model, torch.nn.Module) and (processing_class is not None or self.default_task is None):
            check_compatible(model, teacher, task, processing_class, teacher_tokenizer)
        return teacher, teacher_tokenizer

    def _place_teacher(self, teacher, teacher_tokenizer) -> None:
        """Check the teacher against the built student, freeze and place it, and cache its logits if asked."""
        args = self.args
        student = self.accelerator.unwrap_model(self.model)
        self.teacher_width = check_compatible(
            student, teacher, self.task, _tokenizer_of(self.processing_class), teacher_tokenizer
        )
        # Left-padded rows are read at their unpadded positions when a model has absolute position embeddings.
        self._takes_positions = teacher_cache.unpadded_positions_apply(student, teacher)
        self.teacher = prepare_teacher(
            teacher, args.teacher_device or args.device, args.teacher_dtype,
            accelerator=self.accelerator, cached=args.cache_teacher_logits, placement=args.teacher_placement,
        )
        if args.cache_teacher_logits and self.train_dataset is not None:
            self._cache_teacher_logits()

    # ---- the teacher-logit cache -------------------------------------------------------------------------

    def _cache_teacher_logits(self):
        import datasets

        if not isinstance(self.train_dataset, datasets.Dataset):
            raise TypeError(
                f"cache_teacher_logits needs a `datasets.Dataset` train set, got `{type(self.train_dataset).__name__}`; "
                "convert it with `Dataset.from_dict` / `from_list`, or train with the live teacher."
            )
        padding_side = _padding_side(self.processing_class, self.data_collator)
        dtype = self.args.teacher_cache_dtype or _default_cache_dtype(self.teacher)
        self._set_signature_columns_if_needed()
        cols = self.train_dataset.column_names
        if self.args.remove_unused_columns:
            cols = [c for c in cols if c in self._signature_columns]
        if self.logit_layout.over_vocabulary:  # the cache stores the usable width of the head
            width = self.teacher_width or self.teacher.get_output_embeddings().weight.shape[0]
        else:
            width = None
        dataset = self.train_dataset.remove_columns([c for c in (teacher_cache.ROW,) if c in self.train_dataset.column_names])
        # The main process computes and writes the cache; the others wait, then read the same file.
        with self.args.main_process_first(desc="teacher logits"):
            self.teacher_cache, _ = teacher_cache.load_or_compute_teacher_cache(
                self.teacher, dataset, self.data_collator, self.task, self.args.teacher_logits_top_k,
                self.args.per_device_eval_batch_size, self.args.teacher_cache_dir, temperature=self.args.temperature,
                dtype=dtype, width=width, padding_side=padding_side, columns=cols, positions=self._takes_positions,
            )
        self._attach_teacher_cache(dataset, padding_side, dtype, width)

    def _attach_teacher_cache(self, dataset, padding_side: str, dtype: str, width: int | None):
        """Point every training row at its cache row and wrap the collator to place the cached logits."""
        self.train_dataset = dataset.add_column(teacher_cache.ROW, list(range(len(dataset))))
        self.data_collator = teacher_cache.TeacherCacheCollator(
            self.data_collator, self.task, self.teacher_cache, padding_side, dtype, width
        )

    def _use_hub_teacher_logits(self, source: str, teacher_id: str | None):
        """Download the Hub teacher cache `source`, check its key against this run, and train on it."""
        import datasets

        from ..distillation import hub_cache

        if not isinstance(self.train_dataset, datasets.Dataset):
            raise TypeError(
                f"teacher_logits needs a `datasets.Dataset` train set, got `{type(self.train_dataset).__name__}`; "
                "convert it with `Dataset.from_dict` / `from_list`."
            )
        tokenizer = _tokenizer_of(self.processing_class)
        if tokenizer is None:
            raise ValueError(
                f"teacher_logits={source!r} needs `processing_class` (the tokenizer the cache was made with) to check "
                "that the token ids mean the same; pass `processing_class=tokenizer`."
            )
        dataset = self.train_dataset.remove_columns([c for c in (teacher_cache.ROW,) if c in self.train_dataset.column_names])
        with self.args.main_process_first(desc="teacher logits"):
            cache, key = hub_cache.open_checked_cache(source, dataset, tokenizer, self.task, self.args.temperature,
                                                      teacher_id, self.args.teacher_revision)
        student = self.accelerator.unwrap_model(self.model)
        self.teacher_width = hub_cache.check_student_against_key(student, key, self.task, tokenizer, source)
        # As with a live teacher: left-padded rows at unpadded positions when either model reads absolute positions
        # and both take `position_ids`; the cache must have been computed the same way.
        self._takes_positions = (
            (teacher_cache.reads_absolute_positions(student) or key["teacher_reads_absolute_positions"])
            and teacher_cache.accepts_position_ids(student) and key["teacher_accepts_position_ids"]
        )
        if bool(key["left_padding_positions"]) != bool(self._takes_positions):
            raise ValueError(
                f"The teacher logits {source} have `left_padding_positions` {key['left_padding_positions']!r} but this "
                f"student needs {self._takes_positions!r}; push the cache with "
                f"`push_teacher_cache(..., positions={self._takes_positions!r})`."
            )
        self.teacher_cache = cache
        self._attach_teacher_cache(dataset, _padding_side(self.processing_class, self.data_collator), key["dtype"],
                                   key["width"])

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        # Keep the cache pointer through `remove_unused_columns`; the cache collator consumes it.
        if teacher_cache.ROW not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, teacher_cache.ROW]

    # ---- the loss ------------------------------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)  # `prediction_step` reads the batch after this call: leave it whole
        cached = {k: inputs.pop(k) for k in teacher_cache.CACHE_COLUMNS if k in inputs}
        covered = inputs.pop(teacher_cache.COVERED, None)
        labels = {k: inputs.pop(k) for k in ("labels", "start_positions", "end_positions", "shift_labels") if k in inputs}
        positions = teacher_cache.left_padding_position_ids(inputs)
        if positions is not None and self._takes_positions:
            # Left padding would shift an absolute-position model's inputs by the batch's padding: both models read
            # each row as if unpadded, as the cached teacher was computed.
            inputs["position_ids"] = positions
        if not cached and self.teacher is None:
            raise ValueError(
                f"This batch has no cached teacher logits and the run has no teacher (teacher_logits="
                f"{self.args.teacher_logits!r} covers the training set only); evaluate the student with a plain `Trainer`."
            )
        student_head, teacher_head = self._heads_for_step(model, inputs, return_outputs, bool(cached))
        with HeadInputCapture(student_head) as student_in:
            outputs = model(**inputs)
        with HeadInputCapture(teacher_head) as teacher_in:
            teacher_out = cached or teacher_cache.teacher_forward(self.teacher, inputs, self.task, self.teacher_width)
        device = outputs[self.logit_layout.outputs[0]].device
        teacher_out = {k: v.to(device) for k, v in teacher_out.items()}
        # A projected head: the loss gets the hidden states it reads, and the model returned empty logits.
        student_logits = None if student_in.hidden is None else student_head.logits(student_in.hidden, self.teacher_width)
        if teacher_in.hidden is not None:
            teacher_out[teacher_cache.LOGITS] = teacher_head.logits(teacher_in.hidden, self.teacher_width)
        if self.logit_layout.over_positions:
            parts = self._positions_loss(outputs, teacher_out, labels, inputs.get("attention_mask"), covered)
        else:
            parts = self._classes_loss(outputs, teacher_out, labels, inputs.get("attention_mask"), covered,
                                       num_items_in_batch, student_logits)
        loss = parts.loss
        # Tell `training_step` whether this loss is already normalised for gradient accumulation.
        self.loss_is_scaled_for_ga = parts.num_items is not None
        if parts.num_items is not None and self.args.average_tokens_across_devices:
            # As `Trainer.compute_loss`: the count was summed over processes and DDP averages the gradients.
            loss = loss * self.accelerator.num_processes
        self._add_logged_parts("train" if model.training else "eval", parts)
        outputs["loss"] = loss
        return (loss, outputs) if return_outputs else loss

    def _heads_for_step(self, model, inputs, return_outputs: bool, cached: bool):
        """The student's and the live teacher's output heads when this step projects them in the loss (causal LMs,
        training, no FSDP / DeepSpeed sharding; see `distillation/heads.py`), else `None` for each.

        Read and checked against each model's own forward on the first training step; the student's is used on a
        step when it holds less memory than the full logits ([`fused_saves_memory`]).
        """
        layout = self.logit_layout
        if (return_outputs or not model.training or not torch.is_grad_enabled() or not layout.over_vocabulary
                or self.is_fsdp_enabled or self.is_deepspeed_enabled):
            return None, None
        if self._output_heads is None:
            student = checked_output_head(self.accelerator.unwrap_model(model), inputs, self.teacher_width, "student")
            teacher = None
            live = self.teacher is not None and not self.args.cache_teacher_logits
            if live and not (is_quantized(self.teacher) or is_dispatched(self.teacher)):
                teacher = checked_output_head(self.teacher, inputs, self.teacher_width, "teacher")
            self._output_heads = (student, teacher)
        student, teacher = self._output_heads
        ids = inputs.get("input_ids")
        if student is not None and (ids is None or not fused_saves_memory(student, ids.numel())):
            student = None
        return student, None if cached else teacher

    def _positions_loss(self, outputs, teacher_out, labels, attention_mask, covered) -> _LossParts:
        """The loss when the classes are the positions (QA spans): one distillation loss per output, averaged."""
        args = self.args
        seq_len = outputs[self.logit_layout.outputs[0]].shape[1]
        # A padded position is no answer for either model, so a padded row has the distribution of its unpadded
        # example, live or cached (the cache holds no logits there).
        valid = attention_mask
        if covered is not None:
            valid = covered if valid is None else valid.bool() & covered.to(valid.device)
        results = []
        for key, pos_key in zip(self.logit_layout.outputs, self.logit_layout.label_names):
            pos = labels.get(pos_key)
            if pos is not None:  # as BERT's QA head: positions outside the sequence are ignored
                pos = torch.where((pos >= 0) & (pos < seq_len), pos, torch.full_like(pos, -100))
            student_logits, teacher_logits = outputs[key], teacher_out[teacher_cache.teacher_key(key)]
            if valid is not None:
                pad = ~valid.bool().to(student_logits.device)
                student_logits = student_logits.masked_fill(pad, teacher_cache.PAD_LOGIT)
                teacher_logits = teacher_logits.masked_fill(pad, teacher_cache.PAD_LOGIT)
            results.append(distillation_loss(student_logits, teacher_logits, pos, args.temperature, args.alpha))
        n = len(results)
        hard = None if results[0].hard_loss is None else sum(r.hard_loss for r in results) / n
        count = outputs[self.logit_layout.outputs[0]].shape[0]
        return _LossParts(sum(r.loss for r in results) / n, hard, sum(r.soft_loss for r in results) / n, count, count,
                          None)

    def _classes_loss(self, outputs, teacher_out, labels, attention_mask, covered, num_items_in_batch,
                      student_logits=None) -> _LossParts:
        """The loss over labels or a vocabulary, per example or per token, as the task's `logit_layout` says.
        `student_logits` replaces `outputs.logits` when the student's head is projected in the loss (`HeadLogits`)."""
        args, layout = self.args, self.logit_layout
        logits = outputs.logits if student_logits is None else student_logits
        if student_logits is None and self.teacher_width is not None and logits.shape[-1] > self.teacher_width:
            logits = logits[..., : self.teacher_width]  # a view: the padded rows of the head are never used
        y, shift = labels.get("labels"), layout.shift_labels
        if "shift_labels" in labels:  # a padding-free collator that already shifted the labels
            y, shift = labels["shift_labels"], False
        attention = attention_mask if layout.per_position else None
        if covered is not None:
            attention = covered.to(logits.device) if attention is None else attention.bool() & covered.to(attention.device)
        # Token averages divide by the accumulated batch's label count, so gradient accumulation averages over tokens
        # as one large batch would; the others average per micro-batch (equal sizes).
        n = num_items_in_batch if layout.token_average and y is not None else None
        res = distillation_loss(
            logits, teacher_out[teacher_cache.LOGITS], y, args.temperature, args.alpha, shift_labels=shift,
            attention_mask=attention, num_items_in_batch=n, teacher_indices=teacher_out.get(teacher_cache.INDICES),
        )
        mask, _ = loss_mask(logits.shape[:-1], y, attention, shift_labels=shift)
        count = mask.sum()
        return _LossParts(res.loss, res.hard_loss, res.soft_loss, count, count if n is None else n, n)

    def _add_logged_parts(self, mode: str, parts: _LossParts) -> None:
        """Logged parts are per-position averages: sums and counts are kept and divided at logging time, so neither
        gradient accumulation (parts divided by the whole accumulated count) nor the world size shrinks them."""
        sums, soft = self._distill_sums[mode], parts.soft
        denominator = torch.as_tensor(parts.denominator, dtype=torch.float32).to(soft.device)
        sums["soft_loss"] = sums["soft_loss"] + soft.detach().float() * denominator
        if parts.hard is not None:
            sums["hard_loss"] = sums["hard_loss"] + parts.hard.detach().float() * denominator
        sums["count"] = sums["count"] + torch.as_tensor(parts.count, dtype=torch.float32).to(soft.device)

    def train(self, resume_from_checkpoint=None, **kwargs):
        """[`Trainer.train`], after checking the checkpoint to resume from (a truncated file is named in one line).

        `resume_from_checkpoint=True` resumes from the newest *complete* checkpoint of `output_dir`.
        """
        from ..distributed import last_valid_checkpoint, validate_checkpoint

        if resume_from_checkpoint is True:
            resume_from_checkpoint = last_valid_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(
                    f"resume_from_checkpoint=True but {self.args.output_dir} has no complete checkpoint; "
                    "train from scratch (resume_from_checkpoint=None) or point to a checkpoint folder."
                )
        if isinstance(resume_from_checkpoint, str):
            validate_checkpoint(resume_from_checkpoint)
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        mode = "eval" if any(k.startswith("eval_") for k in logs) else "train"
        prefix = "eval_" if mode == "eval" else ""
        sums = self._distill_sums[mode]
        if sums:
            names = [k for k in ("hard_loss", "soft_loss") if k in sums]
            totals = torch.stack([torch.as_tensor(sums[k], dtype=torch.float32) for k in (*names, "count")])
            totals = totals.to(self.args.device)
            if self.accelerator.num_processes > 1:
                totals = self.accelerator.reduce(totals, reduction="sum")  # sums of sums over sums of counts
            for name, total in zip(names, totals[:-1]):
                logs[prefix + name] = (total / totals[-1].clamp(min=1)).item()
        sums.clear()
        super().log(logs, *args, **kwargs)


class DistillationTrainer(DistillationMixin, Trainer):
    """[`~transformers.Trainer`] for knowledge distillation (Hinton et al. 2015, https://arxiv.org/abs/1503.02531).

    The loss is `(1 - alpha) * CE(student, labels) + alpha * T**2 * KL(softmax(teacher/T) || softmax(student/T))`
    ([`~hf_compress.distillation.distillation_loss`]); without labels it is the soft part alone. The teacher is
    frozen, in eval mode, runs without gradients on its own device and dtype (left where it is when loaded with
    `device_map` or quantized; under FSDP2 sharded with the student's mesh, see `args.teacher_placement`), and is checked against the student (vocabulary, labels, tokenizer) before anything
    runs. With `args.cache_teacher_logits` its logits are computed once over the training set, written to disk and
    reused every epoch. The hard and soft parts are logged as `hard_loss` and `soft_loss` beside `loss`.

    Args:
        model (`PreTrainedModel`): the student.
        teacher_model (`PreTrainedModel` or `str`): the teacher, or its path / Hub id (loaded with the auto
            class of the student's task).
        args (`DistillationArguments`): training and distillation options.
        teacher_tokenizer (*optional*): the teacher's tokenizer, checked against `processing_class`; loaded from
            `teacher_model` when that is a path.
        **kwargs: everything else [`~transformers.Trainer`] takes.
    """


def _checked_arguments(trainer: str, model, teacher_model, args, teacher_logits, kwargs) -> DistillationArguments:
    """The run's `DistillationArguments` (with `teacher_logits` given to the trainer folded in), after checking that
    the student, the teacher and the teacher logits are given in a way that can run."""
    if args is None:
        args = DistillationArguments(output_dir="tmp_trainer")
    if not isinstance(args, DistillationArguments):
        raise TypeError(
            f"{trainer} needs `DistillationArguments`, got `{type(args).__name__}`; "
            "build the arguments with `hf_compress.distillation.DistillationArguments(...)`."
        )
    if model is None:
        raise ValueError(f"{trainer} needs a student `model`.")
    if teacher_logits is not None:
        if args.teacher_logits not in (None, teacher_logits):
            raise ValueError(
                f"teacher_logits={teacher_logits!r} but args.teacher_logits={args.teacher_logits!r}; give it once."
            )
        args.teacher_logits = teacher_logits
        check_teacher_logits_placement(teacher_logits, args.teacher_placement)
        if args.cache_teacher_logits:
            raise ValueError(
                f"teacher_logits={teacher_logits!r} replaces the teacher and its cache; drop `cache_teacher_logits`."
            )
    hub_logits = args.teacher_logits
    if hub_logits is not None:
        if isinstance(teacher_model, torch.nn.Module):
            raise ValueError(
                f"teacher_logits={hub_logits!r} replaces the teacher: pass `teacher_model=None` (or the teacher's id, "
                "checked against the cache), not a loaded model."
            )
        if teacher_model is not None and not isinstance(teacher_model, str):
            raise TypeError(f"teacher_model must be None or the teacher's id with teacher_logits, got {type(teacher_model).__name__}.")
        evaluates = str(getattr(args.eval_strategy, "value", args.eval_strategy)) != "no"
        if kwargs.get("eval_dataset") is not None and evaluates:
            raise ValueError(
                f"teacher_logits={hub_logits!r} holds the training set's logits only, so evaluation has no teacher; "
                "set `eval_strategy=\"no\"` and evaluate the student with a plain `Trainer`, or use a live teacher."
            )
    elif args.teacher_revision is not None:
        raise ValueError(
            f"teacher_revision={args.teacher_revision!r} is checked against Hub teacher logits only; set "
            "`teacher_logits` or drop `teacher_revision`."
        )
    elif teacher_model is None:
        raise ValueError(f"{trainer} needs a `teacher_model` (a PreTrainedModel or a path).")
    return args


def _check_tokenized(dataset, name: str) -> None:
    cols = getattr(dataset, "column_names", None)
    if cols is not None and "input_ids" not in cols and "inputs_embeds" not in cols:
        raise ValueError(
            f"{name} has no `input_ids` column (columns: {cols}); tokenize it first, "
            "e.g. `dataset.map(lambda b: tokenizer(b['text']), batched=True)`."
        )


def _tokenizer_of(processing_class):
    """The tokenizer of a tokenizer or a processor (`processor.tokenizer`); `None` for anything else."""
    tokenizer = getattr(processing_class, "tokenizer", processing_class)
    return tokenizer if hasattr(tokenizer, "get_vocab") else None


def _padding_side(processing_class, collator) -> str:
    for owner in (processing_class, getattr(collator, "tokenizer", None), getattr(collator, "processing_class", None)):
        side = getattr(getattr(owner, "tokenizer", owner), "padding_side", None)
        if side in ("left", "right"):
            return side
    return "right"


def _default_cache_dtype(teacher) -> str:
    dtype = getattr(teacher, "dtype", torch.float32)
    return {torch.float16: "float16", torch.bfloat16: "bfloat16"}.get(dtype, "float32")


def _try_load_tokenizer(path: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError):
        return None
