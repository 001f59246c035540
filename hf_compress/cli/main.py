"""`hf-compress`: compress a model end to end with one command.

    hf-compress --model <id or path> --dataset <id or path> [--teacher ...] [--sparsity 0.8] [--bits 4]
                [--config recipe.yaml] [--output_dir ...] [--push_to_hub --hub_model_id ...]

`hf-compress cache-teacher --teacher ... --dataset ... --hub_repo user/name` pushes a teacher's top-k logits to the
Hub (`hf_compress.cli.cache_teacher`). With no arguments (or `hf-compress demo [options]`) it runs offline on the embedded MiniLM-L6 and the shipped Rotten
Tomatoes data into `./hf-compress-output`.
"""

from __future__ import annotations

import logging
import os
import shlex
import sys

from ..redact import redact_command, redact_mapping, redact_value  # light: os and re only

# Short spellings of the command line -> the dataclass field they set.
ALIASES = {"--sparsity": "--target_sparsity", "--max_accuracy_drop": "--max_metric_drop"}
YAML_ALIASES = {"sparsity": "target_sparsity", "max_accuracy_drop": "max_metric_drop"}

# The demo: fine-tune the new head of MiniLM-L6 (dense base), then 50% gradual pruning with the last quarter of the
# steps quantization-aware, and an 8-bit export of the Linear layers and the word embedding (half of MiniLM's
# weights), sized for a few minutes on 2 CPU cores. Every value can be overridden on the command line (`hf-compress demo --max_steps 20`).
DEMO_DEFAULTS = dict(
    dataset="rotten_tomatoes", max_length=48, max_eval_samples=1000, base_finetune_steps=150, max_steps=150,
    per_device_train_batch_size=16, learning_rate=1e-4, warmup_steps=15, target_sparsity=0.5, pruning_frequency=10,
    pruning_end_fraction=0.7, bits=8, quantize_embeddings=True,
)
# A training budget the user can set; when none is set on the embedded default model, the demo's budget applies
# (`hf-compress --sparsity 0.8 --bits 4` would otherwise run 3 epochs of base fine-tune and 3 of compression).
BUDGET_OPTIONS = ("max_steps", "num_train_epochs", "base_finetune_steps")
# CLI defaults that differ from `TrainingArguments`: no checkpoints, no trackers, a log line every 25 steps.
CLI_DEFAULTS = dict(output_dir="hf-compress-output", save_strategy="no", report_to="none", logging_steps=25)


class UsageError(Exception):
    """Bad command line: printed as one line, exit code 2."""


def _rewrite_aliases(argv: list[str]) -> list[str]:
    out = []
    for arg in argv:
        head, sep, tail = arg.partition("=")
        out.append(ALIASES.get(head, head) + sep + tail if head in ALIASES else arg)
    return out


def _pop_config(argv: list[str]) -> tuple[str | None, list[str]]:
    rest, path, i = [], None, 0
    while i < len(argv):
        if argv[i] == "--config":
            if i + 1 >= len(argv):
                raise UsageError("--config needs a path to a YAML recipe, e.g. `--config recipe.yaml`.")
            path, i = argv[i + 1], i + 2
            continue
        if argv[i].startswith("--config="):
            path = argv[i].split("=", 1)[1]
        else:
            rest.append(argv[i])
        i += 1
    return path, rest


def _read_recipe(path: str, known: set[str]) -> dict:
    import yaml

    if not os.path.isfile(path):
        raise UsageError(f"--config {path!r} does not exist; pass the path of a YAML recipe.")
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise UsageError(f"--config {path!r} must hold a mapping of option: value, got {type(data).__name__}.")
    data = {YAML_ALIASES.get(k, k): v for k, v in data.items()}
    unknown = sorted(set(data) - known)
    if unknown:
        raise UsageError(f"--config {path!r} has unknown options {', '.join(unknown)}; see `hf-compress --help`.")
    return data


def build_parser():
    """The `HfArgumentParser` over the pipeline's argument dataclasses."""
    from transformers import HfArgumentParser

    from ..pipeline.arguments import DataArguments, ModelArguments
    from ..distillation import DistillationArguments
    from ..pruning import PruningArguments
    from ..pruning.structured_config import StructuredPruningArguments
    from ..quantization import QuantizationArguments

    parser = HfArgumentParser(
        (ModelArguments, DataArguments, DistillationArguments, PruningArguments, QuantizationArguments,
         StructuredPruningArguments),
        prog="hf-compress",
        description="Fine-tune or distil with gradual pruning, quantize, evaluate base vs result, and write a "
        "checkpoint with its compression report and model card. Without arguments (or `hf-compress demo`): the "
        "offline demo on the embedded MiniLM-L6 and Rotten Tomatoes. `--sparsity` is short for "
        "`--target_sparsity`; `--config recipe.yaml` sets any option (the command line wins).",
    )

    def error(message):  # argparse prints usage + exits; a one-line error reads better and is testable
        raise UsageError(message)

    parser.error = error
    return parser


def _dest_names(parser) -> set[str]:
    return {a.dest for a in parser._actions if a.dest != "help"}


def parse(argv: list[str]):
    """Parse `argv` into the six dataclasses, the recipe (options that differ from the defaults) and the command."""
    explicit_demo = bool(argv) and argv[0] == "demo"
    if explicit_demo:
        argv = argv[1:]
    config_path, argv = _pop_config(_rewrite_aliases(list(argv)))
    parser = build_parser()
    known = _dest_names(parser)
    defaults = dict(CLI_DEFAULTS)
    import torch

    if not torch.cuda.is_available():
        defaults["dataloader_pin_memory"] = False  # pinning needs an accelerator; avoids a warning per run
    recipe_file = _read_recipe(config_path, known) if config_path else {}
    given = set(recipe_file) | {a[2:].split("=", 1)[0] for a in argv if a.startswith("--")}
    # The demo budget: bare `hf-compress`, `hf-compress demo`, or the embedded default model with no budget given.
    demo = explicit_demo or ("model" not in given and not given & set(BUDGET_OPTIONS))
    if demo:
        defaults.update(DEMO_DEFAULTS)
    from ..pipeline.arguments import TARGET_DEFAULTS

    defaults.update(TARGET_DEFAULTS.get(_option_value(argv, "target", recipe_file.get("target")), {}))
    defaults.update(recipe_file)
    parser.set_defaults(**defaults)
    # argparse converts string defaults with the option's type only; YAML already gives typed values.
    *groups, rest = parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False, return_remaining_strings=True)
    if rest:
        raise UsageError(f"unknown options {' '.join(redact_command(rest))}; see `hf-compress --help` for the options.")
    recipe = _recipe(parser, argv, defaults, groups)
    # The card and report show this command: every token- or password-like option value is redacted.
    shown = (["demo"] if demo else []) + ([f"--config={config_path}"] if config_path else []) + argv
    command = "hf-compress " + shlex.join(redact_command(shown))
    return groups, recipe, command.strip()


def _option_value(argv: list[str], name: str, default=None):
    """The value given to `--name` on the command line (the last one wins, as in argparse), else `default`."""
    value = default
    for i, arg in enumerate(argv):
        if arg == f"--{name}" and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(f"--{name}="):
            value = arg.split("=", 1)[1]
    return value


def _recipe(parser, argv, defaults, groups) -> dict:
    """Every option the run used that differs from the dataclass defaults (shown in the card)."""
    import dataclasses

    from ..pipeline.arguments import ModelArguments

    keep = set(defaults)
    for arg in argv:
        if arg.startswith("--"):
            name = arg[2:].split("=", 1)[0]
            keep.add(name[3:] if name.startswith("no_") else name)
    recipe = {}
    for group in groups:
        for f in dataclasses.fields(group):
            if f.name in keep or (isinstance(group, ModelArguments) and f.name in ("train", "prune", "quantize", "evaluate", "qat")):
                recipe[f.name] = _plain(getattr(group, f.name))
    return redact_mapping(recipe)  # never write a token: secret options dropped, token-like values redacted


def _plain(value):
    """A YAML/JSON-safe copy of an option value (enums such as `SaveStrategy.NO` become their value)."""
    import enum

    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value if isinstance(value, (int, float, str, bool, type(None))) else str(value)


def _graph_bits(report: dict) -> str | None:
    """The integer width an ONNX export's graph computes in ([`graph_bits`] of the op counts its export recorded);
    `None` for other formats and for an fp32 graph. The graph holds no safetensors, so the quantization summary (read
    from them) has no bits for it."""
    from ..quantization.onnx import graph_bits

    counts = (((report.get("pipeline") or {}).get("stages") or {}).get("export") or {}).get("op_counts")
    bits = graph_bits(counts) if counts else None
    return None if bits is None else str(bits)


def _print_summary(report: dict, output_dir: str, seconds: float) -> None:
    size = report.get("size", {})
    metrics = report.get("metrics", {}) or {}
    base_m, comp_m = metrics.get("base") or {}, metrics.get("compressed") or {}
    sparsity = report.get("sparsity", {})
    quant = report.get("quantization") or {}

    def mb(n):
        return f"{n / 1e6:.1f} MB" if isinstance(n, (int, float)) else "-"

    def pct(x):
        return f"{100 * x:.1f}%" if isinstance(x, (int, float)) else "-"

    bpw = report.get("bits_per_weight") or {}

    def bits(x):
        return f"{x:g}" if isinstance(x, (int, float)) else "-"

    bits_result = "/".join(str(b) for b in quant.get("bits", [])) or _graph_bits(report) or bits(bpw.get("in_memory"))
    rows = [
        ("size (weights on disk)", mb(size.get("base_weights_bytes")), mb(size.get("compressed_weights_bytes"))),
        ("size ratio", "1.00x", f"{size['ratio']:.2f}x smaller" if size.get("ratio") else "-"),
        ("linear-weight sparsity", pct(sparsity.get("base_linear_weights")), pct(sparsity.get("linear_weights"))),
        ("bits (quantized layers)", bits(bpw.get("base_in_memory")), bits_result),
        ("bits per weight in memory", bits(bpw.get("base_in_memory")), bits(bpw.get("in_memory"))),
        ("bits per weight on disk", bits(size.get("base_bits_per_weight_on_disk")), bits(size.get("bits_per_weight_on_disk"))),
    ]
    task = report.get("task") or {}
    ordered = [m for m in task.get("metric_names") or [] if m in base_m or m in comp_m]
    ordered += sorted((set(base_m) | set(comp_m)) - set(ordered) - {"num_examples"})
    fraction = (lambda name: name not in (task.get("lower_is_better") or []))
    for name in ordered:
        fmt = pct if fraction(name) else (lambda x: f"{x:.2f}" if isinstance(x, (int, float)) else "-")
        rows.append((f"{name} ({report.get('eval', {}).get('split', 'held-out')})", fmt(base_m.get(name)), fmt(comp_m.get(name))))
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows + [("", "base", "")])
    w2 = max(len(r[2]) for r in rows + [("", "", "compressed")])
    line = f"+-{'-' * w0}-+-{'-' * w1}-+-{'-' * w2}-+"
    print(line)
    print(f"| {'':<{w0}} | {'base':>{w1}} | {'compressed':>{w2}} |")
    print(line)
    for a, b, c in rows:
        print(f"| {a:<{w0}} | {b:>{w1}} | {c:>{w2}} |")
    print(line)
    search = ((report.get("pipeline") or {}).get("stages") or {}).get("latency_search")
    if search:
        from ..pipeline.latency import describe_search

        print("Latency search (this machine):")
        for row in describe_search(search):
            print(row)
    print(f"Techniques: {', '.join(report.get('techniques', [])) or 'none'}. Output: {output_dir}. Took {seconds:.0f} s.")
    if report.get("quality_guard"):
        print(report["quality_guard"])
    if report.get("push"):
        print(f"Pushed to {report['push']['repo_id']} at commit {report['push'].get('commit')}: {report['push'].get('url')}")


def main(argv: list[str] | None = None) -> int:
    """Run `hf-compress` with `argv` (defaults to `sys.argv[1:]`); returns the exit code: 0, 2 for bad input, 1 when
    the run checked its own result and found it wrong (a failed self-check, which writes nothing, or a loader of the
    written folder that computes something else)."""
    import time

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # transformers imports peft, which imports bitsandbytes; on AVX512-BF16 CPUs bitsandbytes then warns on stderr
    # that an optional Hub-downloaded kernel is missing. It changes nothing for the user: keep the console clean.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    # Its 8-bit matmul also warns, once per forward pass, that it casts float32 inputs to float16 (as designed).
    logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "cache-teacher":  # a subcommand with its own options
        from .cache_teacher import main as cache_teacher_main

        return cache_teacher_main(argv[1:])
    if argv and argv[0] in ("-h", "--help"):
        build_parser().print_help()
        return 0
    start = time.time()
    from ..pipeline.plan import prepare
    from ..pipeline.runner import run
    from ..tasks import CompressionInputError

    try:
        groups, recipe, command = parse(argv)
        model_args, data_args, training_args, pruning_args, quantization_args, structured_args = groups
        if training_args.push_to_hub and not training_args.hub_model_id:
            raise UsageError("--push_to_hub needs --hub_model_id namespace/name.")
        import transformers

        # Loading reports (e.g. the newly initialised task head, which the plan line states) stay off the console.
        # Set after parsing: `TrainingArguments` turns its bars off when transformers' logging is quieter than warn.
        transformers.utils.logging.set_verbosity_error()
        plan = prepare(model_args, data_args, training_args, pruning_args, quantization_args, structured_args,
                       command=command, recipe=recipe)
    except (UsageError, CompressionInputError, ValueError, TypeError, ImportError) as err:
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        _error_line(redact_value(message))  # never a token on the console
        return 2
    from ..architectures import StructuredPruningError
    from ..pruning.self_check import SelfCheckError

    try:
        report = run(plan)
    except SelfCheckError as err:  # the run's own result is wrong: stopped before writing, nothing to fix in the input
        _error_line(redact_value(_one_line(err)))
        return 1
    except (CompressionInputError, StructuredPruningError) as err:  # found while preprocessing or pruning
        _error_line(redact_value(_one_line(err)))
        return 2
    if report is None:  # the non-main ranks of a distributed launch
        return 0
    _print_summary(report, plan.output_dir, time.time() - start)
    failed = verification_failures(report)
    for line in failed:
        print(line)
    return 1 if failed else 0


def _one_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def verification_failures(report: dict) -> list[str]:
    """A `FAILED ...` line for each loader of the loaders check (`report["loaders"]`) that loads the written folder
    but computes something else than the trained model (`status` `mismatch`). A loader that refuses to load
    (`error`) fails loudly for its user and is shown in the card, not here."""
    lines = []
    for name, v in (report.get("loaders") or {}).items():
        if v.get("status") == "mismatch":
            diff = v.get("max_abs_logit_diff")
            what = f"max abs logit diff {diff:.3g} (tolerance {v.get('tolerance', float('nan')):.3g})" if isinstance(
                diff, (int, float)) else (v.get("error") or "different output")
            lines.append(f"FAILED verification: {name} loads the output but computes something else than the trained "
                         f"model: {what}. Do not share this folder.")
    return lines


def _error_line(message: str) -> None:
    """`hf-compress: error: <message>` on stderr in one write: stderr is unbuffered when redirected, so `print`'s two
    writes (text, then newline) from the ranks of a launch could interleave into one line."""
    sys.stderr.write(f"hf-compress: error: {message}\n")
    sys.stderr.flush()


def console_entry() -> None:
    """Entry point of the `hf-compress` console script."""
    sys.exit(main())


if __name__ == "__main__":
    console_entry()
