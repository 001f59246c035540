"""`GradualPruningCallback` under DeepSpeed ZeRO-3 through the `Trainer` (DeepSpeed's CPU accelerator, gloo, 2 ranks),
for tests/test_deepspeed.py.

`python -m torch.distributed.run --standalone --nproc_per_node=2 tests/deepspeed_pruning_worker.py --dump-dir D`.
A tiny Llama (random norm weights) trains `STEPS` steps with `TrainingArguments(deepspeed=<ZeRO-3 dict>,
use_cpu=True)` under a global-scope gradual pruning callback (events at steps 0, 2 and 4, target 0.5). Each rank
records the masks after every event, the logged losses and sparsities, its batches and the gathered weights at the
end, and rank 0 writes the Trainer's `save_model` output to `D/final`. Rank 0 then runs the reference: the same
callback class driven by hand around one plain process (the ranks' batches concatenated, `trainer.compute_loss`, the
Trainer's optimizer, schedule and `max_grad_norm` clipping), in the Trainer's event order.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
PER_DEVICE, LENGTH, STEPS, LR, MAX_GRAD_NORM = 2, 8, 6, 1e-2, 0.2
PRUNING = dict(target_sparsity=0.5, start_step=0, end_step=4, frequency=2, scope="global")


def main(argv=None) -> int:  # long: one run, then its reference, in order
    p = argparse.ArgumentParser()
    p.add_argument("--dump-dir", required=True)
    opts = p.parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed  # noqa: F401

    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None  # as tests/deepspeed_trainer_worker.py
    import torch
    import torch.distributed as dist
    from safetensors.torch import save_file
    from transformers import Trainer, TrainerControl, TrainerState, TrainingArguments, get_scheduler

    sys.path.insert(0, HERE)
    from conftest import random_lm_dataset
    from deepspeed_trainer_worker import gathered, partitioning, zero3_config
    from fsdp2_worker import tiny_llama

    from hf_compress.callbacks import GradualPruningCallback

    class Recording(GradualPruningCallback):
        """Keeps a copy of the masks after each pruning event (`events[step] = {name: mask}`)."""

        def __init__(self):
            super().__init__(**PRUNING)
            self.events = {}

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self.partitioning = partitioning(model)  # as the callback finds the weights: DeepSpeed's slices
            super().on_train_begin(args, state, control, model=model, **kwargs)
            self.events[0] = {n: m.clone() for n, _, m in self._pairs}

        def on_step_end(self, args, state, control, **kwargs):
            super().on_step_end(args, state, control, **kwargs)
            if self._is_event(state.global_step):
                self.events[state.global_step] = {n: m.clone() for n, _, m in self._pairs}

    os.makedirs(opts.dump_dir, exist_ok=True)
    model = tiny_llama(0)
    ref_model = copy.deepcopy(model)
    args = TrainingArguments(
        output_dir=os.path.join(opts.dump_dir, "out"), deepspeed=zero3_config(), use_cpu=True, ddp_backend="gloo",
        per_device_train_batch_size=PER_DEVICE, max_steps=STEPS, learning_rate=LR, warmup_steps=0, logging_steps=1,
        max_grad_norm=MAX_GRAD_NORM, save_strategy="no", report_to="none", disable_tqdm=True, seed=0,
        dataloader_num_workers=0,
    )
    rank, ws = dist.get_rank(), dist.get_world_size()
    batches: list = []

    class Record(Trainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            batches.append({k: v.tolist() for k, v in inputs.items()})
            return super().training_step(model, inputs, num_items_in_batch)

    callback = Recording()
    data = random_lm_dataset(n=PER_DEVICE * 2 * STEPS, seq_len=LENGTH)
    trainer = Record(model=model, args=args, train_dataset=data, callbacks=[callback])
    trainer.train()
    info = {"world_size": ws, "distributed_type": str(trainer.accelerator.state.distributed_type),
            "zero_stage": trainer.accelerator.state.deepspeed_plugin.zero_stage, "partitioning": callback.partitioning,
            "zero3_path": callback._zero3, "optimizer": type(trainer.optimizer.optimizer).__name__,
            "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
            "sparsity_logged": [h["sparsity"] for h in trainer.state.log_history if "sparsity" in h],
            "check": callback.check, "batches": batches, "events": sorted(callback.events)}
    final = gathered(trainer.model)
    trainer.save_model(os.path.join(opts.dump_dir, "final"))
    dist.barrier()
    tensors = {f"final/{n}": t for n, t in final.items()}
    tensors.update({f"mask{s}/{n}": m.to(torch.uint8) for s, masks in callback.events.items() for n, m in masks.items()})
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(opts.dump_dir, f"rank{rank}.safetensors"))

    every = [None] * ws
    dist.all_gather_object(every, batches)
    if rank == 0:  # the reference: the same callback around one process, the Trainer's event order
        steps = [{k: sum((every[r][s][k] for r in range(ws)), []) for k in batches[s]} for s in range(STEPS)]
        cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(trainer.args, ref_model)
        opt = cls(ref_model.parameters(), **kwargs, weight_decay=trainer.args.weight_decay)
        sched = get_scheduler("linear", opt, num_warmup_steps=0, num_training_steps=STEPS)
        ref_cb, state, control = Recording(), TrainerState(max_steps=STEPS), TrainerControl()
        ref_model.train()
        ref_cb.on_train_begin(args, state, control, model=ref_model, optimizer=opt)
        losses = []
        for batch in steps:
            loss = trainer.compute_loss(ref_model, {k: torch.tensor(v) for k, v in batch.items()})
            loss.backward()
            torch.nn.utils.clip_grad_norm_(ref_model.parameters(), MAX_GRAD_NORM)
            ref_cb.on_pre_optimizer_step(args, state, control)
            opt.step()
            ref_cb.on_optimizer_step(args, state, control, optimizer=opt)
            sched.step()
            opt.zero_grad()
            state.global_step += 1
            ref_cb.on_step_end(args, state, control, optimizer=opt)
            losses.append(loss.item())
        ref = {f"final/{n}": q.detach().clone() for n, q in ref_model.named_parameters()}
        ref.update({f"mask{s}/{n}": m.to(torch.uint8) for s, masks in ref_cb.events.items() for n, m in masks.items()})
        save_file({k: v.contiguous() for k, v in ref.items()}, os.path.join(opts.dump_dir, "ref.safetensors"))
        with open(os.path.join(opts.dump_dir, "ref.json"), "w") as f:
            json.dump({"losses": losses, "events": sorted(ref_cb.events)}, f)
    with open(os.path.join(opts.dump_dir, f"rank{rank}.json"), "w") as f:
        json.dump(info, f)
    dist.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())
