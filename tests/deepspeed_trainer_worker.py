"""`DistillationTrainer` under DeepSpeed ZeRO-3 through the `Trainer` (DeepSpeed's CPU accelerator, gloo, 2 ranks), for
tests/test_deepspeed.py.

`python -m torch.distributed.run --standalone --nproc_per_node=2 tests/deepspeed_trainer_worker.py --dump-dir D`.
A tiny Llama student is distilled from a tiny Llama teacher (random norm weights and biases) with
`DistillationArguments(deepspeed=<ZeRO-3 dict>, use_cpu=True)`: the Trainer wraps the student in a stage-3
`DeepSpeedEngine` and `prepare_teacher` shards the teacher with TRL's `prepare_deepspeed`. Why `use_cpu=True`: without
it accelerate finds no GPU backend (`PartialState._prepare_backend` returns `backend=None` for a launch with
`cpu=False`), sets `num_processes = 1` while DeepSpeed's process group has 2 ranks, and `deepspeed.initialize` of the
teacher stops at `DeepSpeedConfig._batch_assertion` ("train_batch_size is not equal to micro_batch_per_gpu *
gradient_acc_step * world_size 2 != 2 * 1 * 2"). With `use_cpu=True` accelerate opens a gloo group of 2 and
`AcceleratorState` (built with `cpu=False` by the Trainer's `Accelerator`) switches to `DistributedType.DEEPSPEED`.

Each rank writes into `--dump-dir`: `rank<r>.json` (what the Trainer and accelerate chose, each model's partitioning,
the logged losses, the batches each rank trained on) and `rank<r>.safetensors` (the student's gathered weights after
the first step and at the end). Rank 0 also writes `ref.safetensors` / `ref.json`: the same steps in one plain process
(the two ranks' batches concatenated, `trainer.compute_loss` on unsharded copies of both models, the Trainer's own
optimizer class and kwargs, its linear schedule and `max_grad_norm` clipping), and the Trainer's `save_model` output
in `D/final`.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
PER_DEVICE, LENGTH, STEPS, LR = 2, 8, 3, 1e-2
# Below every step's gradient norm (measured 0.45-0.51), so the clipping DeepSpeed does for the Trainer
# (`gradient_clipping: "auto"` -> `max_grad_norm`) acts at every step and is compared with torch's.
MAX_GRAD_NORM = 0.2


def zero3_config() -> dict:
    """ZeRO-3 with every student parameter partitioned (persistence threshold 0) and a full-weight save."""
    return {
        "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto", "train_batch_size": "auto",
        "gradient_clipping": "auto", "steps_per_print": 10**6,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0,
                              "stage3_gather_16bit_weights_on_model_save": True},
    }


def partitioning(model) -> dict:
    """How DeepSpeed holds `model`'s parameters outside a forward: partitioned ones have an empty `param.data` and
    keep `param.ds_tensor` (this rank's slice of `ds_numel` entries)."""
    params = list(model.named_parameters())
    part = [(n, q) for n, q in params if hasattr(q, "ds_id") and q.data.numel() == 0]
    return {
        "count": len(params), "with_ds_id": sum(hasattr(q, "ds_id") for _, q in params), "partitioned": len(part),
        "persistent": [n for n, q in params if getattr(q, "ds_persist", False)],
        "local_fraction": sum(q.ds_tensor.numel() for _, q in part) / max(1, sum(q.ds_numel for _, q in part)),
        "ds_numel": sum(getattr(q, "ds_numel", q.numel()) for _, q in params),
        "requires_grad": sum(q.requires_grad for _, q in params),
    }


def gathered(model) -> dict:
    import deepspeed

    params = dict(model.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values())):  # collective: every rank gets the full weights
        return {n: q.detach().clone() for n, q in params.items()}


def reference(trainer, student, teacher, batches) -> tuple[list, dict]:
    """The same steps in one process: `trainer.compute_loss` on the whole batch, the Trainer's optimizer and schedule."""
    import torch
    from transformers import Trainer, get_scheduler

    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(trainer.args, student)
    # The Trainer gives its parameter groups `weight_decay=args.weight_decay`; torch's AdamW defaults to 0.01.
    opt = cls(student.parameters(), **kwargs, weight_decay=trainer.args.weight_decay)
    sched = get_scheduler("linear", opt, num_warmup_steps=0, num_training_steps=STEPS)
    trainer.teacher = teacher.eval()
    student.train()
    losses, after_first = [], None
    for batch in batches:
        loss = trainer.compute_loss(student, {k: torch.tensor(v) for k, v in batch.items()})
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), trainer.args.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(loss.item())
        if after_first is None:
            after_first = {n: q.detach().clone() for n, q in student.named_parameters()}
    return losses, after_first


def main(argv=None) -> int:  # long: one run, then its reference, in order
    p = argparse.ArgumentParser()
    p.add_argument("--dump-dir", required=True)
    opts = p.parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    # As tests/deepspeed_worker.py: DeepSpeed's TorchBackend JIT-compiles a shared-memory all-reduce when it wraps the
    # process group (357 s of C++ on this 2-core machine); only `inference_all_reduce` uses it, training reduces with
    # gloo (measured: the same figures with the built op).
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    import torch
    import torch.distributed as dist
    from safetensors.torch import load_file, save_file
    from transformers import TrainerCallback

    sys.path.insert(0, HERE)
    from conftest import random_lm_dataset
    from fsdp2_worker import tiny_llama

    from hf_compress.distillation import DistillationArguments
    from hf_compress.trainers import DistillationTrainer

    os.makedirs(opts.dump_dir, exist_ok=True)
    student, teacher = tiny_llama(0), tiny_llama(1)
    ref_student, ref_teacher = copy.deepcopy(student), copy.deepcopy(teacher)
    args = DistillationArguments(
        output_dir=os.path.join(opts.dump_dir, "out"), deepspeed=zero3_config(), use_cpu=True, ddp_backend="gloo",
        per_device_train_batch_size=PER_DEVICE, max_steps=STEPS, learning_rate=LR, warmup_steps=0, logging_steps=1,
        max_grad_norm=MAX_GRAD_NORM, save_strategy="no", report_to="none", disable_tqdm=True, seed=0, dataloader_num_workers=0,
        temperature=2.0, alpha=0.5,
    )
    rank, ws = dist.get_rank(), dist.get_world_size()
    batches: list = []
    after_first: dict = {}

    class Record(DistillationTrainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            batches.append({k: v.tolist() for k, v in inputs.items()})
            return super().training_step(model, inputs, num_items_in_batch)

    class AfterFirstStep(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step == 1:
                after_first.update(gathered(model))

    data = random_lm_dataset(n=PER_DEVICE * 2 * STEPS, seq_len=LENGTH)
    trainer = Record(model=student, teacher_model=teacher, args=args, train_dataset=data, callbacks=[AfterFirstStep()])
    state = trainer.accelerator.state
    info = {
        "world_size": ws, "accelerate_num_processes": trainer.accelerator.num_processes,
        "distributed_type": str(state.distributed_type), "is_deepspeed_enabled": trainer.is_deepspeed_enabled,
        "zero_stage": state.deepspeed_plugin.zero_stage, "teacher_class": type(trainer.teacher).__name__,
        "teacher": partitioning(trainer.teacher.module), "teacher_training": trainer.teacher.module.training,
    }
    teacher_ids = {n: q.ds_id for n, q in trainer.teacher.module.named_parameters()}
    trainer.train()
    info["student_class"] = type(trainer.model_wrapped).__name__
    info["student"] = partitioning(trainer.model)
    info["student_optimizer"] = type(trainer.optimizer.optimizer).__name__  # accelerate's wrapper -> ZeRO-3's
    info["teacher_after"] = partitioning(trainer.teacher.module)
    info["teacher_ids_unchanged"] = teacher_ids == {n: q.ds_id for n, q in trainer.teacher.module.named_parameters()}
    info["losses"] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    info["grad_norms"] = [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]
    info["max_grad_norm"] = trainer.args.max_grad_norm
    info["gradient_clipping"] = trainer.model_wrapped.gradient_clipping()
    info["batches"] = batches
    final = gathered(trainer.model)
    final_dir = os.path.join(opts.dump_dir, "final")
    trainer.save_model(final_dir)  # ZeRO-3: `_zero3_consolidated_16bit_state_dict`, written by rank 0
    dist.barrier()
    saved = load_file(os.path.join(final_dir, "model.safetensors"))
    info["saved_equal_gathered"] = sorted(saved) == sorted(final) and all(torch.equal(saved[n], final[n]) for n in final)
    tensors = {**{f"first/{n}": t for n, t in after_first.items()}, **{f"final/{n}": t for n, t in final.items()}}
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(opts.dump_dir, f"rank{rank}.safetensors"))

    every = [None] * ws
    dist.all_gather_object(every, batches)
    if rank == 0:  # the global batch of each step: rank 0's rows, then rank 1's
        steps = [{k: sum((every[r][s][k] for r in range(ws)), []) for k in batches[s]} for s in range(STEPS)]
        ref_losses, ref_first = reference(trainer, ref_student, ref_teacher, steps)
        save_file({**{f"first/{n}": t for n, t in ref_first.items()},
                   **{f"final/{n}": q.detach().clone() for n, q in ref_student.named_parameters()}},
                  os.path.join(opts.dump_dir, "ref.safetensors"))
        with open(os.path.join(opts.dump_dir, "ref.json"), "w") as f:
            json.dump({"losses": ref_losses}, f)
    with open(os.path.join(opts.dump_dir, f"rank{rank}.json"), "w") as f:
        json.dump(info, f)
    dist.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())
