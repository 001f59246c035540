"""`hf-compress cache-teacher`: run a teacher once over a dataset and push its top-k logits to the Hub.

    hf-compress cache-teacher --teacher <id or path> --dataset <data> --hub_repo user/name
                              [--top_k 64] [--temperature 1.0] [--teacher_revision ...] [--batch_size 32]
                              [hf-compress's data options: --text_column, --max_length, --max_train_samples, --seed]

`--dataset` is either a tokenized training set (it has `input_ids`: used as it is, for `DistillationTrainer`) or
data as `hf-compress --dataset` reads it (a shipped set, a csv/jsonl/txt file, a folder, a Hub id): then the cache
covers exactly the tokenized rows `hf-compress` trains on with the same data options and `--seed`
([`~hf_compress.pipeline.plan.training_examples`]), so `hf-compress --teacher_logits user/name` distils from it.
The pushed dataset repo is read by `DistillationTrainer(teacher_logits="user/name")` with no teacher loaded
([`~hf_compress.distillation.hub_cache`]).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field


@dataclass
class CacheTeacherArguments:
    r"""
    Options of `hf-compress cache-teacher`.

    Parameters:
        teacher (`str`): Hub id or directory of the teacher.
        hub_repo (`str`): the dataset repo to push to, `namespace/name`.
        split (`str`, *optional*, defaults to `"train"`): the split of a tokenized `--dataset` (data that is not
            tokenized gives the rows `hf-compress` trains on, from its `train` split).
        seed (`int`, *optional*, defaults to `42`): `hf-compress`'s `--seed` (its default), which seeds the held-out
            10% carved from `train` when there is no test split and the `--max_train_samples` subset.
        top_k (`int`, *optional*, defaults to `64`): classes kept per position; `0` stores full logits.
        temperature (`float`, *optional*, defaults to `1.0`): the training run's distillation temperature.
        teacher_revision (`str`, *optional*): revision of the teacher to load and record.
        tokenizer (`str`, *optional*): the tokenizer; defaults to the teacher's.
        task (`str`, *optional*, defaults to `"auto"`): inferred from the teacher's saved architecture.
        batch_size (`int`, *optional*, defaults to `32`): teacher batch size.
        dtype (`str`, *optional*, defaults to `"float32"`): stored dtype of full logits.
        teacher_dtype (`str`, *optional*): cast the teacher to `float32`, `bfloat16` or `float16`.
        device (`str`, *optional*): where the teacher runs; default `cuda` when available, else `cpu`.
        private (`bool`, *optional*, defaults to `False`): create the repo private.
        local_dir (`str`, *optional*): keep the pushed folder there.
    """

    teacher: str | None = field(default=None, metadata={"help": "Teacher Hub id or directory."})
    hub_repo: str | None = field(default=None, metadata={"help": "Dataset repo to push to, namespace/name."})
    split: str = field(default="train", metadata={"help": "Split of the dataset."})
    top_k: int = field(default=64, metadata={"help": "Classes kept per position (0: full logits)."})
    temperature: float = field(default=1.0, metadata={"help": "Distillation temperature of the training run (> 0)."})
    teacher_revision: str | None = field(default=None, metadata={"help": "Teacher revision to load and record."})
    tokenizer: str | None = field(default=None, metadata={"help": "Tokenizer (default: the teacher's)."})
    task: str = field(default="auto", metadata={"help": "Distillation task (default: from the teacher's architecture)."})
    batch_size: int = field(default=32, metadata={"help": "Teacher batch size."})
    dtype: str = field(default="float32", metadata={"help": "Stored dtype of full logits: float32, float16 or bfloat16."})
    teacher_dtype: str | None = field(default=None, metadata={"help": "Teacher dtype: float32, bfloat16 or float16."})
    device: str | None = field(default=None, metadata={"help": "Teacher device (default: cuda if available, else cpu)."})
    private: bool = field(default=False, metadata={"help": "Create the dataset repo private."})
    local_dir: str | None = field(default=None, metadata={"help": "Keep the pushed folder there."})
    seed: int = field(default=42, metadata={"help": "hf-compress's --seed (data not tokenized: the held-out carve and subset)."})


def _fail(message: str) -> int:
    print(f"hf-compress cache-teacher: error: {message}", file=sys.stderr)
    return 2


def main(argv: list[str]) -> int:
    """Run `hf-compress cache-teacher` with `argv`; returns the exit code (2 for bad input, 1 for a failed push)."""
    from transformers import HfArgumentParser

    from ..distillation import hub_cache

    class _Usage(Exception):
        pass

    from ..pipeline.arguments import DataArguments
    from ..tasks import CompressionInputError

    parser = HfArgumentParser((CacheTeacherArguments, DataArguments), prog="hf-compress cache-teacher",
                              description="Compute the top-k teacher logits of a dataset and push them as a Hub dataset repo.")

    def error(message):  # one line instead of argparse's usage + exit
        raise _Usage(message)

    parser.error = error
    try:
        a, data_args = parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False)
        for name in ("teacher", "hub_repo"):
            if not getattr(a, name):
                raise _Usage(f"--{name} is required, e.g. `hf-compress cache-teacher --teacher T --dataset D --hub_repo me/teacher-logits`.")
        top_k = None if a.top_k == 0 else a.top_k
        if a.top_k < 0:
            raise _Usage(f"--top_k must be >= 1 (or 0 for full logits), got {a.top_k}.")
        hub_cache.check_push_inputs(a.hub_repo, top_k, a.temperature, a.dtype, "causal-lm" if a.task == "auto" else a.task,
                                    batch_size=a.batch_size)
        if a.teacher_dtype is not None and a.teacher_dtype not in ("float32", "bfloat16", "float16"):
            raise _Usage(f"--teacher_dtype must be float32, bfloat16 or float16, got {a.teacher_dtype!r}.")
        dataset = _load_split(data_args.dataset, a.split)
        # Read once from the teacher's config, before its weights: the rows, the key and the logits use one task.
        task, architecture = _resolve_teacher(a)
        tokenizer = _load_tokenizer(a)
        if "input_ids" not in dataset.column_names:  # data as hf-compress reads it: the rows it trains on
            if a.split != "train":
                raise _Usage(f"--split {a.split} applies to a tokenized --dataset; hf-compress trains on the `train` "
                             "split of this one (hold rows out with `--eval_split` there), so drop --split.")
            from ..pipeline.plan import training_examples

            dataset = training_examples(data_args, task, tokenizer, a.seed)
        teacher = _load_teacher(a, architecture)
        hub_cache.check_push_inputs(a.hub_repo, top_k, a.temperature, a.dtype, task, dataset, tokenizer, a.batch_size)
    except (_Usage, CompressionInputError, ValueError, TypeError, OSError, ImportError) as err:
        return _fail(str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__)
    from ..hub import HubPushError

    try:
        result, key = hub_cache.push_teacher_cache(
            teacher, dataset, a.hub_repo, tokenizer, task, top_k, a.temperature, a.dtype, a.batch_size,
            teacher_id=a.teacher, teacher_revision=a.teacher_revision, private=a.private, local_dir=a.local_dir,
        )
    except HubPushError as err:
        print(f"hf-compress cache-teacher: {err}", file=sys.stderr)
        return 1
    what = f"top-{top_k}" if top_k else "full"
    print(f"Pushed the {what} logits of {a.teacher} on {key['num_rows']} rows to {result.repo_id} at commit "
          f"{result.commit_oid}: {result.commit_url}")
    return 0


def _load_split(name: str, split: str):
    import datasets

    from ..pipeline.data import load_dataset_any
    from ..tasks import CompressionInputError

    try:
        dsd = load_dataset_any(name)
    except CompressionInputError as err:
        raise ValueError(f"--dataset: {err}") from None
    if isinstance(dsd, datasets.Dataset):
        return dsd
    if split not in dsd:
        raise ValueError(f"--dataset {name!r} has no split {split!r} (splits: {', '.join(dsd)}); fix `--split`.")
    return dsd[split]


def _resolve_teacher(a: CacheTeacherArguments) -> tuple[str, str | None]:
    """`(task, class name)` of the teacher: `--task` and `None` (the task's auto class loads it), or the class its
    config names and that class's task, read once and without its weights."""
    import transformers
    from transformers import AutoConfig

    from ..tasks import task_of_class

    if a.task != "auto":
        return a.task, None
    revision = {"revision": a.teacher_revision} if a.teacher_revision else {}
    arch = (AutoConfig.from_pretrained(a.teacher, **revision).architectures or [None])[0]
    if arch is None or not hasattr(transformers, arch):
        raise ValueError(f"--teacher {a.teacher!r} names no known architecture in its config; pass `--task`.")
    found = task_of_class(arch)
    if found is None:
        raise ValueError(f"--teacher {a.teacher!r} names no task in its config's architecture ({arch}); pass `--task`.")
    return found.name, arch


def _load_tokenizer(a: CacheTeacherArguments):
    from transformers import AutoTokenizer

    revision = {"revision": a.teacher_revision} if a.teacher_revision and not a.tokenizer else {}
    return AutoTokenizer.from_pretrained(a.tokenizer or a.teacher, **revision)


def _load_teacher(a: CacheTeacherArguments, architecture: str | None):
    """The teacher as the class its config names (`architecture`, from [`_resolve_teacher`]) or `--task`'s."""
    import torch
    import transformers

    from ..distillation.teacher import load_teacher
    from ..tasks import get_task

    revision = {"revision": a.teacher_revision} if a.teacher_revision else {}
    kwargs = dict(revision, **({"dtype": getattr(torch, a.teacher_dtype)} if a.teacher_dtype else {}))
    if architecture is not None:  # the class the teacher was saved as
        teacher = getattr(transformers, architecture).from_pretrained(a.teacher, **kwargs)
    elif revision:
        teacher = getattr(transformers, get_task(a.task).auto_class).from_pretrained(a.teacher, **kwargs)
    else:
        teacher = load_teacher(a.teacher, a.task, a.teacher_dtype)
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return teacher.to(device).eval()

