"""The compression results table on the real MiniLM-L6 and the shipped Rotten Tomatoes data.

For each variant: held-out accuracy, on-disk bytes of the weights, ratio to the fp32 baseline, bits per
weight, and CPU inference latency ratio to the baseline at batch 1 and batch 32. Writes `results.json`,
`results.md` and `accuracy_vs_size.png` to `--output-dir` (default `benchmarks/results`, the published files shown in
the README; `benchmarks/results-quick` with `--quick`).

    python -m benchmarks.results            # the full table published in the README
    python -m benchmarks.results --quick    # a few steps of everything (what the test runs)
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import statistics
import tempfile
import time

from benchmarks.common import OUTPUT_DIRS, print_table, real_data, weight_bytes, write_text

GOAL = "combined checkpoint >= 8x smaller than the fp32 baseline with accuracy within 1.0 point of it"
MODES = {
    # steps of each training stage, rows of the fixed `test` split evaluated, latency repetitions
    "quick": dict(base_steps=30, student_steps=6, prune_steps=8, qat_steps=4, eval_rows=64, reps=2),
    "full": dict(base_steps=400, student_steps=400, prune_steps=250, qat_steps=100, eval_rows=2000, reps=10),
}
BATCH = 16


def num_params(model) -> int:
    seen = {}
    for p in model.parameters():
        seen[p.data_ptr()] = p.numel()
    return sum(seen.values())


def train(model, tok, train_set, steps, out, callbacks=(), teacher=None, lr=1e-4, seed=0):
    """Fine-tune (or distil, with `teacher`) `model` in place for `steps` optimizer steps."""
    import torch
    from transformers import DataCollatorWithPadding, Trainer

    from hf_compress.distillation import DistillationArguments
    from hf_compress.trainers import DistillationTrainer

    torch.manual_seed(seed)
    # Exactly the rows the steps consume (one pass): the teacher-logit cache then covers no unused row.
    train_set = train_set.shuffle(seed=seed).select(range(min(len(train_set), steps * BATCH)))
    args = DistillationArguments(
        output_dir=out, max_steps=steps, per_device_train_batch_size=BATCH, learning_rate=lr,
        warmup_steps=max(1, steps // 10), report_to="none", save_strategy="no", use_cpu=True, seed=seed,
        disable_tqdm=True, temperature=2.0, alpha=0.9, cache_teacher_logits=teacher is not None,
    )
    common = dict(model=model, args=args, train_dataset=train_set, data_collator=DataCollatorWithPadding(tok),
                  callbacks=list(callbacks))
    trainer = DistillationTrainer(teacher_model=teacher, **common) if teacher is not None else Trainer(**common)
    trainer.train()
    return model


def fine_tuned_base(tok, train_set, steps: int, work: str, base_model: str | None = None):
    """The fp32 baseline, saved in `<work>/fp32`: the pretrained MiniLM-L6 fine-tuned `steps` steps on `train_set`
    (seed 0), or the already fine-tuned checkpoint `base_model`."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from hf_compress.models import default_model_path

    torch.manual_seed(0)
    if base_model is None:
        base = AutoModelForSequenceClassification.from_pretrained(default_model_path(), num_labels=2)
        train(base, tok, train_set, steps, f"{work}/base-run")
    else:
        base = AutoModelForSequenceClassification.from_pretrained(base_model)
    base.save_pretrained(f"{work}/fp32")
    return base


def accuracy(model, tok, test_set) -> float:
    """Held-out accuracy through the sequence-classification task's one evaluation loop."""
    from hf_compress.model_cards import evaluate_classifier

    return evaluate_classifier(model, test_set, tok, ("accuracy",))["accuracy"]


def latency(model, tok, texts, batch_size: int, reps: int) -> float:
    """Median seconds of one forward pass over `batch_size` texts (after one warm-up)."""
    import torch

    enc = tok(texts[:batch_size], padding=True, truncation=True, max_length=48, return_tensors="pt")
    model.eval()
    times = []
    with torch.no_grad():
        model(**enc)
        for _ in range(reps):
            t0 = time.perf_counter()
            model(**enc)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run(mode: str = "quick", output_dir: str | None = None, base_model: str | None = None) -> dict:
    """Build every variant and write the table. `base_model`: an already fine-tuned checkpoint to use as the
    fp32 baseline instead of fine-tuning the pretrained MiniLM-L6 for `base_steps` steps."""
    from transformers import AutoModelForSequenceClassification

    from hf_compress.callbacks import GradualPruningCallback, QATCallback
    from hf_compress.distillation import layer_dropped_student
    from hf_compress.pruning import save_compressed, sparsity_stats
    from hf_compress.quantization import QuantizationArguments, load_quantized, quantize_and_save

    cfg = MODES[mode]
    tok, ds = real_data(max_eval=cfg["eval_rows"])
    test, texts = ds["test"], ds["test"]["input_ids"]
    texts = tok.batch_decode(texts[:32], skip_special_tokens=True)
    work = tempfile.mkdtemp(prefix="hf_compress_bench_")
    rows = []
    t_start = time.time()

    def record(name, model, folder, eval_model=None, params=None, note=""):
        m = eval_model if eval_model is not None else model
        row = {
            "variant": name,
            "accuracy": accuracy(m, tok, test),
            "bytes": weight_bytes(folder),
            "params": params or num_params(model),
            "sparsity": sparsity_stats(model).get("global_sparsity", 0.0) if note.startswith("pruned") else 0.0,
            "latency_b1_s": latency(m, tok, texts, 1, cfg["reps"]),
            "latency_b32_s": latency(m, tok, texts, 32, cfg["reps"]),
            "note": note,
        }
        rows.append(row)
        print(f"[{time.time() - t_start:6.0f}s] {name}: accuracy {row['accuracy']:.4f}, {row['bytes'] / 1e6:.1f} MB", flush=True)
        return row

    # 1. fp32 baseline: the pretrained MiniLM-L6 fine-tuned on the train split.
    base = fine_tuned_base(tok, ds["train"], cfg["base_steps"], work, base_model)

    def fresh_base():
        # A trainable copy of the baseline: distillation freezes its teacher (`base`) in place.
        return AutoModelForSequenceClassification.from_pretrained(f"{work}/fp32")

    base_params = num_params(base)
    record("fp32 fine-tuned (baseline)", base, f"{work}/fp32", note="baseline")

    # 2. Distilled 3-layer student (layers 0, 2, 4 of the baseline), teacher logits cached.
    student = layer_dropped_student(base, [0, 2, 4])
    train(student, tok, ds["train"], cfg["student_steps"], f"{work}/student-run", teacher=base)
    student.save_pretrained(f"{work}/student")
    record("distilled 3-layer student", student, f"{work}/student", note="distilled")

    # 3. Gradual magnitude pruning of the encoder's Linear weights, saved as bitmask + nonzero values.
    for sparsity in (0.5, 0.8, 0.9):
        pruned = fresh_base()
        cb = GradualPruningCallback(target_sparsity=sparsity, end_fraction=0.7, frequency=max(1, cfg["prune_steps"] // 20))
        train(pruned, tok, ds["train"], cfg["prune_steps"], f"{work}/prune-run", callbacks=[cb])
        save_compressed(pruned, f"{work}/pruned-{sparsity}")
        record(f"pruned {int(sparsity * 100)}% (bitmask format)", pruned, f"{work}/pruned-{sparsity}", note=f"pruned {sparsity}")

    # 4. Post-training bitsandbytes quantization; accuracy of the reloaded checkpoint.
    def quantized(name, model, folder, qargs):
        quantize_and_save(copy.deepcopy(model), folder, qargs, tokenizer=tok)
        reloaded = load_quantized(folder)  # from_pretrained, plus the low-bit embeddings if any
        record(name, model, folder, eval_model=reloaded, params=num_params(model), note=f"{qargs.bits}-bit")

    quantized("8-bit LLM.int8 (PTQ)", base, f"{work}/int8", QuantizationArguments(bits=8))
    quantized("4-bit NF4 (PTQ)", base, f"{work}/nf4", QuantizationArguments(bits=4, quant_type="nf4"))

    # 5. Quantization-aware fine-tuning with bnb's NF4 numerics, then the same export.
    qat_args = QuantizationArguments(bits=4, quant_type="nf4", qat_fraction=1.0)
    qat = fresh_base()
    train(qat, tok, ds["train"], cfg["qat_steps"], f"{work}/qat-run", callbacks=[QATCallback(qat_args)], lr=2e-5)
    quantized("4-bit NF4 after QAT", qat, f"{work}/qat-nf4", qat_args)

    # 6. Combined: distilled student, pruned 50% and quantization-aware fine-tuned, exported in 4 bits with
    #    4-bit embeddings (the word embedding is most of a small encoder).
    combo_args = QuantizationArguments(bits=4, quant_type="nf4", quantize_embeddings=True, qat_fraction=0.5)
    combo = copy.deepcopy(student)
    cb = GradualPruningCallback(target_sparsity=0.5, end_fraction=0.5, frequency=max(1, cfg["prune_steps"] // 20))
    train(combo, tok, ds["train"], cfg["prune_steps"], f"{work}/combo-run", callbacks=[cb, QATCallback(combo_args)], teacher=base)
    quantized("distil + prune 50% + 4-bit (embeddings too)", combo, f"{work}/combined", combo_args)

    base_row = rows[0]
    for r in rows:
        r["ratio_to_baseline"] = base_row["bytes"] / r["bytes"]
        r["bits_per_weight"] = 8 * r["bytes"] / r["params"]
        r["accuracy_delta_pts"] = 100 * (r["accuracy"] - base_row["accuracy"])
        r["latency_ratio_b1"] = r["latency_b1_s"] / base_row["latency_b1_s"]
        r["latency_ratio_b32"] = r["latency_b32_s"] / base_row["latency_b32_s"]
    combined = rows[-1]
    goal_met = combined["ratio_to_baseline"] >= 8 and combined["accuracy_delta_pts"] >= -1.0
    result = {
        "mode": mode,
        "settings": cfg,
        "data": f"Rotten Tomatoes (shipped), train split; accuracy on the first {cfg['eval_rows']} rows of the fixed test split",
        "base_params": base_params,
        "goal": GOAL,
        "goal_met": goal_met,
        "rows": rows,
        "wall_s": time.time() - t_start,
    }
    output_dir = output_dir or OUTPUT_DIRS[mode]
    os.makedirs(output_dir, exist_ok=True)
    cols = ["variant", "accuracy", "accuracy_delta_pts", "bytes", "ratio_to_baseline", "bits_per_weight",
            "latency_ratio_b1", "latency_ratio_b32"]
    table = print_table(rows, cols)
    summary = f"Goal: {GOAL}: {'met' if goal_met else 'not met'} (combined: {combined['ratio_to_baseline']:.2f}x smaller, {combined['accuracy_delta_pts']:+.1f} points)."
    print(summary)
    write_text(os.path.join(output_dir, "results.json"), json.dumps(result, indent=2))
    write_text(os.path.join(output_dir, "results.md"), f"{result['data']}; mode `{mode}` {cfg}.\n\n{table}\n\n{summary}\n")
    plot(rows, os.path.join(output_dir, "accuracy_vs_size.png"))
    if mode == "full" and os.path.abspath(output_dir) == os.path.abspath(OUTPUT_DIRS["full"]):
        update_readme(f"{result['data']}; {cfg['base_steps']} fine-tuning steps for the baseline and the student, "
                      f"{cfg['prune_steps']} for each pruning run and the combined recipe, {cfg['qat_steps']} QAT steps, batch "
                      f"{BATCH}; {time.strftime('%Y-%m-%d')}, {result['wall_s'] / 60:.0f} min on CPU.\n\n{table}\n\n{summary}")
    shutil.rmtree(work, ignore_errors=True)
    return result


README_MARKERS = ("<!-- benchmarks.results: start -->", "<!-- benchmarks.results: end -->")


def update_readme(text: str, path: str = "README.md") -> None:
    """Replace the published table between the README's markers (the full run regenerates it)."""
    if not os.path.isfile(path):
        return
    with open(path) as f:
        readme = f.read()
    start, end = README_MARKERS
    if start not in readme or end not in readme:
        return
    head, rest = readme.split(start, 1)
    tail = rest.split(end, 1)[1]
    write_text(path, f"{head}{start}\n{text}\n{end}{tail}")


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        ax.scatter(r["bytes"] / 1e6, 100 * r["accuracy"], s=40)
        ax.annotate(r["variant"], (r["bytes"] / 1e6, 100 * r["accuracy"]), fontsize=7, xytext=(4, 2), textcoords="offset points")
    ax.set_xlabel("weights on disk (MB)")
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_title("MiniLM-L6 on Rotten Tomatoes: accuracy vs size")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few steps of everything (minutes, not the published figures)")
    parser.add_argument("--output-dir", default=None, help="default: benchmarks/results (full), benchmarks/results-quick (--quick)")
    parser.add_argument("--base-model", default=None, help="an already fine-tuned checkpoint to use as the fp32 baseline")
    a = parser.parse_args(argv)
    run("quick" if a.quick else "full", a.output_dir, base_model=a.base_model)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
