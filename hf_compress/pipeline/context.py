"""What one run carries from stage to stage: the plan it executes (never changed) and everything the run derives
from it (tokenized splits, model, base, callbacks, checkpoint, records), in a [`RunContext`] that [`open_run`] sets
up and cleans up.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

from .plan import CompressionPlan


@dataclass
class RunContext:
    """
    The state of one run of a [`CompressionPlan`]. Each stage of [`~hf_compress.pipeline.runner.run`] reads what the
    earlier ones left here and returns its own record, which [`RunContext.record`] files under the stage's name in
    `stages` (the report's `pipeline.stages`, in the order the stages ran).
    """

    plan: CompressionPlan
    work: str  # the run's scratch folder beside `output_dir`, shared by every rank and deleted at the end
    main: bool  # the main process: only it evaluates, exports, writes and pushes
    log: Callable[[str], None]
    started: float
    tokenizer: object = None
    train_dataset: object = None  # tokenized
    eval_dataset: object = None  # tokenized (the plan's `eval_dataset` holds the raw rows)
    collator: object = None
    model: object = None  # the model being compressed, in memory
    gptq: dict | None = None  # `--quant_method gptq`: {module: GPTQResult}, what the export stores
    steps: int = 0  # optimizer steps of the compression training
    base_steps: int = 0  # optimizer steps of the dense base fine-tune
    base: object = None  # a frozen copy of the dense base: the reference of every figure (and the `base` teacher)
    base_dir: str = ""
    base_metrics: dict | None = None
    callbacks: list = field(default_factory=list)
    self_check_batch: dict | None = None  # the batch the unstructured pruning self-check ran on
    checkpoint: str = ""  # the written folder, still in `work`
    result: object = None  # the written folder, loaded back as a user loads it
    report: dict | None = None
    stages: dict = field(default_factory=dict)

    def record(self, name: str, record: dict | None) -> None:
        """File a stage's record under `name`; a stage that did not run returns `None` and leaves no record."""
        if record is not None:
            self.stages[name] = record


@contextmanager
def open_run(plan: CompressionPlan):
    """
    Seed, create the shared scratch folder and keep transformers' per-file progress bars off (one bar per stage);
    yields the [`RunContext`]. On the way out the bars are restored and the main process deletes the scratch folder,
    whatever happened.
    """
    import transformers

    started = time.time()
    ta = plan.training_args
    transformers.set_seed(ta.seed)  # the launcher was checked by `prepare` (`check_launch`), before any data was read
    main = ta.process_index == 0  # initialises the process group under a launcher
    parent = os.path.dirname(plan.output_dir)
    os.makedirs(parent, exist_ok=True)
    work = shared_work_dir(parent, ta)
    # One bar per stage: transformers' own per-file bars (loading / writing shards) would add a dozen more.
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()
    try:
        yield RunContext(plan=plan, work=work, main=main, log=log if main else _quiet, started=started)
    finally:
        if bars:
            transformers.utils.logging.enable_progress_bar()
        if main:
            shutil.rmtree(work, ignore_errors=True)


def log(msg: str) -> None:
    """One `[hf-compress]` console line, written above any open progress bar rather than through it."""
    from tqdm.auto import tqdm

    tqdm.write(f"[hf-compress] {msg}")


def _quiet(msg: str) -> None:  # the other ranks of a distributed launch print nothing
    pass


def training_steps(training_args, n_rows: int) -> int:
    """Optimizer steps of a training run: `max_steps`, else epochs over `n_rows` at the global batch size (every
    process of a distributed launch takes its own per-device batch)."""
    if training_args.max_steps and training_args.max_steps > 0:
        return training_args.max_steps
    per_step = training_args.per_device_train_batch_size * max(1, training_args.gradient_accumulation_steps)
    per_step *= max(1, getattr(training_args, "world_size", 1))
    return max(1, math.ceil(n_rows / per_step) * math.ceil(training_args.num_train_epochs))


def shared_work_dir(parent: str, training_args) -> str:
    """A `.hf-compress-*` folder beside the output, created by the main process and shared by every rank."""
    from ..distributed import initialized_dist

    name = [tempfile.mkdtemp(prefix=".hf-compress-", dir=parent) if training_args.process_index == 0 else None]
    dist = initialized_dist()
    if dist is not None and training_args.world_size > 1:
        dist.broadcast_object_list(name, src=0)
    return name[0]


def barrier() -> None:
    """Wait for every rank of a distributed launch (a no-op in a single process)."""
    from ..distributed import initialized_dist

    dist = initialized_dist()
    if dist is not None:
        dist.barrier()
