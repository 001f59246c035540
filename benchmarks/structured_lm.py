"""Minitron-style width + depth pruning of the real SmolLM2-135M to ~50% of its parameters, distilled on Hamlet.

One run, one process: the unpruned SmolLM2-135M-Instruct (the teacher); a student pruned in width and depth (FFN
neurons, hidden channels and blocks, scored from activations on calibration batches of the Hamlet train scenes);
and a same-size student made by dropping blocks alone (the blocks that change their input least, same calibration).
Both students are distilled from the unpruned model on the train scenes (sequence 128, forward KL at T=1), then
measured on the 4 held-out scenes: perplexity, and CPU tokens/s for prefill (128 tokens) and greedy generation
(32 new tokens after a 16-token prompt), batch 1, against the unpruned model in the same process.

    python -m benchmarks.structured_lm           # writes benchmarks/results/structured_lm.{json,md}
    python -m benchmarks.structured_lm --quick   # a few steps, into benchmarks/results-quick
"""

from __future__ import annotations

import argparse
import copy
import math
import shutil
import statistics
import tempfile
import time

from benchmarks.common import OUTPUT_DIRS, print_table, write_results

MODES = {
    "quick": dict(steps=2, batch=2, seq=64, calib_batches=1, reps=1, eval_chunks=4),
    "full": dict(steps=40, batch=4, seq=128, calib_batches=8, reps=3, eval_chunks=None),
}
# Width (FFN neurons, hidden channels) and depth together; the depth is then chosen to fit the budget.
WIDTH = {"ffn": 1024, "hidden": 450}  # hidden: a multiple of the 9 heads (LlamaConfig requires it)


def chunks(tok, texts, seq: int):
    ids = tok("\n\n".join(texts))["input_ids"]
    return [ids[i:i + seq] for i in range(0, len(ids) - seq + 1, seq)]


def perplexity(model, blocks, batch_size: int = 8) -> float:
    import torch

    model.eval()
    nll = count = 0.0
    with torch.no_grad():
        for i in range(0, len(blocks), batch_size):
            ids = torch.tensor(blocks[i:i + batch_size])
            out = model(input_ids=ids, labels=ids)
            n = ids.numel() - ids.shape[0]  # shifted targets
            nll += out.loss.item() * n
            count += n
    return math.exp(nll / count)


def speed(model, tok, prompt_ids, prefill_ids, reps: int) -> dict:
    """Tokens/s at batch 1: prefill of `prefill_ids` (one forward) and greedy generation of 32 tokens."""
    import torch

    model.eval()
    out = {}
    with torch.no_grad():
        model(input_ids=prefill_ids)  # warm-up
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            model(input_ids=prefill_ids)
            times.append(time.perf_counter() - t0)
        out["prefill_tok_s"] = prefill_ids.numel() / statistics.median(times)
        gen = dict(max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=tok.eos_token_id)
        model.generate(prompt_ids, **gen)
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            model.generate(prompt_ids, **gen)
            times.append(time.perf_counter() - t0)
        out["generate_tok_s"] = 32 / statistics.median(times)
    return out


def distil(student, teacher, train_blocks, cfg, out_dir):
    import torch
    from datasets import Dataset
    from transformers import default_data_collator

    from hf_compress.distillation import DistillationArguments
    from hf_compress.trainers import DistillationTrainer

    torch.manual_seed(0)
    rows = train_blocks[: cfg["steps"] * cfg["batch"]]
    ds = Dataset.from_dict({"input_ids": rows, "attention_mask": [[1] * len(r) for r in rows], "labels": rows})
    args = DistillationArguments(
        output_dir=out_dir, max_steps=cfg["steps"], per_device_train_batch_size=cfg["batch"], learning_rate=2e-4,
        warmup_steps=max(1, cfg["steps"] // 10), lr_scheduler_type="cosine", report_to="none", save_strategy="no",
        use_cpu=True, seed=0, disable_tqdm=True, temperature=1.0, alpha=1.0, logging_steps=10,
        dataloader_pin_memory=False,
    )
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=ds,
                                  data_collator=default_data_collator)
    t0 = time.time()
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"seconds": time.time() - t0, "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None}


def run(mode: str = "quick", output_dir: str | None = None) -> dict:
    import random

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_compress.data import load_hamlet
    from hf_compress.models import smollm2_path
    from hf_compress.pruning.structured import (
        count_parameters, pruned_config, select_structures, structured_importance, prune_structures,
    )

    cfg = MODES[mode]
    t_start = time.time()
    path = smollm2_path()
    tok = AutoTokenizer.from_pretrained(path)
    data = load_hamlet()
    train_blocks = chunks(tok, data["train"]["text"], cfg["seq"])
    test_blocks = chunks(tok, data["test"]["text"], cfg["seq"])[: cfg["eval_chunks"]]
    random.Random(0).shuffle(train_blocks)
    calib = [{"input_ids": torch.tensor(train_blocks[i * 4:(i + 1) * 4])} for i in range(cfg["calib_batches"])]
    train_blocks = train_blocks[cfg["calib_batches"] * 4:] + train_blocks[: cfg["calib_batches"] * 4]
    prompt = torch.tensor([test_blocks[0][:16]])
    prefill = torch.tensor([test_blocks[0][: cfg["seq"]]])
    work = tempfile.mkdtemp(prefix="hf_compress_bench_lm_")

    teacher = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    total = count_parameters(type(teacher), teacher.config)
    budget = total // 2
    n_layers = teacher.config.num_hidden_layers

    def fits(keep):
        return count_parameters(type(teacher), pruned_config(teacher, keep)) <= budget

    depth_only = max(L for L in range(1, n_layers + 1) if fits({"layers": L}))
    width_depth = max(L for L in range(1, n_layers + 1) if fits({**WIDTH, "layers": L}))
    scores = structured_importance(teacher, calib, ["ffn", "hidden", "layers"])
    print(f"[{time.time() - t_start:5.0f}s] scored; budget {budget:,} of {total:,}: width+depth keeps {width_depth} "
          f"layers, depth-only {depth_only}", flush=True)

    rows, plans = [], {}

    def record(name, model, extra=None):
        row = {"model": name, "params": sum(p.numel() for p in model.parameters()),
               "layers": model.config.num_hidden_layers, "hidden": model.config.hidden_size,
               "intermediate": model.config.intermediate_size, "test_ppl": perplexity(model, test_blocks),
               **speed(model, tok, prompt, prefill, cfg["reps"]), **(extra or {})}
        rows.append(row)
        print(f"[{time.time() - t_start:5.0f}s] {name}: ppl {row['test_ppl']:.2f}, {row['params'] / 1e6:.1f} M params, "
              f"prefill {row['prefill_tok_s']:.0f} tok/s, generate {row['generate_tok_s']:.1f} tok/s", flush=True)
        return row

    record("SmolLM2-135M (unpruned)", teacher)
    students = {
        "width+depth (ffn, hidden, layers)": {**WIDTH, "layers": width_depth},
        "depth only (layer dropping)": {"layers": depth_only},
    }
    for name, keep in students.items():
        student = copy.deepcopy(teacher).requires_grad_(True)  # the trainer froze the teacher in place
        plan = select_structures(student, scores, keep)
        prune_structures(student, plan)
        plans[name] = {"keep": keep, "layers": plan.layers}
        record(f"{name}, pruned, no retraining", student)
        stats = distil(student, teacher, train_blocks, cfg, f"{work}/run")
        student.save_pretrained(f"{work}/student")  # an ordinary checkpoint: reloads with plain from_pretrained
        reloaded = AutoModelForCausalLM.from_pretrained(f"{work}/student")
        record(f"{name}, distilled {cfg['steps']} steps", reloaded, {"distillation": stats})
        del student, reloaded
    base = rows[0]
    for r in rows:
        r["params_ratio"] = r["params"] / base["params"]
        r["prefill_speedup"] = r["prefill_tok_s"] / base["prefill_tok_s"]
        r["generate_speedup"] = r["generate_tok_s"] / base["generate_tok_s"]
    result = {"mode": mode, "settings": cfg, "width": WIDTH, "budget_params": budget, "plans": plans,
              "scores": {k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in scores.items() if k in ("layers", "method")},
              "data": f"Hamlet (shipped): {len(train_blocks)} train blocks of {cfg['seq']} tokens (16 scenes), "
                      f"perplexity on {len(test_blocks)} blocks of the 4 held-out scenes",
              "rows": rows, "wall_s": time.time() - t_start}
    output_dir = output_dir or OUTPUT_DIRS[mode]
    cols = ["model", "params", "params_ratio", "layers", "hidden", "intermediate", "test_ppl", "prefill_tok_s",
            "prefill_speedup", "generate_tok_s", "generate_speedup"]
    table = print_table(rows, cols)
    write_results(output_dir, "structured_lm", result,
                  f"{result['data']}; mode `{mode}` {cfg}; distillation lr 2e-4 cosine, forward KL T=1 from the "
                  f"unpruned model; {time.strftime('%Y-%m-%d')}, {result['wall_s'] / 60:.0f} min on CPU.\n\n{table}\n")
    shutil.rmtree(work, ignore_errors=True)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--output-dir", default=None)
    a = parser.parse_args(argv)
    run("quick" if a.quick else "full", a.output_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
