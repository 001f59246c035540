"""FSDP2 (`fully_shard`, gloo, CPU) against one process, for tests/test_fsdp2.py.

Run alone (`python tests/fsdp2_worker.py --dump-dir D`: the one-process reference, full batch, nothing sharded) or
under `python -m torch.distributed.run --nproc_per_node=2 tests/fsdp2_worker.py --dump-dir D` (every decoder layer
and the root `fully_shard`-ed, student and teacher alike; each rank gets its half of the same batch, so FSDP's
gradient average equals the one-process mean). Tiny Llamas with random norm weights and biases; hidden 24 and
intermediate 40, so a 64-entry NF4 block of a sharded [24, 24] weight spans the border of the two shards.

Scenarios (each rank writes `rank<r>.json` and the tensors below into `--dump-dir`; rank 0 writes the exports):
- `kd`: the distillation loss (`hf_compress.distillation.loss.distillation_loss`) and the student's gradients,
  gathered;
- `teacher_shard` (not under `--ddp`): `teacher_placement="shard"`: `prepare_teacher` with an FSDP2 accelerator
  (a stand-in holding a real `FullyShardedDataParallelPlugin`: accelerate drops that plugin on CPU) and
  `hf_compress.fsdp.shard_teacher` with the mesh; its logits on the whole batch, the KD loss and gradients of a whole
  student, the teacher's gradients, local shard sizes and FSDP groups (alone: the replicated teacher);
- `prune_layer` / `prune_global`: `GradualPruningCallback` driven through its events by a hand-written training
  loop (the Trainer cannot run FSDP on CPU): masks at step 0 (chosen from identical weights) and at the end, the
  largest gradient over pruned entries after each backward, the masks saved by `on_save` and restored into a
  fresh sharded student, the final weights, and the export written by `hf_compress.fsdp.save_full_state_dict`;
- `qat_bnb4` / `qat_bnb8` / `qat_int4`: fake quantizers attached before sharding; loss and gradients;
- `sp_act` / `sp_loss` / `sp_mag`: `StructuredPruningCallback` (activation scores with the cosine or the skip-loss
  block metric, or weight magnitudes) on a 4-layer Llama with 2 KV groups: the importance scores (each rank scores
  its half of two right-padded calibration batches), the plan, 4 AdamW steps under the gradual masks
  (layers skipped, heads / neurons / channels masked), then the cut: the pruned model's weights and its logits on
  the whole batch (rank 0: the copy cut from the gathered state dict, also written to `structured_pruned/`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from types import SimpleNamespace

HERE = os.path.dirname(os.path.abspath(__file__))
BATCH, LENGTH, STEPS = 4, 8, 6
VOCAB = 97  # tests/conftest.py


def _random_llama(seed: int, **config):
    """A tiny eager Llama with biases, norm weights in [0.5, 1.5] and random biases (a wrong formula cannot hide)."""
    import torch
    from transformers import LlamaForCausalLM

    sys.path.insert(0, HERE)
    from conftest import tiny_llama_config

    torch.manual_seed(seed)
    cfg = tiny_llama_config(hidden_size=24, intermediate_size=40, attention_bias=True, mlp_bias=True, **config)
    cfg._attn_implementation = "eager"
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.05)
    return model


def tiny_llama(seed: int):
    return _random_llama(seed, num_attention_heads=2, num_key_value_heads=1)


def structured_llama():
    """4 layers, 4 query heads in 2 KV groups of head_dim 6: every structure has something to drop."""
    return _random_llama(2, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=4)


def logits_of(model, ids):
    import torch

    with torch.no_grad():
        return model.eval()(input_ids=ids).logits.detach().float().clone()


def shard(model, mesh):
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def kd_loss(student, teacher, ids):
    import torch

    from hf_compress.distillation.loss import distillation_loss

    with torch.no_grad():
        t = teacher(input_ids=ids).logits
    s = student(input_ids=ids).logits
    return distillation_loss(s, t, labels=ids, temperature=2.0, alpha=0.5, shift_labels=True).loss


def sharded_teacher(info: dict, tensors: dict, mesh, ids) -> None:
    """`teacher_placement="shard"` under FSDP2 (alone: `"replicate"`): the teacher's logits on the whole batch, the
    KD loss and gradients of a whole student, and what each rank holds of the teacher."""
    import torch
    from accelerate.utils import FullyShardedDataParallelPlugin
    from torch.distributed.fsdp import FSDPModule

    from hf_compress.distillation.cache import LOGITS, teacher_forward
    from hf_compress.distillation.loss import distillation_loss
    from hf_compress.distillation.teacher import prepare_teacher
    from hf_compress.fsdp import is_dtensor, shard_teacher

    if mesh is None:
        teacher = prepare_teacher(tiny_llama(1), "cpu", placement="replicate")
    else:  # what `prepare_teacher` reads of an FSDP2 `Accelerator` (accelerate drops the plugin on CPU)
        plugin = FullyShardedDataParallelPlugin(fsdp_version=2)
        acc = SimpleNamespace(is_fsdp2=True, state=SimpleNamespace(fsdp_plugin=plugin), torch_device_mesh=None)
        teacher = prepare_teacher(tiny_llama(1), None, accelerator=acc, placement="shard")
        by_hand = shard_teacher(tiny_llama(1), mesh)
        info["teacher_shard_by_hand_diff"] = float(
            (teacher_forward(by_hand, {"input_ids": ids}, "causal-lm")[LOGITS] -
             teacher_forward(teacher, {"input_ids": ids}, "causal-lm")[LOGITS]).abs().max())
    student = tiny_llama(0)  # whole on every rank: only the teacher's placement differs from one process
    logits = teacher_forward(teacher, {"input_ids": ids}, "causal-lm")[LOGITS]
    info["teacher_shard_resharded"] = all(is_dtensor(p) for p in teacher.parameters())  # after the forward
    loss = distillation_loss(student(input_ids=ids).logits, logits, labels=ids, temperature=2.0, alpha=0.5,
                             shift_labels=True).loss
    loss.backward()
    info["teacher_shard_loss"] = float(loss)
    tensors["teacher_shard/logits"] = logits.detach().clone()
    for name, param in student.named_parameters():
        tensors[f"teacher_shard/grad/{name}"] = param.grad.detach().clone()
    params = list(teacher.parameters())
    info["teacher_shard_grads"] = sum(p.grad is not None for p in params)
    info["teacher_shard_requires_grad"] = sum(p.requires_grad for p in params)
    info["teacher_shard_training"] = teacher.training
    info["teacher_shard_local_numel"] = sum((p.to_local() if is_dtensor(p) else p).numel() for p in params)
    info["teacher_shard_total_numel"] = sum(p.numel() for p in params)
    info["teacher_shard_groups"] = sum(isinstance(m, FSDPModule) for m in teacher.modules())


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--dump-dir", required=True)
    p.add_argument("--ddp", action="store_true", help="wrap the student in DDP instead (the teacher: a full copy)")
    opts = p.parse_args(argv)
    import torch
    import torch.distributed as dist
    from safetensors.torch import save_file
    from transformers import TrainerControl, TrainerState

    from hf_compress.callbacks import GradualPruningCallback
    from hf_compress.fsdp import full_tensor, save_full_state_dict
    from hf_compress.pruning import sparsity_stats
    from hf_compress.quantization import QuantizationArguments
    from hf_compress.quantization.targets import quantization_targets
    from hf_compress.quantization.qat import attach_fake_quant

    torch.use_deterministic_algorithms(True)
    ws, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    mesh = None
    if ws > 1:
        from torch.distributed.device_mesh import init_device_mesh

        dist.init_process_group("gloo")
        mesh = init_device_mesh("cpu", (ws,))
    os.makedirs(opts.dump_dir, exist_ok=True)
    ids = torch.randint(VOCAB, (BATCH, LENGTH), generator=torch.Generator().manual_seed(0))
    local = ids.chunk(ws)[rank]
    info: dict = {"world_size": ws}
    tensors: dict = {}

    def place(student, teacher, find_unused=False):
        """(the module to run forward, the student model, the teacher): sharded, DDP-wrapped or as they are."""
        teacher.eval().requires_grad_(False)
        if mesh is not None and opts.ddp:
            ddp = torch.nn.parallel.DistributedDataParallel(student, find_unused_parameters=find_unused)
            return ddp, student, teacher
        if mesh is not None:
            shard(student, mesh), shard(teacher, mesh)
        return student, student, teacher

    def pair():
        return place(tiny_llama(0), tiny_llama(1))

    def mean_over_ranks(x: torch.Tensor) -> float:
        x = x.detach().reshape(1).clone()
        if ws > 1:
            dist.all_reduce(x)
        return float(x / ws)

    def grads(model, prefix):
        for name, param in model.named_parameters():
            if param.grad is not None:
                tensors[f"{prefix}/grad/{name}"] = full_tensor(param.grad).detach().clone()

    # -- distillation: loss and gradients ---------------------------------------------------------------------
    run, student, teacher = pair()
    info["kd_sharded"] = [type(p).__name__ for p in list(student.parameters())[:1] + list(teacher.parameters())[:1]]
    loss = kd_loss(run, teacher, local)
    loss.backward()
    info["kd_loss"] = mean_over_ranks(loss)
    grads(student, "kd")
    if not opts.ddp:
        sharded_teacher(info, tensors, mesh, ids)

    # -- gradual pruning under the callback's events ------------------------------------------------------------
    for scope in ("layer", "global"):
        key = f"prune_{scope}"
        run, student, teacher = pair()
        opt = torch.optim.AdamW(student.parameters(), lr=1e-2, weight_decay=0.01)
        cb = GradualPruningCallback(target_sparsity=0.5, initial_sparsity=0.25, start_step=0, end_step=4, frequency=2,
                                    scope=scope, log_per_layer=False)
        args, state, control = SimpleNamespace(output_dir=opts.dump_dir), TrainerState(max_steps=STEPS), TrainerControl()
        cb.on_train_begin(args, state, control, model=student, optimizer=opt)
        info[f"{key}_mask_type"] = type(cb._pairs[0][2]).__name__
        for name, _, mask in cb._pairs:
            tensors[f"{key}/mask0/{name}"] = full_tensor(mask).to(torch.uint8)
        pruned_grad = []
        for _ in range(STEPS):
            kd_loss(run, teacher, local).backward()
            # Before any callback pass: the gradient hooks alone must have zeroed the pruned entries.
            pruned_grad.append(max(float(full_tensor(p.grad).abs().masked_fill(full_tensor(m), 0).max())
                                   for _, p, m in cb._pairs))
            cb.on_pre_optimizer_step(args, state, control)
            opt.step()
            cb.on_optimizer_step(args, state, control, optimizer=opt)
            opt.zero_grad()
            state.global_step += 1
            cb.on_step_end(args, state, control, optimizer=opt)
        info[f"{key}_pruned_grad_max"] = pruned_grad
        for name, _, mask in cb._pairs:
            tensors[f"{key}/mask/{name}"] = full_tensor(mask).to(torch.uint8)
        info[f"{key}_pruned_weight_max"] = max(
            float(full_tensor(p.detach()).abs().masked_fill(full_tensor(m), 0).max()) for _, p, m in cb._pairs
        )
        # A checkpoint: every rank takes part in `on_save` (the masks are gathered), rank 0 writes; a fresh sharded
        # student resuming from it gets the same masks back, sharded.
        folder = os.path.join(opts.dump_dir, f"{key}-ckpt", f"checkpoint-{state.global_step}")
        if rank == 0:
            os.makedirs(folder)
        if ws > 1:
            dist.barrier()
        state.is_world_process_zero = rank == 0
        cb.on_save(SimpleNamespace(output_dir=os.path.dirname(folder)), state, control)
        if ws > 1:
            dist.barrier()
        _, resumed, _ = pair()
        cb2 = GradualPruningCallback(target_sparsity=0.5, initial_sparsity=0.25, start_step=0, end_step=4,
                                     frequency=2, scope=scope, log_per_layer=False)
        cb2.on_train_begin(SimpleNamespace(output_dir=os.path.dirname(folder)), state, control, model=resumed)
        info[f"{key}_resumed_masks_equal"] = all(
            type(m2) is type(m) and torch.equal(full_tensor(m2), full_tensor(m))
            for (_, _, m), (_, _, m2) in zip(cb._pairs, cb2._pairs)
        )
        info[f"{key}_resumed_zero_weights"] = all(
            bool((full_tensor(p.detach())[~full_tensor(m)] == 0).all()) for _, p, m in cb2._pairs
        )
        cb2.on_train_end(SimpleNamespace(), state, control, model=resumed)
        stats = sparsity_stats(student, [name for name, _, _ in cb._pairs])
        info[f"{key}_zeros"], info[f"{key}_total"] = stats["zeros"], stats["total"]
        cb.on_train_end(args, state, control, model=student)
        info[f"{key}_wrote"] = save_full_state_dict(student, os.path.join(opts.dump_dir, f"{key}.safetensors"))

    # -- structured pruning under the callback's events ---------------------------------------------------------
    from hf_compress.callbacks import StructuredPruningCallback
    from hf_compress.callbacks.structured_pruning import PRUNED_DIR

    calib = [torch.randint(VOCAB, (BATCH, LENGTH), generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    masks = [torch.ones(BATCH, LENGTH, dtype=torch.long) for _ in calib]
    masks[0][1, 5:] = 0  # right padding in rank 0's half and rank 1's: token-weighted means across the ranks
    masks[1][3, 3:] = 0
    for key, structures, kw in (
        ("sp_act", "ffn,heads,hidden,layers", {"calibration_batches": 2}),
        ("sp_loss", "ffn,layers", {"calibration_batches": 2, "layer_metric": "loss"}),
        ("sp_mag", "ffn,heads,hidden,layers", {"calibration_batches": 0}),
    ):
        padded = key != "sp_loss"  # the skip-loss metric is a per-batch mean loss: equal token counts per rank
        batches = [{"input_ids": c.chunk(ws)[rank], "attention_mask": (m if padded else torch.ones_like(m)).chunk(ws)[rank]}
                   for c, m in zip(calib, masks)]
        run, student, _ = place(structured_llama(), tiny_llama(1), find_unused=True)  # dropped blocks: no gradients
        opt = torch.optim.AdamW(student.parameters(), lr=1e-2, weight_decay=0.01)
        keep = {"ffn": 0.5, "heads": 0.5, "hidden": 0.5, "layers": 0.5}
        cb = StructuredPruningCallback(structures, keep={s: keep[s] for s in structures.split(",")}, end_fraction=0.5,
                                       frequency=1, **kw)
        out = os.path.join(opts.dump_dir, f"{key}-out")
        args, state, control = SimpleNamespace(output_dir=out), TrainerState(max_steps=4), TrainerControl()
        state.is_world_process_zero = rank == 0
        cb.on_train_begin(args, state, control, model=student, train_dataloader=batches, optimizer=opt)
        for name, value in cb.plan.scores.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{key}/score/{name}"] = value.float()
        info[f"{key}_plan"] = {k: v for k, v in cb.plan.to_dict().items() if k not in ("scores", "check")}
        info[f"{key}_losses"] = []
        for _ in range(4):
            loss = run(input_ids=local, labels=local).loss
            loss.backward()
            info[f"{key}_losses"].append(mean_over_ranks(loss))
            opt.step()
            opt.zero_grad()
            state.global_step += 1
            cb.on_step_end(args, state, control, model=student)
        info[f"{key}_schedule"] = cb.history
        cb.on_train_end(args, state, control, model=student)
        info[f"{key}_check"] = cb.plan.check
        pruned = student if cb.pruned_model is None else cb.pruned_model
        info[f"{key}_has_pruned_copy"] = cb.pruned_model is not None
        if rank == 0:
            cfg = pruned.config
            info[f"{key}_config"] = [cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads,
                                     cfg.hidden_size, cfg.num_hidden_layers]
            tensors[f"{key}/logits"] = logits_of(pruned, ids)
            save_file({k: v.detach().contiguous() for k, v in pruned.state_dict().items()},
                      os.path.join(opts.dump_dir, f"{key}.safetensors"))
        written = os.path.join(out, PRUNED_DIR)
        info[f"{key}_wrote_folder"] = os.path.isdir(written)
        if rank == 0 and os.path.isdir(written):
            from transformers import LlamaForCausalLM

            reloaded = LlamaForCausalLM.from_pretrained(written)
            info[f"{key}_reloaded_logits_diff"] = float((logits_of(reloaded, ids) - tensors[f"{key}/logits"]).abs().max())
        if ws > 1:
            dist.barrier()

    # -- QAT: fake quantizers attached before sharding ------------------------------------------------------------
    for key, qargs in (
        ("qat_bnb4", QuantizationArguments(bits=4, quant_type="nf4")),
        ("qat_bnb8", QuantizationArguments(bits=8)),  # row-wise absmax and LLM.int8's activation hook
        ("qat_int4", QuantizationArguments(bits=4, backend="compressed-tensors")),  # per channel
    ):
        student, teacher = tiny_llama(0), tiny_llama(1)
        linears, embeddings = quantization_targets(student, qargs)
        if key == "qat_bnb4":  # bitsandbytes' CPU 4-bit kernels skip these shapes at export; the NF4 math is still
            linears = [n for n, m in student.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]
        info[f"{key}_count"] = attach_fake_quant(student, qargs, linears, embeddings)
        run, student, teacher = place(student, teacher)
        loss = kd_loss(run, teacher, local)
        loss.backward()
        info[f"{key}_loss"] = mean_over_ranks(loss)
        grads(student, key)
    if mesh is not None and not opts.ddp:  # attaching after `fully_shard` is refused in one line
        student = shard(tiny_llama(0), mesh)
        qargs = QuantizationArguments(bits=8)
        try:
            attach_fake_quant(student, qargs, *quantization_targets(student, qargs))
        except ValueError as err:
            info["qat_after_shard_error"] = str(err)

    if mesh is not None and not opts.ddp:  # why `sharded_teacher` uses a stand-in: accelerate's state on CPU
        from accelerate import Accelerator
        from accelerate.utils import FullyShardedDataParallelPlugin

        acc = Accelerator(cpu=True, fsdp_plugin=FullyShardedDataParallelPlugin(fsdp_version=2))
        info["accelerate_cpu_fsdp"] = [str(acc.distributed_type), acc.is_fsdp2]
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(opts.dump_dir, f"rank{rank}.safetensors"))
    with open(os.path.join(opts.dump_dir, f"rank{rank}.json"), "w") as f:
        json.dump(info, f)
    if ws > 1:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
