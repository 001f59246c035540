"""Structured (Minitron-style) pruning + distillation on the real MiniLM-L6 and Rotten Tomatoes, side by side.

One run fine-tunes the fp32 baseline (as `benchmarks.results`), then for each structured variant: scores FFN neurons
and blocks from activations on calibration batches of the train split, removes them physically, distils the pruned
model from the baseline (the unpruned model is the teacher), and measures accuracy on the first 2,000 rows of the fixed
test split, bytes on disk and CPU latency at batch 1 and 32 against the baseline measured in the same process. The
last rows are 4-bit exports (Linear layers and the embeddings, `quantize_and_save`: bitsandbytes NF4, and
compressed-tensors int4 with one scale per 32 or per 128 weights, which plain `from_pretrained` loads) of the baseline and of
the pruned students, to find the recipe that is >= 8x smaller than the fp32 fine-tune within 1.0 point of it.

    python -m benchmarks.structured           # writes benchmarks/results/structured.{json,md} (about 20 min on 2 cores)
    python -m benchmarks.structured --short   # 200 / 100 steps, 2 variants (what a loaded shared machine finishes)
    python -m benchmarks.structured --quick   # a few steps of everything, into benchmarks/results-quick
"""

from __future__ import annotations

import argparse
import copy
import shutil
import tempfile
import time

from benchmarks.common import OUTPUT_DIRS, print_table, real_data, weight_bytes, write_results
from benchmarks.results import accuracy, fine_tuned_base, latency, num_params, train

MODES = {
    "quick": dict(base_steps=20, student_steps=6, eval_rows=64, reps=2, calib_batches=2),
    "full": dict(base_steps=400, student_steps=400, eval_rows=2000, reps=10, calib_batches=16),
    # What a shared, loaded 2-core machine finishes in under an hour: fewer training steps, same 2,000 test rows.
    "short": dict(base_steps=200, student_steps=100, eval_rows=2000, reps=5, calib_batches=8),
}
# name -> kept structures (fractions of FFN neurons per layer, number of blocks)
VARIANTS = {
    "FFN halved": {"ffn": 0.5},
    "FFN halved + 4 of 6 layers": {"ffn": 0.5, "layers": 4},
    "FFN quartered": {"ffn": 0.25},
}
SHORT_VARIANTS = ("FFN halved", "FFN halved + 4 of 6 layers")
# The candidate for the goal: a structured student distilled with quantization-aware training that replays the
# int4 export's numerics (`QATCallback`, last `qat_fraction` of the steps), then exported in that format.
RECIPE = ("FFN quartered", {"ffn": 0.25}, "int4 g32 compressed-tensors (embeddings too)")
GOAL = ">= 8x smaller on disk than the fp32 fine-tune, accuracy within 1.0 point of it"


def calibration_batches(tok, train_set, n: int, batch_size: int = 32, seed: int = 0):
    from transformers import DataCollatorWithPadding

    rows = train_set.shuffle(seed=seed + 1).select(range(min(len(train_set), n * batch_size)))
    rows = rows.select_columns([c for c in rows.column_names if c in ("input_ids", "attention_mask", "token_type_ids", "label")])
    collate = DataCollatorWithPadding(tok)
    return [collate([rows[j] for j in range(i, min(i + batch_size, len(rows)))]) for i in range(0, len(rows), batch_size)]


def run(mode: str = "quick", output_dir: str | None = None, base_model: str | None = None, keep_base: str | None = None,
        recipe_only: bool = False) -> dict:
    import torch
    from transformers import AutoModelForSequenceClassification

    from hf_compress.callbacks import QATCallback
    from hf_compress.pruning.structured import structured_prune
    from hf_compress.quantization import QuantizationArguments, load_quantized, quantize_and_save

    cfg = MODES[mode]
    tok, ds = real_data(max_eval=cfg["eval_rows"])
    test = ds["test"]
    texts = tok.batch_decode(test["input_ids"][:32], skip_special_tokens=True)
    work = tempfile.mkdtemp(prefix="hf_compress_bench_structured_")
    rows, t_start = [], time.time()
    torch.set_num_threads(torch.get_num_threads())

    def record(name, model, folder, eval_model=None, note=""):
        m = eval_model if eval_model is not None else model
        row = {"variant": name, "accuracy": accuracy(m, tok, test), "bytes": weight_bytes(folder), "params": num_params(model),
               "latency_b1_s": latency(m, tok, texts, 1, cfg["reps"]), "latency_b32_s": latency(m, tok, texts, 32, cfg["reps"]),
               "note": note}
        rows.append(row)
        print(f"[{time.time() - t_start:6.0f}s] {name}: accuracy {row['accuracy']:.4f}, {row['bytes'] / 1e6:.2f} MB, "
              f"{row['params'] / 1e6:.2f} M params", flush=True)
        return row

    base = fine_tuned_base(tok, ds["train"], cfg["base_steps"], work, base_model)
    if keep_base:
        base.save_pretrained(keep_base)
    record("fp32 fine-tuned (baseline)", base, f"{work}/fp32", note="baseline")

    def fresh_base():
        return AutoModelForSequenceClassification.from_pretrained(f"{work}/fp32")

    calib = calibration_batches(tok, ds["train"], cfg["calib_batches"])
    plans, students = {}, {}
    for name, keep in VARIANTS.items():
        if recipe_only or (mode == "short" and name not in SHORT_VARIANTS):
            continue
        student = fresh_base()
        plan = structured_prune(student, list(keep), keep=keep, batches=calib)
        plans[name] = {"keep": keep, **{k: v for k, v in plan.to_dict().items() if k in ("layers",)},
                       "scores": {k: v for k, v in plan.to_dict()["scores"].items() if k in ("layers", "method")}}
        folder = f"{work}/{name.replace(' ', '_')}"
        student.save_pretrained(folder + "-oneshot")
        record(f"{name}, pruned, no retraining", student, folder + "-oneshot", note="structured one-shot")
        train(student, tok, ds["train"], cfg["student_steps"], f"{work}/run", teacher=base)
        student.save_pretrained(folder)
        record(f"{name}, distilled", student, folder, note="structured + distilled")
        students[name] = student

    formats = {
        "4-bit NF4 (embeddings too)": QuantizationArguments(bits=4, quant_type="nf4", quantize_embeddings=True),
        "int4 g32 compressed-tensors (embeddings too)": QuantizationArguments(
            backend="compressed-tensors", bits=4, group_size=32, quantize_embeddings=True),
        # One scale per 128 weights: a quarter of g32's scale bytes (0.125 instead of 0.5 bits per weight).
        "int4 g128 compressed-tensors (embeddings too)": QuantizationArguments(
            backend="compressed-tensors", bits=4, group_size=128, quantize_embeddings=True),
    }

    def quantized(name, model, label, qargs):
        folder = f"{work}/q4-{len(rows)}"
        quantize_and_save(copy.deepcopy(model), folder, qargs, tokenizer=tok)
        loaded = (load_quantized(folder) if qargs.backend == "bitsandbytes"
                  else AutoModelForSequenceClassification.from_pretrained(folder))  # plain transformers
        row = record(f"{name} -> {label}", model, folder, eval_model=loaded, note=label)
        row["params"] = num_params(model)

    for label, qargs in formats.items():
        if recipe_only:
            break
        quantized("fp32 baseline", fresh_base(), label, qargs)
        for name, student in students.items():
            quantized(f"{name}, distilled", student, label, qargs)

    name, keep, label = RECIPE
    student = fresh_base()
    structured_prune(student, list(keep), keep=keep, batches=calib)
    train(student, tok, ds["train"], cfg["student_steps"], f"{work}/run", teacher=base,
          callbacks=[QATCallback(formats[label])])
    quantized(f"{name}, distilled with int4 QAT (last 25% of steps)", student, label, formats[label])

    base_row = rows[0]
    for r in rows:
        r["ratio_to_baseline"] = base_row["bytes"] / r["bytes"]
        r["accuracy_delta_pts"] = 100 * (r["accuracy"] - base_row["accuracy"])
        r["latency_ratio_b1"] = r["latency_b1_s"] / base_row["latency_b1_s"]
        r["latency_ratio_b32"] = r["latency_b32_s"] / base_row["latency_b32_s"]
        r["meets_goal"] = r["ratio_to_baseline"] >= 8 and r["accuracy_delta_pts"] >= -1.0
    met = [r["variant"] for r in rows if r["meets_goal"]]
    result = {
        "mode": mode, "settings": cfg, "goal": GOAL, "goal_met_by": met, "plans": plans, "rows": rows,
        "data": f"Rotten Tomatoes (shipped): train split; accuracy on the first {cfg['eval_rows']} rows of the fixed test split",
        "wall_s": time.time() - t_start,
    }
    output_dir = output_dir or OUTPUT_DIRS[mode]
    cols = ["variant", "accuracy", "accuracy_delta_pts", "bytes", "params", "ratio_to_baseline", "latency_ratio_b1",
            "latency_ratio_b32", "meets_goal"]
    table = print_table(rows, cols)
    summary = f"Goal ({GOAL}): " + (f"met by {', '.join(met)}." if met else "not met by any row.")
    print(summary)
    write_results(output_dir, "structured", result,
                  f"{result['data']}; mode `{mode}` {cfg}; batch 16, distillation T=2, alpha=0.9 from the baseline; "
                  f"{time.strftime('%Y-%m-%d')}, {result['wall_s'] / 60:.0f} min on CPU.\n\n{table}\n\n{summary}\n")
    shutil.rmtree(work, ignore_errors=True)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few steps of everything (minutes, not the published figures)")
    parser.add_argument("--output-dir", default=None)
    parser.add_argument("--short", action="store_true", help="200 baseline / 100 distillation steps, 2 variants, 2,000 test rows")
    parser.add_argument("--base-model", default=None, help="an already fine-tuned checkpoint to use as the fp32 baseline")
    parser.add_argument("--keep-base", default=None, help="also save the fine-tuned baseline there (reuse with --base-model)")
    parser.add_argument("--recipe-only", action="store_true", help="only the baseline and the QAT recipe (RECIPE)")
    a = parser.parse_args(argv)
    mode = "quick" if a.quick else "short" if a.short else "full"
    run(mode, a.output_dir or (OUTPUT_DIRS["full"] if mode == "short" else None), base_model=a.base_model, keep_base=a.keep_base,
        recipe_only=a.recipe_only)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
