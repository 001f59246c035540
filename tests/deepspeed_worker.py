"""Real DeepSpeed ZeRO-3 on CPU (DeepSpeed's CPU accelerator, gloo), 2 ranks, for tests/test_deepspeed.py.

`python -m torch.distributed.run --standalone --nproc_per_node=2 tests/deepspeed_worker.py --dump-dir D`. A tiny
Llama goes through `deepspeed.initialize` with ZeRO stage 3 (every parameter partitioned: persistence threshold 0)
and a torch AdamW; each rank trains on its half of the batch, 3 steps. After every step the fixed 50% magnitude
masks (chosen once on the full initial weights with `hf_compress.pruning.magnitude_masks`) are re-applied to the
partitioned parameters: to the optimizer's fp32 partitions (`deepspeed.utils.safe_get_full_fp32_param` /
`safe_set_full_fp32_param`) and to the parameters the forward reads, inside
`deepspeed.zero.GatheredParameters(..., modifier_rank=0)` (rank 0 writes the full tensor, DeepSpeed re-partitions
it). Masking only the latter is not enough: the next step starts again from the fp32 copy.

Measured (DeepSpeed 0.19.8, torch 2.13 CPU): every step equals one process's (losses within 4.8e-7, the final
weights within 5.8e-6) once DeepSpeed's default gradient clipping is turned off (`gradient_clipping: 0.0`; DeepSpeed
clips to norm 1.0 unless told, the reference does not). With it on, the first update still matched (Adam's first step
does not depend on the gradient's scale) and the third loss was 3.932 against 3.941: the "ZeRO-3 divergence" an
earlier version of this worker reported. The same run in one plain process (whole batch, `torch.optim.AdamW`, the same
masks) is the reference, computed on rank 0. Then the export: inside `GatheredParameters` over every parameter,
`hf_compress.fsdp.save_full_state_dict` writes one safetensors file from rank 0.

Also recorded: what a magnitude selection on a rank's own partition (`param.ds_tensor`) would choose, against the
full weight's mask: the reason `GradualPruningCallback` selects on the gathered weights under ZeRO-3.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
BATCH, LENGTH, STEPS, VOCAB = 4, 8, 3, 97


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--dump-dir", required=True)
    opts = p.parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM

    # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce (357 s of C++ on this 2-core machine) at
    # `init_distributed`; only `inference_all_reduce` (AutoTP inference) uses it, training reduces with gloo.
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend="gloo")
    import torch.distributed as dist
    from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param

    from hf_compress.fsdp import save_full_state_dict
    from hf_compress.pruning import magnitude_masks

    sys.path.insert(0, HERE)
    from conftest import tiny_llama_config

    rank, ws = dist.get_rank(), dist.get_world_size()
    os.makedirs(opts.dump_dir, exist_ok=True)
    torch.manual_seed(0)
    cfg = tiny_llama_config()
    cfg._attn_implementation = "eager"
    model = LlamaForCausalLM(cfg)
    reference = copy.deepcopy(model)
    names = [n for n, q in model.named_parameters() if q.dim() == 2 and ".layers." in n]
    masks = magnitude_masks({n: q.detach() for n, q in model.named_parameters() if n in names}, 0.5)
    ids = torch.randint(VOCAB, (BATCH, LENGTH), generator=torch.Generator().manual_seed(0))
    info: dict = {"world_size": ws}

    # DeepSpeed clips gradients to norm 1.0 unless told otherwise (`GRADIENT_CLIPPING_DEFAULT = 1.0`); the reference
    # does not clip, so neither does the engine. (Clipped, the first Adam update still matched, Adam's first step being
    # invariant to the gradient's scale, and every later one did not: the "ZeRO-3 divergence" of an earlier version.)
    config = {"train_micro_batch_size_per_gpu": BATCH // ws, "gradient_accumulation_steps": 1, "steps_per_print": 10**6,
              "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
              "zero_allow_untested_optimizer": True, "gradient_clipping": 0.0}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    params = dict(engine.module.named_parameters())
    info["partitioned"] = all(q.data.numel() == 0 and q.ds_tensor.numel() < q.ds_numel and hasattr(q, "ds_id")
                              for q in params.values())
    info["local_fraction"] = sum(q.ds_tensor.numel() for q in params.values()) / sum(q.ds_numel for q in params.values())
    # A magnitude selection on this rank's flat partition against the full weight's mask over the same entries.
    name = names[0]
    q = params[name]
    local = q.ds_tensor.detach().clone()
    start = rank * q.ds_tensor.numel()
    full_mask = masks[name].reshape(-1)[start: start + local.numel()]
    n = min(local.numel(), q.ds_numel - start)
    local_mask = magnitude_masks({"w": local[:n]}, 0.5)["w"]
    info["local_selection_mismatches"] = int((local_mask != full_mask[:n]).sum())

    local_ids = ids.chunk(ws)[rank]
    losses = []
    for _ in range(STEPS):
        loss = engine(input_ids=local_ids, labels=local_ids).loss
        engine.backward(loss)
        engine.step()
        # ZeRO-3 keeps the optimizer's fp32 partitions apart from the parameters the forward uses: a mask must go
        # into both, or the next step restores the pruned entries from the fp32 copy.
        for n in names:
            full = safe_get_full_fp32_param(params[n])  # collective: the whole fp32 weight on every rank
            safe_set_full_fp32_param(params[n], full * masks[n])  # each rank keeps its partition of it
        with deepspeed.zero.GatheredParameters([params[n] for n in names], modifier_rank=0):
            if rank == 0:
                with torch.no_grad():
                    for n in names:
                        params[n].data.mul_(masks[n])
        x = loss.detach().reshape(1).clone()
        dist.all_reduce(x)
        losses.append(float(x / ws))
    info["losses"] = losses
    info["partitioned_after"] = all(q.data.numel() == 0 for q in params.values())
    with deepspeed.zero.GatheredParameters(list(params.values())):
        gathered = {n: q.detach().clone() for n, q in params.items()}
        info["wrote"] = save_full_state_dict(engine.module, os.path.join(opts.dump_dir, "export.safetensors"))
    tensors = {f"ds/{n}": t for n, t in gathered.items()}

    if rank == 0:  # the reference: one plain process, the whole batch, the same masks after every step
        ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-2, weight_decay=0.01)
        ref_params = dict(reference.named_parameters())
        info["ref_losses"] = []
        for _ in range(STEPS):
            loss = reference(input_ids=ids, labels=ids).loss
            loss.backward()
            ref_opt.step()
            ref_opt.zero_grad()
            with torch.no_grad():
                for n in names:
                    ref_params[n].mul_(masks[n])
            info["ref_losses"].append(loss.item())
        tensors.update({f"ref/{n}": q.detach().clone() for n, q in ref_params.items()})
        tensors.update({f"mask/{n}": masks[n].to(torch.uint8) for n in names})
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(opts.dump_dir, f"rank{rank}.safetensors"))
    with open(os.path.join(opts.dump_dir, f"rank{rank}.json"), "w") as f:
        json.dump(info, f)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
