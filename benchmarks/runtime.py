"""CPU runtimes side by side on the real MiniLM-L6 / Rotten Tomatoes: PyTorch fp32, PyTorch dynamic int8
(`torch.ao.quantization.quantize_dynamic`), ONNX Runtime fp32 and ONNX Runtime dynamic int8 (`--format onnx`).

Every row comes from one run on the same fine-tuned model, the same threads and the same held-out rows: accuracy,
median batch-1 and batch-32 latency (texts padded to the longest of their batch) with ratios to PyTorch fp32, and
bytes. Usage: `python -m benchmarks.runtime [--quick] [--steps N] [--eval-rows N] [--threads N]`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

from benchmarks.common import MAX_LENGTH, OUTPUT_DIRS, print_table, real_data, scratch_dir, write_results


def _finetune(steps: int, batch_size: int = 32):
    import torch
    from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding, Trainer, TrainingArguments

    from hf_compress.models import default_model_path

    tok, ds = real_data(max_train=steps * batch_size)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(default_model_path(), num_labels=2)
    args = TrainingArguments(scratch_dir("runtime"), max_steps=steps, per_device_train_batch_size=batch_size,
                             learning_rate=5e-5, report_to="none", save_strategy="no", use_cpu=True, seed=0,
                             disable_tqdm=True)
    Trainer(model=model, args=args, train_dataset=ds["train"], data_collator=DataCollatorWithPadding(tok)).train()
    return tok, ds, model.eval()


def _batches(tok, rows, batch_size: int):
    """Padded numpy batches of the held-out texts (the runtime-independent input every row gets)."""
    cols = ["input_ids", "attention_mask", "token_type_ids"]
    out = []
    for i in range(0, len(rows), batch_size):
        part = rows.select(range(i, min(i + batch_size, len(rows))))
        feats = [{c: part[j][c] for c in cols if c in part.column_names} for j in range(len(part))]
        out.append((dict(tok.pad(feats, return_tensors="np")), part["label"]))
    return out


def _measure(predict, batches, latency_batches, reps: int) -> dict:
    """Accuracy over `batches` and the median seconds of `predict` on the first `reps` of `latency_batches`."""
    import numpy as np

    correct = total = 0
    for feed, labels in batches:
        correct += int((np.asarray(predict(feed)).argmax(-1) == np.asarray(labels)).sum())
        total += len(labels)
    times = {}
    for name, lb in latency_batches.items():
        predict(lb[0][0])  # warm-up (allocations, ORT's first-run planning)
        ts = []
        for feed, _ in lb[:reps]:
            t0 = time.perf_counter()
            predict(feed)
            ts.append(time.perf_counter() - t0)
        times[name] = statistics.median(ts)
    return {"accuracy": correct / total, **times}


def run(steps: int = 300, eval_rows: int = 2000, reps: int = 50, threads: int | None = None) -> dict:
    import numpy as np
    import onnxruntime as ort
    import torch

    from hf_compress.quantization.onnx import export_onnx, op_counts

    threads = threads or os.cpu_count()
    torch.set_num_threads(threads)
    tok, ds, model = _finetune(steps)
    test = ds["test"].select(range(min(eval_rows, len(ds["test"]))))
    eval_batches = _batches(tok, test, 64)
    latency = {"batch-1 s": _batches(tok, test.select(range(min(reps + 1, len(test)))), 1),
               "batch-32 s": _batches(tok, test.select(range(min(32 * (reps + 1), len(test)))), 32)}
    rows = []
    work = tempfile.mkdtemp(prefix="hf_compress_bench_runtime_")

    def torch_predict(m):
        def predict(feed):
            with torch.no_grad():
                return m(**{k: torch.from_numpy(v) for k, v in feed.items()}).logits.numpy()
        return predict

    model.save_pretrained(os.path.join(work, "torch-fp32"))
    size = sum(os.path.getsize(os.path.join(work, "torch-fp32", f)) for f in os.listdir(os.path.join(work, "torch-fp32"))
               if f.endswith(".safetensors"))
    rows.append({"row": "PyTorch fp32", "bytes": size, **_measure(torch_predict(model), eval_batches, latency, reps)})
    try:
        from torch.ao.quantization import quantize_dynamic

        qmodel = quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
        # Bytes of what it holds: int8 packed Linear weights + the float parameters left (no safetensors format).
        from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

        # int8 weight + fp32 bias + a scale and zero point per packed Linear.
        packed = sum(m.weight().numel() + 4 * (m.bias().numel() if m.bias() is not None else 0) + 8
                     for m in qmodel.modules() if isinstance(m, DynamicLinear))
        floats = sum(p.numel() * p.element_size() for p in qmodel.parameters())
        rows.append({"row": "PyTorch dynamic int8 (torch.ao)", "bytes": packed + floats,
                     **_measure(torch_predict(qmodel), eval_batches, latency, reps)})
    except Exception as err:  # removed or broken in this torch: say so in the table
        rows.append({"row": "PyTorch dynamic int8 (torch.ao)", "error": f"{type(err).__name__}: {str(err)[:80]}"})
    for quantize, name in ((False, "ONNX Runtime fp32"), (True, "ONNX Runtime dynamic int8 (--format onnx)")):
        folder = os.path.join(work, name.split()[2])
        info = export_onnx(model, folder, tok, "sequence-classification", quantize=quantize)
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        sess = ort.InferenceSession(os.path.join(folder, "model.onnx"), so, providers=["CPUExecutionProvider"])
        names = [i.name for i in sess.get_inputs()]

        def predict(feed, sess=sess, names=names):
            return sess.run(["logits"], {n: feed[n].astype(np.int64) for n in names})[0]

        rows.append({"row": name, "bytes": os.path.getsize(os.path.join(folder, "model.onnx")),
                     "max |logit diff| to torch": info["max_abs_logit_diff"],
                     "int8 MatMulInteger": op_counts(os.path.join(folder, "model.onnx"))["int8_ops"].get("MatMulInteger", 0),
                     **_measure(predict, eval_batches, latency, reps)})
    base = rows[0]
    for r in rows:
        if "accuracy" in r:
            r["batch-1 x"] = r["batch-1 s"] / base["batch-1 s"]
            r["batch-32 x"] = r["batch-32 s"] / base["batch-32 s"]
            r["size x smaller"] = base["bytes"] / r["bytes"]
            r["accuracy points vs fp32"] = 100 * (r["accuracy"] - base["accuracy"])
    return {"settings": {"model": "MiniLM-L6 (all-MiniLM-L6-v2) + new head", "dataset": "rotten_tomatoes",
                         "finetune_steps": steps, "eval_rows": len(test), "latency_reps": reps, "threads": threads,
                         "max_length": MAX_LENGTH, "torch": torch.__version__, "onnxruntime": ort.__version__},
            "rows": rows}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="30 steps, 200 rows, 10 latency repeats")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--eval-rows", type=int, default=None)
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--output-dir", default=None)
    a = parser.parse_args(argv)
    quick = dict(steps=30, eval_rows=200, reps=10) if a.quick else dict(steps=300, eval_rows=2000, reps=50)
    result = run(steps=a.steps or quick["steps"], eval_rows=a.eval_rows or quick["eval_rows"], reps=a.reps or quick["reps"],
                 threads=a.threads)
    s = result["settings"]
    head = (f"MiniLM-L6 / Rotten Tomatoes: {s['finetune_steps']} fine-tune steps, {s['eval_rows']} test rows, median of "
            f"{s['latency_reps']} batches, {s['threads']} threads, torch {s['torch']}, onnxruntime {s['onnxruntime']}.\n\n")
    table = print_table(result["rows"], ["row", "accuracy", "accuracy points vs fp32", "batch-1 s", "batch-1 x",
                                         "batch-32 s", "batch-32 x", "bytes", "size x smaller",
                                         "max |logit diff| to torch", "int8 MatMulInteger", "error"])
    write_results(a.output_dir or OUTPUT_DIRS["quick" if a.quick else "full"], "runtime", result, head + table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
