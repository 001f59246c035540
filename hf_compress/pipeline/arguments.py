"""The options of `hf-compress` that are the pipeline's own: what to compress and which stages run
([`ModelArguments`]), and the data ([`DataArguments`]). The techniques' options live with the techniques
(`DistillationArguments`, `PruningArguments`, `QuantizationArguments`, `StructuredPruningArguments`); the CLI parses
all six with one `HfArgumentParser`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..tasks import TASKS, CompressionInputError

DEFAULT_OUTPUT_DIR = "hf-compress-output"
# `--format`: the quantized formats set `QuantizationArguments.backend`; bitmask and dense save unquantized weights.
# `onnx` writes an ONNX Runtime graph: dynamic int8 when quantizing, fp32 with `--no_quantize`.
EXPORT_FORMATS = ("compressed-tensors", "bitsandbytes", "bitmask", "dense", "onnx")
# `--target latency`: the structures to try, least aggressive first (`none`: the base as it is), each cut one-shot,
# distilled from the base and exported to ONNX Runtime; the fastest within the accuracy budget is kept.
DEFAULT_LATENCY_CANDIDATES = "none;ffn=0.5;ffn=0.25;ffn=0.25,layers=0.67"
# Option defaults a `--target` implies (the command line, a recipe or `compress()` keywords still win): the latency
# search times ONNX Runtime graphs (dynamic int8, which no QAT replays), and unstructured sparsity runs no faster there.
TARGET_DEFAULTS = {"latency": {"format": "onnx", "qat": False, "target_sparsity": 0.0}}


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
        target (`str`, *optional*):
            `latency`: try each of `latency_candidates` (structured cut one-shot, distilled from the base or
            `--teacher`, exported to ONNX Runtime), time it on this machine at `latency_batch_size` and keep the
            fastest whose main metric is within `max_metric_drop` points (`--max_accuracy_drop`; perplexity:
            `max_perplexity_increase`) of the base. Implies `--format onnx --no_qat --sparsity 0`.
        latency_candidates (`str`, *optional*, defaults to `"none;ffn=0.5;ffn=0.25;ffn=0.25,layers=0.67"`):
            `--target latency`: the candidates, least aggressive first, separated by `;`: `none` (the base as it is)
            or `structure=kept` pairs joined by `,` (structures `ffn`, `heads`, `hidden`, `layers`; kept as a
            fraction in (0, 1) or a whole count > 1). The search stops at the first candidate over the budget.
        latency_batch_size (`int`, *optional*, defaults to `32`):
            `--target latency`: examples of the held-out split per timed call.
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

    target: str | None = field(
        default=None,
        metadata={"help": "latency: keep the fastest of --latency_candidates (cut, distilled, exported to ONNX Runtime, timed here) within --max_accuracy_drop of the base."},
    )
    latency_candidates: str = field(
        default=DEFAULT_LATENCY_CANDIDATES,
        metadata={"help": "--target latency: candidates least aggressive first, ';'-separated: none, or structure=kept pairs joined by ',' (ffn=0.5,layers=4)."},
    )
    latency_batch_size: int = field(default=32, metadata={"help": "--target latency: held-out examples per timed call."})

    def __post_init__(self):
        if self.target not in (None,) + tuple(TARGET_DEFAULTS):
            raise CompressionInputError(f"target must be one of {', '.join(TARGET_DEFAULTS)}, got {self.target!r}.")
        if self.target == "latency":
            if self.format not in (None, "onnx"):
                raise CompressionInputError(
                    f"--target latency times ONNX Runtime graphs, not --format {self.format}; drop --format or pass "
                    "--format onnx.")
            self.format = "onnx"
            parse_latency_candidates(self.latency_candidates)
            if self.latency_batch_size < 1:
                raise CompressionInputError(f"latency_batch_size must be >= 1, got {self.latency_batch_size}.")
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


def parse_latency_candidates(spec: str) -> list[dict]:
    """`--latency_candidates` -> one `{structure: kept}` dict per candidate, in order (`{}` for `none`).

    Raises:
        `CompressionInputError`: one line naming the bad part and the form expected.
    """
    from ..architectures import STRUCTURES

    form = "`none` or structure=kept pairs joined by `,` (e.g. `none;ffn=0.5;ffn=0.25,layers=4`)"
    units = {"ffn": "FFN neuron", "heads": "KV group", "hidden": "hidden channel", "layers": "block"}
    out = []
    for part in [p.strip() for p in str(spec).split(";")]:
        if part == "none":
            out.append({})
            continue
        candidate = {}
        for pair in [p.strip() for p in part.split(",")]:
            name, sep, value = pair.partition("=")
            name = name.strip()
            try:
                kept = float(value)
            except ValueError:
                kept = None
            if not sep or name not in STRUCTURES or name in candidate or kept is None or not (
                    0 < kept <= 1 or (kept > 1 and kept.is_integer())):
                raise CompressionInputError(
                    f"latency_candidates: {part!r} is not a candidate; each of the `;`-separated candidates is {form}, "
                    f"structures {', '.join(STRUCTURES)}, kept a fraction in (0, 1) or a whole count > 1.")
            if kept == 1:  # a kept amount of 1 means all of them: the structure would not be cut
                raise CompressionInputError(
                    f"latency_candidates: {pair!r} in {part!r} keeps every {units[name]} (a kept amount of 1 means all); "
                    f"pass a fraction below 1 (e.g. `{name}=0.5`) or a whole count > 1, or drop `{pair}`.")
            candidate[name] = int(kept) if kept > 1 else kept
        out.append(candidate)
    if len(set(map(candidate_name, out))) < len(out):
        raise CompressionInputError(f"latency_candidates {spec!r} names a candidate twice; list each once.")
    return out


def candidate_name(candidate: dict) -> str:
    """How a latency candidate is named in the plan, the console and the report: `none` or `ffn=0.5,layers=4`."""
    return ",".join(f"{k}={v:g}" for k, v in candidate.items()) or "none"


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
