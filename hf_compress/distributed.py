"""Distributed and interrupted runs: start-up checks, the process group, checkpoint validation, atomic output.

What works where (see the README section "Distributed and interrupted runs"):

- DDP (`torchrun` / `accelerate launch` without FSDP): every rank holds the full model and DDP all-reduces the
  gradients, so the weights are bit-identical on every rank after each optimizer step and magnitude masks
  computed locally (with a stable sort) are identical too (the DDP test proves it by comparing digests across
  ranks, `tests/dist_helpers.py`).
- FSDP2 (`fully_shard`) shards every weight along dim 0 as a DTensor: the pruning callback chooses its masks on
  the all-gathered full weights and keeps its shard of them, fake quantization runs on the weight FSDP gathers
  for each forward (see `hf_compress.fsdp`). [`check_distributed_support`] refuses what is not exact there: FSDP1,
  the Trainer's `use_cpu=True` + `fsdp` (which trains with DDP), QAT through the Trainer, CPU offload with QAT,
  and the end-of-training quantization export.
- DeepSpeed ZeRO-3 shards the parameters too, without DTensors: a magnitude threshold or a row-wise absmax computed
  on a rank's slice is not the one of the full weight. The gradual pruning callback selects on the all-gathered fp32
  master weights and zeroes them through DeepSpeed (`hf_compress.zero3`); QAT and the structured callback are refused
  at start-up.
- A run killed mid-save leaves a `checkpoint-N` folder that transformers' `get_last_checkpoint` still picks;
  [`last_valid_checkpoint`] skips it and [`validate_checkpoint`] names the broken file in one line.
"""

from __future__ import annotations

import json
import os
import re
import struct

# Callbacks that read or rewrite whole weight tensors, and why they cannot run on sharded parameters.
_NEEDS_FULL_WEIGHTS = {
    "GradualPruningCallback": "magnitude thresholds over sharded weights would differ from those of the full weights",
    "QATCallback": "fake quantization needs the row-wise / block-wise absmax of the full weights",
    "QuantizationCallback": "the bitsandbytes export needs the full, unsharded weights",
    # It also refuses itself on the partitioned parameters (`on_train_begin`); listed here to stop before training.
    "StructuredPruningCallback": "its parameters are partitioned outside the forward, so neither weight-magnitude scores "
                                 "nor the final cut see whole weights (FSDP2 `fully_shard` runs it)",
}
# Of those, the ones that gather the partitioned weights under ZeRO-3 themselves (`hf_compress.zero3`): the gradual
# pruning callback selects on the all-gathered fp32 master weights and zeroes master, optimizer states and compute copy.
_ZERO3_WHOLE_WEIGHTS = {"GradualPruningCallback"}
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
_TRUE = ("1", "true", "yes")


def parallel_backend(args=None) -> str:
    """
    The kind of run `args` (a `TrainingArguments`) and the launcher's environment describe.

    Returns:
        `str`: `"fsdp"`, `"deepspeed-zero3"`, `"deepspeed"`, `"ddp"` or `"single"`.
    """
    env = os.environ
    if (args is not None and getattr(args, "fsdp", None)) or env.get("ACCELERATE_USE_FSDP", "").lower() in _TRUE:
        return "fsdp"
    deepspeed = getattr(args, "deepspeed", None) if args is not None else None
    if deepspeed or env.get("ACCELERATE_USE_DEEPSPEED", "").lower() in _TRUE:
        stage = env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
        if stage is None and deepspeed:
            config = deepspeed
            if isinstance(config, str) and os.path.isfile(config):
                with open(config) as f:
                    config = json.load(f)
            stage = (config.get("zero_optimization", {}) or {}).get("stage") if isinstance(config, dict) else None
        return "deepspeed-zero3" if str(stage) == "3" else "deepspeed"
    world_size = getattr(args, "world_size", None) if args is not None else None
    if (world_size or int(env.get("WORLD_SIZE", "1"))) > 1:
        return "ddp"
    return "single"


def check_distributed_support(args=None, callbacks=()) -> str:
    """
    Raise one clear error, before any training, when a callback cannot work under the launcher's parallelism.

    Under DeepSpeed ZeRO-3 each rank holds a slice of every weight, so the structured pruning callback, the
    quantization-aware callback and the end-of-training quantization export are refused there (the gradual pruning
    callback gathers the weights it selects on, `hf_compress.zero3`) (`cache_teacher_logits` with a ZeRO-3
    teacher is refused where the teacher is placed, `prepare_teacher`). Under FSDP, [`check_fsdp_support`] decides (FSDP2 pruning is
    supported). DDP and ZeRO-1/2 keep full weights on every rank and are supported. Any launch whose ranks
    accelerate miscounts (on CPU without `use_cpu=True`) is refused first, by [`check_process_count`].

    Args:
        args (`TrainingArguments`, *optional*): the run's arguments (`fsdp`, `deepspeed`, `world_size`).
        callbacks (iterable of `TrainerCallback` instances or classes): the callbacks of the run.

    Returns:
        `str`: the backend, as [`parallel_backend`].

    Raises:
        `ValueError`: naming the callback, the backend and the fix.
    """
    backend = parallel_backend(args)
    names = {_callback_name(cb) for cb in callbacks or ()} - {None}
    check_process_count(args, backend)
    if backend == "fsdp":
        check_fsdp_support(args, names)
        return backend
    if backend != "deepspeed-zero3":
        return backend
    for cb in callbacks or ():
        cls = cb if isinstance(cb, type) else type(cb)
        name = next((c.__name__ for c in cls.__mro__ if c.__name__ in _NEEDS_FULL_WEIGHTS), None)
        if name is not None and name not in _ZERO3_WHOLE_WEIGHTS:
            raise ValueError(
                f"`{name}` cannot run under {backend.upper() if backend == 'fsdp' else 'DeepSpeed ZeRO-3'}: "
                f"{_NEEDS_FULL_WEIGHTS[name]}; train with DDP (`torchrun` or `accelerate launch` without FSDP / "
                "ZeRO-3), or compress the saved model after training."
            )
    return backend


def check_process_count(args=None, backend: str | None = None) -> None:
    """
    Raise one line when a launcher started `WORLD_SIZE` ranks that accelerate does not train as one distributed run.

    On a machine without a GPU, `TrainingArguments(use_cpu=False)` under `torchrun` / `accelerate launch` makes
    accelerate set up no distributed training: without `ddp_backend` it finds no backend and counts 1 process on every
    rank (`PartialState._prepare_backend` returns `backend=None`); with `ddp_backend="gloo"` it counts them all but
    keeps `DistributedType.NO`, so the Trainer's `parallel_mode` is `not_parallel` and no gradient is all-reduced.
    Either way each rank trains on its own as if alone and writes the same files (measured: DeepSpeed ranks logged
    the same losses over twice the steps; `accelerate launch` with an FSDP2 config ran two unsynchronised runs into one
    output folder). With `use_cpu=True` accelerate opens a gloo group of `WORLD_SIZE` (DDP; DeepSpeed on its CPU
    accelerator, tests/test_deepspeed.py). FSDP needs GPUs.
    """
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    counted = getattr(args, "world_size", None) if args is not None else None
    mode = getattr(getattr(args, "parallel_mode", None), "value", None) if args is not None else None
    unsynchronised = launched > 1 and mode in ("not_parallel", "not_distributed")
    if not unsynchronised and (counted is None or counted >= launched):
        return
    backend = backend or parallel_backend(args)
    what = {"fsdp": "FSDP", "deepspeed": "DeepSpeed", "deepspeed-zero3": "DeepSpeed"}.get(backend)
    fix = ("FSDP shards on GPUs only: launch on GPUs, or drop the FSDP config and set `use_cpu=True` (`--use_cpu`) to "
           "train with DDP over gloo" if backend == "fsdp" else
           "set `use_cpu=True` (`--use_cpu`; " + ("DeepSpeed's CPU accelerator, gloo" if what == "DeepSpeed" else
                                                  "DDP over gloo") + ") or launch on GPUs")
    found = f"counts {counted} process(es)" + (f" in parallel mode `{mode}`" if mode else "")
    subject = f"{what}: the launcher" if what else "The launcher"
    raise ValueError(
        f"{subject} started WORLD_SIZE={launched} ranks but accelerate {found}: without a GPU and without "
        f"`use_cpu=True` it sets up no distributed training, so every rank would train alone, unsynchronised, and "
        f"write the same files; {fix}."
    )


def _callback_name(cb) -> str | None:
    cls = cb if isinstance(cb, type) else type(cb)
    return next((c.__name__ for c in cls.__mro__ if c.__name__ in _NEEDS_FULL_WEIGHTS), None)


def fsdp_settings(args=None) -> dict:
    """
    `{"version": int, "cpu_offload": bool}` of an FSDP run: from `args.fsdp_config` (transformers normalises
    `fsdp_version` to `version`; 2 when absent, transformers' default) or accelerate's `FSDP_VERSION` /
    `FSDP_OFFLOAD_PARAMS` environment variables.
    """
    config = dict(getattr(args, "fsdp_config", None) or {}) if args is not None else {}
    env = os.environ
    version = config.get("version", config.get("fsdp_version", env.get("FSDP_VERSION", 2)))
    offload = config.get("cpu_offload", config.get("offload_params", env.get("FSDP_OFFLOAD_PARAMS", False)))
    fsdp = getattr(args, "fsdp", None) if args is not None else None
    if isinstance(fsdp, (list, tuple, str)) and "offload" in " ".join(str(getattr(o, "value", o)) for o in (
            fsdp if isinstance(fsdp, (list, tuple)) else [fsdp])):
        offload = True
    return {"version": int(version), "cpu_offload": str(offload).lower() in _TRUE}


def check_fsdp_support(args=None, callbacks=()) -> None:
    """
    Under FSDP, raise one line (naming the fix) for what is not exact: FSDP1, the Trainer's `use_cpu=True` with
    `fsdp` (transformers then trains with DDP, silently), QAT through the Trainer (its fake quantizers would be
    attached after `fully_shard`), QAT with CPU offload, and the end-of-training quantization export. Gradual
    pruning is allowed: it selects on the gathered full weights (see `hf_compress.fsdp`).

    Args:
        args (`TrainingArguments`, *optional*): the run's arguments.
        callbacks (iterable of `str`): the callback names (`"GradualPruningCallback"`, `"QATCallback"`, ...).
    """
    settings = fsdp_settings(args)
    if settings["version"] != 2:
        raise ValueError(
            f"FSDP{settings['version']} (`fsdp_config['version'] = {settings['version']}`) is not supported: its "
            "flat parameters hide the weights' shapes from masks and quantizers; set `fsdp_config={'version': 2}` "
            "(FSDP2, `fully_shard`) or train with DDP."
        )
    if args is not None and getattr(args, "use_cpu", False):
        raise ValueError(
            "`use_cpu=True` with `fsdp` trains with DDP, not FSDP (transformers' Trainer falls back silently); drop "
            "`fsdp` to train with DDP on CPU, run FSDP2 on GPUs, or shard with `torch.distributed.fsdp.fully_shard` "
            "in your own loop (see tests/fsdp2_worker.py)."
        )
    names = set(callbacks)
    if "QATCallback" in names and settings["cpu_offload"]:
        raise ValueError(
            "`QATCallback` with FSDP `cpu_offload` is not supported (not verified exact); drop `cpu_offload` from "
            "`fsdp_config`, or train with DDP."
        )
    if "QATCallback" in names:
        raise ValueError(
            "`QATCallback` cannot run under the Trainer's FSDP: it attaches its fake quantizers after the model is "
            "sharded; call `attach_fake_quant(model, ...)` before `fully_shard` in your own loop, or train with DDP."
        )
    if "QuantizationCallback" in names:
        raise ValueError(
            f"`QuantizationCallback` cannot run under FSDP: {_NEEDS_FULL_WEIGHTS['QuantizationCallback']}; save the "
            "model (`hf_compress.fsdp.save_full_state_dict`) and quantize the saved model after training."
        )


# ---- the process group ---------------------------------------------------------------------------------------


def initialized_dist():
    """`torch.distributed` when a process group is initialized (under a launcher), else `None`."""
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


# ---- checkpoints --------------------------------------------------------------------------------------------


def _safetensors_problem(path: str) -> str | None:
    """Why a safetensors file is unreadable (truncated, bad header), or None when its header covers the file."""
    size = os.path.getsize(path)
    if size < 8:
        return f"{size} bytes, shorter than the 8-byte header length"
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > size - 8:
            return f"header of {n} bytes but the file has {size} bytes"
        try:
            header = json.loads(f.read(n))
        except ValueError:
            return "header is not valid JSON"
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end != size:
        return f"{size} bytes on disk, header says {8 + n + end}"
    return None


def check_safetensors_file(path: str) -> None:
    """
    Raise one clear line when the safetensors file at `path` is missing, truncated or has a corrupt header (the
    library's own error names neither the file nor the fix). Reads only the header: cheap before any load.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist; save the model there first (or check the path).")
    problem = _safetensors_problem(path)
    if problem:
        raise ValueError(f"{path} is truncated or corrupt ({problem}); save it again or use an earlier copy.")


def validate_checkpoint(path: str, required: tuple[str, ...] = ("trainer_state.json",)) -> None:
    """
    Check a `checkpoint-N` folder before resuming from it: it exists, holds `required` files, model weights,
    and every `*.safetensors` file in it is complete.

    Raises:
        `ValueError`: one line naming the folder or file, what is wrong, and the fix.
    """
    if not os.path.isdir(path):
        raise ValueError(f"Checkpoint {path} does not exist; pass an existing `checkpoint-N` folder or `True` for the last one.")
    for name in required:
        if not os.path.isfile(os.path.join(path, name)):
            raise ValueError(f"Checkpoint {path} has no {name} (an interrupted save?); resume from an earlier checkpoint.")
    files = sorted(os.listdir(path))
    weights = [f for f in files if f.endswith(".safetensors") or f in ("pytorch_model.bin", "model.safetensors.index.json")]
    if not any(f.startswith(("model", "pytorch_model", "adapter_model")) for f in weights):
        raise ValueError(f"Checkpoint {path} has no model weights (model.safetensors); resume from an earlier checkpoint.")
    for name in files:
        if name.endswith(".safetensors"):
            problem = _safetensors_problem(os.path.join(path, name))
            if problem:
                raise ValueError(
                    f"Checkpoint file {os.path.join(path, name)} is truncated or corrupt ({problem}); "
                    "delete that checkpoint folder and resume from an earlier one."
                )
        elif name.endswith(".json"):
            try:
                with open(os.path.join(path, name)) as f:
                    json.load(f)
            except ValueError as err:
                raise ValueError(
                    f"Checkpoint file {os.path.join(path, name)} is not valid JSON ({err}); "
                    "delete that checkpoint folder and resume from an earlier one."
                ) from None


def last_valid_checkpoint(output_dir: str) -> str | None:
    """
    The newest `checkpoint-N` folder of `output_dir` that passes [`validate_checkpoint`], or None.

    transformers' `get_last_checkpoint` takes the highest N even when a kill interrupted that save; pass this
    function's result to `trainer.train(resume_from_checkpoint=...)` instead.
    """
    if not os.path.isdir(output_dir):
        return None
    found = sorted(
        ((int(m.group(1)), d) for d in os.listdir(output_dir) if (m := _CHECKPOINT_RE.match(d))), reverse=True
    )
    for _, name in found:
        path = os.path.join(output_dir, name)
        try:
            validate_checkpoint(path)
        except ValueError:
            continue
        return path
    return None


# The atomic folder writer lives in `atomic.py` (one home for every writer); re-exported for older imports.
from .atomic import atomic_output_dir  # noqa: E402

__all__ = [
    "atomic_output_dir",
    "check_process_count",
    "check_distributed_support",
    "check_fsdp_support",
    "check_safetensors_file",
    "fsdp_settings",
    "last_valid_checkpoint",
    "parallel_backend",
    "validate_checkpoint",
]
