"""One training run of a tiny BERT student distilled from a tiny teacher with gradual pruning, for the DDP and
kill-and-resume tests. Run alone (`python tests/ddp_worker.py ...`) or under
`python -m torch.distributed.run --nproc_per_node=2 tests/ddp_worker.py ...` (gloo, CPU).

Each rank writes into `--dump-dir`:
- `rank<r>.safetensors`: the final weights, plus the pruning masks as they were at the end of training
  (`mask::<param>`, uint8) before the callback made them permanent;
- `rank<r>.json`: world size, global step, log history, sparsity counts, the mask digest, and every file this
  rank created or wrote under `--output-dir` (recorded by an audit hook and wrappers installed before
  transformers is imported, so that the test can prove that only the main process writes).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
WRITES: list[str] = []
_WATCH: list[str] = []


def _note(path) -> None:
    try:
        path = os.path.abspath(os.fsdecode(path))
    except TypeError:
        return
    if any(path == w or path.startswith(w + os.sep) for w in _WATCH):
        WRITES.append(path)


def _audit(event, args):
    if event == "open":
        path, mode, flags = args
        if isinstance(path, int):
            return
        if (mode is not None and any(c in mode for c in "wax+")) or (
            mode is None and isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
        ):
            _note(path)
    elif event == "os.rename":
        _note(args[1])


def install_write_audit(output_dir: str) -> None:
    """Record every file written under `output_dir`: Python `open`/`os.replace` through an audit hook, and the
    writers implemented in native code (safetensors, torch.save) through wrappers installed before any library
    binds them."""
    _WATCH.append(os.path.abspath(output_dir))
    sys.addaudithook(_audit)
    import safetensors.torch
    import torch

    def wrap(fn, path_arg):
        def wrapper(*args, **kwargs):
            target = kwargs.get(path_arg, args[1] if len(args) > 1 else None)
            if isinstance(target, (str, os.PathLike)):
                _note(target)
            return fn(*args, **kwargs)

        return wrapper

    safetensors.torch.save_file = wrap(safetensors.torch.save_file, "filename")
    torch.save = wrap(torch.save, "f")


def parse(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--output-dir", required=True)
    p.add_argument("--dump-dir", required=True)
    p.add_argument("--max-steps", type=int, default=8)
    p.add_argument("--save-steps", type=int, default=8)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--target-sparsity", type=float, default=0.5)
    p.add_argument("--end-step", type=int, default=6)
    p.add_argument("--frequency", type=int, default=2)
    p.add_argument("--kill-at-step", type=int, default=None, help="SIGKILL this process at the end of that step")
    p.add_argument("--resume", action="store_true", help="resume from hf_compress.distributed.last_valid_checkpoint")
    p.add_argument("--final-dir", default=None, help="save the final model and its card there (main process)")
    p.add_argument("--cache-dir", default=None, help="cache the teacher's logits there (computed once, by rank 0)")
    p.add_argument("--quantize-dir", default=None, help="add QuantizationCallback (8-bit) exporting there")
    return p.parse_args(argv)


def main(argv=None) -> int:
    opts = parse(argv)
    install_write_audit(opts.output_dir)
    for extra in (opts.final_dir, opts.quantize_dir, opts.cache_dir):
        if extra:
            _WATCH.append(os.path.abspath(extra))

    import torch
    from transformers import BertForSequenceClassification, TrainerCallback

    sys.path.insert(0, HERE)
    from conftest import random_classification_dataset, tiny_bert_config

    from hf_compress.callbacks import GradualPruningCallback
    from hf_compress.distillation import DistillationArguments
    from dist_helpers import broadcast_masks, check_same_across_ranks, tensors_digest

    from hf_compress.distributed import check_distributed_support, last_valid_checkpoint
    from hf_compress.pruning import get_masks, sparsity_stats
    from hf_compress.trainers import DistillationTrainer

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    os.makedirs(opts.dump_dir, exist_ok=True)

    torch.manual_seed(0)
    student = BertForSequenceClassification(tiny_bert_config())
    torch.manual_seed(1)
    teacher = BertForSequenceClassification(tiny_bert_config(num_hidden_layers=3))
    data = random_classification_dataset(n=128)

    computed: list[int] = []  # calls of the teacher-cache computation in this process
    if opts.cache_dir:
        import hf_compress.distillation.cache as cache_module

        compute = cache_module.compute_teacher_cache

        def counted(*a, **k):
            computed.append(rank)
            return compute(*a, **k)

        cache_module.compute_teacher_cache = counted
    args = DistillationArguments(
        cache_teacher_logits=bool(opts.cache_dir), teacher_cache_dir=opts.cache_dir,
        output_dir=opts.output_dir, use_cpu=True, ddp_backend="gloo" if world_size > 1 else None,
        per_device_train_batch_size=opts.batch_size, gradient_accumulation_steps=opts.grad_accum,
        max_steps=opts.max_steps, learning_rate=5e-3, warmup_steps=0, weight_decay=0.01,
        save_strategy="steps", save_steps=opts.save_steps, logging_steps=1, report_to="none", seed=0,
        disable_tqdm=True, dataloader_num_workers=0, temperature=2.0, alpha=0.5,
    )
    dumped: dict = {}

    class Dump(TrainerCallback):
        """Records the masks at the end of training, before the pruning callback makes them permanent."""

        def on_train_end(self, args, state, control, model=None, **kwargs):
            masks = {k: v.clone() for k, v in get_masks(model).items()}
            dumped["masks"] = masks
            dumped["mask_digest"] = check_same_across_ranks(masks)  # raises if the ranks disagree
            if world_size > 1:  # `broadcast_masks` repairs a rank whose masks drifted
                live = get_masks(model)
                first = sorted(live)[0]
                if rank == 1:
                    live[first].view(-1)[0] = ~live[first].view(-1)[0]
                dumped["broadcast_count"] = broadcast_masks(model)
                dumped["broadcast_restored"] = tensors_digest(get_masks(model)) == dumped["mask_digest"]

    class KillAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == opts.kill_at_step:
                os.kill(os.getpid(), signal.SIGKILL)

    pruning = GradualPruningCallback(
        target_sparsity=opts.target_sparsity, start_step=0, end_step=opts.end_step, frequency=opts.frequency,
        log_per_layer=False,
    )
    callbacks = [Dump(), pruning] + ([KillAt()] if opts.kill_at_step else [])
    if opts.quantize_dir:  # after the pruning callback: it exports the pruned weights, masks made permanent
        from hf_compress.callbacks import QuantizationCallback
        from hf_compress.quantization import QuantizationArguments

        callbacks.append(QuantizationCallback(QuantizationArguments(bits=8), output_dir=opts.quantize_dir))
    check_distributed_support(args, callbacks)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data, callbacks=callbacks)
    resume = last_valid_checkpoint(opts.output_dir) if opts.resume else None
    if opts.resume and resume is None:
        raise SystemExit(f"no valid checkpoint in {opts.output_dir}")
    trainer.train(resume_from_checkpoint=resume)

    if opts.final_dir:
        trainer.save_model(opts.final_dir)  # writes on the main process only (Trainer.args.should_save)
        if trainer.is_world_process_zero():  # the report and card: once, by the main process
            from hf_compress.model_cards import build_report, write_model_card

            report = build_report(student, opts.final_dir, techniques=["distillation", "pruning"], verification_examples=0)
            recipe = {"target_sparsity": opts.target_sparsity, "pruning_end_step": opts.end_step,
                      "pruning_frequency": opts.frequency, "temperature": 2.0, "alpha": 0.5}
            write_model_card(opts.final_dir, recipe, "torchrun --nproc_per_node=2 tests/ddp_worker.py", report=report,
                             model_name="tiny-bert-pruned")

    from safetensors.torch import save_file

    state = {k: v.detach().clone().contiguous() for k, v in student.state_dict().items()}
    state.update({f"mask::{k}": v.to(torch.uint8).contiguous() for k, v in dumped["masks"].items()})
    save_file(state, os.path.join(opts.dump_dir, f"rank{rank}.safetensors"))
    stats = sparsity_stats(student, list(dumped["masks"]))
    info = {
        "world_size": world_size, "rank": rank, "global_step": trainer.state.global_step, "resumed_from": resume,
        "log_history": trainer.state.log_history, "zeros": stats["zeros"], "total": stats["total"],
        "sparsity": stats["sparsity"], "mask_digest": dumped["mask_digest"],
        "broadcast_count": dumped.get("broadcast_count"), "broadcast_restored": dumped.get("broadcast_restored"), "writes": sorted(set(WRITES)),
        "cache_computations": len(computed),
    }
    with open(os.path.join(opts.dump_dir, f"rank{rank}.json"), "w") as f:
        json.dump(info, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
