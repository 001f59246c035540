"""`DistillationTrainer`: a drop-in `transformers.Trainer` whose loss mixes hard labels with a teacher's soft logits."""

from __future__ import annotations

from collections import defaultdict

import torch
from transformers import Trainer

from ..distillation import cache as teacher_cache
from ..distillation.config import DistillationArguments
from ..distillation.loss import distillation_loss
from ..distillation.teacher import check_compatible, infer_task, load_teacher, prepare_teacher


class DistillationTrainer(Trainer):
    """[`~transformers.Trainer`] for knowledge distillation (Hinton et al. 2015, https://arxiv.org/abs/1503.02531).

    The loss is `(1 - alpha) * CE(student, labels) + alpha * T**2 * KL(softmax(teacher/T) || softmax(student/T))`
    ([`~hf_compress.distillation.distillation_loss`]); without labels it is the soft part alone. The teacher is
    frozen, in eval mode, runs without gradients on its own device and dtype, and is checked against the
    student (logit sizes, labels, tokenizer) before anything runs. With `args.cache_teacher_logits` its logits
    are computed once over the training set and reused every epoch. The hard and soft parts are logged as
    `hard_loss` and `soft_loss` beside `loss`.

    Args:
        model (`PreTrainedModel`): the student.
        teacher_model (`PreTrainedModel` or `str`): the teacher, or its path / Hub id (loaded with the auto
            class of the student's task).
        args (`DistillationArguments`): training and distillation options.
        teacher_tokenizer (*optional*): the teacher's tokenizer, checked against `processing_class`; loaded from
            `teacher_model` when that is a path.
        **kwargs: everything else [`~transformers.Trainer`] takes.
    """

    def __init__(self, model=None, teacher_model=None, args: DistillationArguments | None = None, teacher_tokenizer=None, **kwargs):
        if args is None:
            args = DistillationArguments(output_dir="tmp_trainer")
        if not isinstance(args, DistillationArguments):
            raise TypeError(
                f"DistillationTrainer needs `DistillationArguments`, got `{type(args).__name__}`; "
                "build the arguments with `hf_compress.distillation.DistillationArguments(...)`."
            )
        if model is None:
            raise ValueError("DistillationTrainer needs a student `model`.")
        if teacher_model is None:
            raise ValueError("DistillationTrainer needs a `teacher_model` (a PreTrainedModel or a path).")
        task = args.distillation_task if args.distillation_task != "auto" else infer_task(model)
        teacher = load_teacher(teacher_model, task, args.teacher_dtype)
        if teacher_tokenizer is None and isinstance(teacher_model, str) and kwargs.get("processing_class") is not None:
            teacher_tokenizer = _try_load_tokenizer(teacher_model)
        # Checked before the Trainer sets anything up: a mismatch is a one-line error, not a crash mid-epoch.
        check_compatible(model, teacher, task, kwargs.get("processing_class"), teacher_tokenizer)
        _check_tokenized(kwargs.get("train_dataset"), "train_dataset")
        super().__init__(model=model, args=args, **kwargs)
        self.task = task
        self.teacher = prepare_teacher(teacher, args.teacher_device or self.args.device, args.teacher_dtype)
        self._distill_metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
        if self.task == "question-answering" and "start_positions" not in self.label_names:
            self.label_names = ["start_positions", "end_positions"]
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
        padding_side = getattr(self.processing_class, "padding_side", "right")
        with self.args.main_process_first(desc="teacher logits"):
            self.train_dataset = teacher_cache.load_or_compute_teacher_cache(
                self.teacher, self.train_dataset, self.data_collator, self.task, self.args.teacher_logits_top_k,
                self.args.per_device_eval_batch_size, self.args.teacher_cache_dir,
            )
        self.data_collator = teacher_cache.TeacherCacheCollator(self.data_collator, self.task, padding_side)

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        # Keep the cached teacher columns through `remove_unused_columns`; the collator and loss consume them.
        self._signature_columns += [c for c in teacher_cache.CACHE_COLUMNS if c not in self._signature_columns]

    # ---- the loss ------------------------------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)  # `prediction_step` reads the batch after this call: leave it whole
        cached = {k: inputs.pop(k) for k in teacher_cache.CACHE_COLUMNS if k in inputs}
        labels = {k: inputs.pop(k) for k in ("labels", "start_positions", "end_positions") if k in inputs}
        outputs = model(**inputs)
        teacher_out = cached or teacher_cache.teacher_forward(self.teacher, inputs, self.task)
        teacher_out = {k: v.to(outputs[_student_key(k)].device) for k, v in teacher_out.items()}
        args = self.args

        if self.task == "question-answering":
            seq_len = outputs.start_logits.shape[1]
            parts = []
            for key, pos_key in (("start_logits", "start_positions"), ("end_logits", "end_positions")):
                pos = labels.get(pos_key)
                if pos is not None:  # as BERT's QA head: positions outside the sequence are ignored
                    pos = torch.where((pos >= 0) & (pos < seq_len), pos, torch.full_like(pos, -100))
                parts.append(
                    distillation_loss(
                        outputs[key], teacher_out[f"teacher_{key}"], pos, args.temperature, args.alpha,
                    )
                )
            loss = (parts[0].loss + parts[1].loss) / 2
            hard = None if parts[0].hard_loss is None else (parts[0].hard_loss + parts[1].hard_loss) / 2
            soft = (parts[0].soft_loss + parts[1].soft_loss) / 2
            num_items_in_batch = None
        else:
            y = labels.get("labels")
            # Token-level tasks divide by the accumulated batch's label count, so gradient accumulation averages
            # over tokens as one large batch would; classification averages per micro-batch (equal sizes).
            n = num_items_in_batch if self.task in ("causal-lm", "token-classification") and y is not None else None
            res = distillation_loss(
                outputs.logits, teacher_out[teacher_cache.LOGITS], y, args.temperature, args.alpha,
                shift_labels=self.task == "causal-lm",
                # Per-position tasks only: a classifier has one prediction per example, not per token.
                attention_mask=inputs.get("attention_mask") if self.task != "sequence-classification" else None,
                num_items_in_batch=n, teacher_indices=teacher_out.get(teacher_cache.INDICES),
            )
            loss, hard, soft, num_items_in_batch = res.loss, res.hard_loss, res.soft_loss, n
        # Tell `training_step` whether this loss is already normalised for gradient accumulation.
        self.loss_is_scaled_for_ga = num_items_in_batch is not None
        if num_items_in_batch is not None and self.args.average_tokens_across_devices:
            # As `Trainer.compute_loss`: the count was summed over processes and DDP averages the gradients.
            loss = loss * self.accelerator.num_processes

        mode = "train" if model.training else "eval"
        self._distill_metrics[mode]["soft_loss"].append(soft.detach().item())
        if hard is not None:
            self._distill_metrics[mode]["hard_loss"].append(hard.detach().item())
        outputs["loss"] = loss
        return (loss, outputs) if return_outputs else loss

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
        for key, values in self._distill_metrics[mode].items():
            if values:
                mean = torch.tensor(sum(values) / len(values), device=self.args.device)
                if self.accelerator.num_processes > 1:
                    # Average over processes, as the Trainer does for `loss`.
                    mean = self.accelerator.reduce(mean, reduction="mean")
                logs[prefix + key] = mean.item()
        self._distill_metrics[mode].clear()
        super().log(logs, *args, **kwargs)


def _check_tokenized(dataset, name: str) -> None:
    cols = getattr(dataset, "column_names", None)
    if cols is not None and "input_ids" not in cols and "inputs_embeds" not in cols:
        raise ValueError(
            f"{name} has no `input_ids` column (columns: {cols}); tokenize it first, "
            "e.g. `dataset.map(lambda b: tokenizer(b['text']), batched=True)`."
        )


def _student_key(teacher_key: str) -> str:
    return {"teacher_start_logits": "start_logits", "teacher_end_logits": "end_logits"}.get(teacher_key, "logits")


def _try_load_tokenizer(path: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError):
        return None
