"""Shared pieces of the benchmarks: the real model and data, a step timer, and the resident-memory probes."""

from __future__ import annotations

import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from transformers import TrainerCallback  # noqa: E402

MAX_LENGTH = 48
# The full run's files are the published ones (committed, shown in the README); quick runs write beside them.
OUTPUT_DIRS = {"full": "benchmarks/results", "quick": "benchmarks/results-quick"}


# glibc returns every freed block above this many bytes to the system at once, so a process run with
# `live_tensor_env` has a high-water mark that is the peak of its live tensors (with glibc's default, freed tensors of up
# to 32 MB stay in the heap and the mark moved by +-40 MB from run to run).
MMAP_THRESHOLD = 131072


def live_tensor_env(env: dict) -> dict:
    """`env` with `MALLOC_MMAP_THRESHOLD_` set to [`MMAP_THRESHOLD`], for a child process whose peak memory is read."""
    return dict(env, MALLOC_MMAP_THRESHOLD_=str(MMAP_THRESHOLD))


def proc_status_mb(field: str) -> float:
    """A `/proc/self/status` memory field (`VmRSS`, `VmHWM`, ...) in MB."""
    with open("/proc/self/status") as f:
        return int(next(x for x in f if x.startswith(field + ":")).split()[1]) / 1024


def reset_peak_rss() -> None:
    """Reset this process's high-water mark (`VmHWM`) to its current resident size (Linux `clear_refs`)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


class StepTimer(TrainerCallback):
    """Wall time of each optimizer step (forward, backward, optimizer and every other callback)."""

    def __init__(self):
        self.times: list[float] = []
        self._t0 = None

    def on_step_begin(self, args, state, control, **kwargs):
        self._t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self._t0)

    def median(self, skip: int = 2) -> float:
        return statistics.median(self.times[skip:] if len(self.times) > skip + 2 else self.times)


def real_data(max_train: int | None = None, max_eval: int | None = None):
    """(tokenizer, tokenized Rotten Tomatoes DatasetDict) for the real MiniLM-L6."""
    from transformers import AutoTokenizer

    from hf_compress.data import load_rotten_tomatoes
    from hf_compress.models import default_model_path, tokenize_text_classification

    tok = AutoTokenizer.from_pretrained(default_model_path())
    ds = load_rotten_tomatoes(max_train=max_train, max_eval=max_eval)
    return tok, tokenize_text_classification(ds, tok, max_length=MAX_LENGTH)


def print_table(rows: list[dict], columns: list[str]) -> str:
    """A Markdown table of `rows` (also printed)."""
    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    text = "\n".join(lines)
    print(text)
    return text


def print_ratios(times: dict[str, float], reference: str = "plain") -> None:
    """Print each run's median step time and its ratio to the `reference` run."""
    print_table(
        [{"run": k, "median step (s)": v, f"ratio to {reference}": v / times[reference]} for k, v in times.items()],
        ["run", "median step (s)", f"ratio to {reference}"],
    )


def steps_main(run, doc: str, default_steps: int, argv=None) -> int:
    """The command line of an overhead benchmark: `--steps N`, then the result as JSON."""
    import argparse
    import json

    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--steps", type=int, default=default_steps)
    args = parser.parse_args(argv)
    print(json.dumps(run(args.steps), indent=2))
    return 0


def weight_bytes(folder: str) -> int:
    """On-disk bytes of the weight files (`*.safetensors`) of a checkpoint folder."""
    return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder) if f.endswith(".safetensors"))


def write_text(path: str, text: str) -> None:
    """Write `text` to a temporary name beside `path` and rename it into place: a killed run leaves the previous
    file whole."""
    from hf_compress.atomic import write_text as _write

    _write(path, text)


def write_results(output_dir: str, name: str, result: dict, text: str) -> None:
    """`<name>.json` (the whole result) and `<name>.md` (`text`: settings line, table, summary) in `output_dir`,
    each written atomically (`write_text`)."""
    import json

    write_text(os.path.join(output_dir, f"{name}.json"), json.dumps(result, indent=2))
    write_text(os.path.join(output_dir, f"{name}.md"), text)


def scratch_dir(name: str) -> str:
    """A fresh temporary folder for a benchmark's Trainer output (nothing is kept)."""
    import tempfile

    return tempfile.mkdtemp(prefix=f"hf_compress_bench_{name}_")
