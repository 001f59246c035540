"""CPU runtimes side by side on the real MiniLM-L6 / Rotten Tomatoes: the peers a user would pick (PyTorch fp32,
PyTorch dynamic int8 `torch.ao`, ONNX Runtime fp32 and dynamic int8 of the unpruned fine-tune, what an optimum user
gets) and ours (structured pruning + distillation from the fine-tune, exported with `--format onnx`).

Two phases. `train` fine-tunes the baseline and distils each structured student from it; the checkpoints are cached
under `~/.cache/hf_compress/benchmarks/runtime-<settings>` (a run with the same settings reuses them). `measure` then
measures every row in ONE process, on the same threads and the same held-out rows: accuracy on the first 2,000 test
rows, median batch-1 and batch-32 latency (texts padded to the longest of their batch) with ratios to PyTorch fp32,
and bytes of the weights file. Goals (issue #22): a variant <= 0.33x batch-32 latency within 1.0 point, and a
variant >= 10x smaller within 1.0 point, each beating the peers' best row at equal accuracy.

    python -m benchmarks.runtime            # both phases: benchmarks/results/runtime.{json,md,png}
    python -m benchmarks.runtime --quick    # a few steps of everything, into benchmarks/results-quick
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import tempfile
import time

from benchmarks.common import MAX_LENGTH, OUTPUT_DIRS, print_table, real_data, write_results

MODES = {"quick": dict(base_steps=30, student_steps=10, eval_rows=200, reps=5, calib_batches=2),
         "full": dict(base_steps=400, student_steps=1200, eval_rows=2000, reps=30, calib_batches=16)}
# The students get 1,200 distillation steps from the 400-step fine-tune, as `benchmarks.latency_target` does: at 400
# the QAT-exact int4 student was 10.1x smaller but 1.45 points down; 400 -> 1,200 gained 0.3-0.55 points there.
# Our students: name -> kept structures (fractions; `layers` a count of blocks), distilled from the fine-tune.
# BERT's hidden width cannot be pruned (LayerNorms, embeddings, pooler); the embedding table (11.7 M of MiniLM's
# 22.7 M weights) stays, so the size goal needs 4-bit weights: the second student trains with int4 QAT (last 25% of
# its steps) on the grid its ONNX int4 graph computes exactly (`QAT` column: bits, group size, embeddings too).
STUDENTS = {
    "FFN quartered": {"keep": {"ffn": 0.25}, "qat": None},
    "FFN quartered + 5 of 6 layers, int4 g128 QAT": {"keep": {"ffn": 0.25, "layers": 5},
                                                     "qat": {"bits": 4, "group_size": 128, "quantize_embeddings": True}},
}
LATENCY_GOAL, SIZE_GOAL, POINTS = 0.33, 10.0, 1.0


def cache_folder(cfg: dict) -> str:
    key = hashlib.sha256(json.dumps({**cfg, "students": STUDENTS, "v": 1}, sort_keys=True).encode()).hexdigest()[:12]
    return os.path.join(os.path.expanduser("~/.cache/hf_compress/benchmarks"), f"runtime-{key}")


def qat_arguments(spec: dict):
    from hf_compress.quantization import QuantizationArguments

    return QuantizationArguments(backend="compressed-tensors", **spec)


def train_models(cfg: dict, cache: str) -> dict:
    """Fine-tune the baseline and distil the structured students (or reuse them): name -> checkpoint folder."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from benchmarks.results import fine_tuned_base, train
    from benchmarks.structured import calibration_batches
    from hf_compress.atomic import write_text
    from hf_compress.callbacks import QATCallback
    from hf_compress.pruning.structured import structured_prune

    done = os.path.join(cache, "done.json")
    if os.path.exists(done):
        with open(done) as f:
            return json.load(f)
    os.makedirs(cache, exist_ok=True)
    tok, ds = real_data()
    work = tempfile.mkdtemp(prefix="hf_compress_bench_runtime_")
    t0 = time.time()
    base = fine_tuned_base(tok, ds["train"], cfg["base_steps"], work)
    folders = {"fine-tune": os.path.join(cache, "fine-tune")}
    base.save_pretrained(folders["fine-tune"])
    tok.save_pretrained(folders["fine-tune"])
    print(f"[{time.time() - t0:5.0f}s] fine-tuned baseline ({cfg['base_steps']} steps)", flush=True)
    calib = calibration_batches(tok, ds["train"], cfg["calib_batches"])
    for name, spec in STUDENTS.items():
        torch.manual_seed(0)
        student = AutoModelForSequenceClassification.from_pretrained(folders["fine-tune"])
        structured_prune(student, list(spec["keep"]), keep=spec["keep"], batches=calib)
        callbacks = [QATCallback(qat_arguments(spec["qat"]))] if spec["qat"] else []
        train(student, tok, ds["train"], cfg["student_steps"], f"{work}/run", teacher=base, callbacks=callbacks)
        folders[name] = os.path.join(cache, name.replace(" ", "_").replace("/", "-"))
        student.save_pretrained(folders[name])
        tok.save_pretrained(folders[name])
        print(f"[{time.time() - t0:5.0f}s] {name}: pruned and distilled ({cfg['student_steps']} steps)", flush=True)
    write_text(done, json.dumps(folders, indent=2))
    return folders


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


def _torch_predict(model):
    import torch

    def predict(feed):
        with torch.no_grad():
            return model(**{k: torch.from_numpy(v) for k, v in feed.items()}).logits.numpy()
    return predict


def _ort_predict(path: str, threads: int):
    import numpy as np
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    return lambda feed: sess.run(["logits"], {n: feed[n].astype(np.int64) for n in names})[0]


def _openvino_predict(path: str, threads: int, mode: str, calibration=None):
    """An OpenVINO model compiled for the CPU from the same ONNX graph: `fp32` as read, `int8 weights` (NNCF weight
    compression, int8 per channel, activations fp32) or `static int8` (NNCF post-training quantization with
    `calibration` batches: int8 activations and weights, OpenVINO's int8 compute path). Returns (predict, model)."""
    import nncf
    import numpy as np
    import openvino as ov

    core = ov.Core()
    model = core.read_model(path)
    names = [i.get_any_name() for i in model.inputs]
    if mode == "int8 weights":
        model = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM)
    elif mode == "static int8":
        feeds = [{n: feed[n].astype(np.int64) for n in names} for feed, _ in calibration]
        model = nncf.quantize(model, nncf.Dataset(feeds), model_type=nncf.ModelType.TRANSFORMER, subset_size=len(feeds))
    compiled = core.compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32"})
    request, out = compiled.create_infer_request(), compiled.output("logits")
    return (lambda feed: request.infer({n: feed[n].astype(np.int64) for n in names})[out]), model


def _openvino_bytes(model, folder: str) -> int:
    """Bytes of the OpenVINO IR (`.xml` + `.bin`) `ov.save_model` writes, without fp16 compression."""
    import openvino as ov

    os.makedirs(folder, exist_ok=True)
    ov.save_model(model, os.path.join(folder, "model.xml"), compress_to_fp16=False)
    return sum(os.path.getsize(os.path.join(folder, f)) for f in ("model.xml", "model.bin"))


def _torch_dynamic_int8(model) -> tuple[object, int]:
    import torch
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear
    from torch.ao.quantization import quantize_dynamic

    qmodel = quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    # Bytes of what it holds (it has no file format): int8 packed Linear weights + fp32 biases + a scale and zero
    # point per packed Linear, and the float parameters left.
    packed = sum(m.weight().numel() + 4 * (m.bias().numel() if m.bias() is not None else 0) + 8
                 for m in qmodel.modules() if isinstance(m, DynamicLinear))
    return qmodel, packed + sum(p.numel() * p.element_size() for p in qmodel.parameters())


def measure(cfg: dict, folders: dict, threads: int) -> list[dict]:
    """Every row, in this one process."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from hf_compress.quantization.onnx import export_onnx, op_counts

    torch.set_num_threads(threads)
    tok = AutoTokenizer.from_pretrained(folders["fine-tune"])
    _, ds = real_data(max_eval=cfg["eval_rows"])
    test = ds["test"].select(range(min(cfg["eval_rows"], len(ds["test"]))))
    eval_batches = _batches(tok, test, 64)
    reps = cfg["reps"]
    latency = {"batch-1 s": _batches(tok, test.select(range(min(reps + 1, len(test)))), 1),
               "batch-32 s": _batches(tok, test.select(range(min(32 * (reps + 1), len(test)))), 32)}
    calibration = _batches(tok, ds["train"].shuffle(seed=0).select(range(128)), 32)  # OpenVINO static int8 only
    work = tempfile.mkdtemp(prefix="hf_compress_bench_runtime_measure_")
    rows = []

    def add(row, predict):
        t0 = time.time()
        rows.append({**row, **_measure(predict, eval_batches, latency, reps)})
        print(f"  {row['row']}: accuracy {rows[-1]['accuracy']:.4f}, batch-32 {rows[-1]['batch-32 s'] * 1e3:.1f} ms, "
              f"{row['bytes'] / 1e6:.2f} MB ({time.time() - t0:.0f}s)", flush=True)

    def openvino_rows(fp32_graph: str, who: str, label: str, modes):
        for mode in modes:
            predict, ov_model = _openvino_predict(fp32_graph, threads, mode, calibration=calibration)
            ir = os.path.join(work, f"{label}-openvino-{mode}".replace(" ", "_").replace(",", ""))
            add({"row": f"{label} -> OpenVINO {mode}", "who": who, "bytes": _openvino_bytes(ov_model, ir)}, predict)

    def onnx_rows(model, who: str, label: str, variants):
        for quantize, emb, kind, *qargs in variants:
            folder = os.path.join(work, f"{label}-{kind}".replace(" ", "_").replace(",", ""))
            info = export_onnx(model, folder, tok, "sequence-classification", quantize=quantize, quantize_embeddings=emb,
                               args=qargs[0] if qargs else None)
            path = os.path.join(folder, "model.onnx")
            ops = op_counts(path)
            add({"row": f"{label} -> ONNX Runtime {kind}", "who": who, "bytes": os.path.getsize(path),
                 "max |logit diff| to torch": info["max_abs_logit_diff"],
                 "max |logit diff| to QAT model": info.get("max_abs_logit_diff_fake_quantized"),
                 "int8 MatMulInteger": ops["int8_ops"].get("MatMulInteger", 0),
                 "int4 MatMulNBits": ops.get("int4_ops", {}).get("MatMulNBits", 0)}, _ort_predict(path, threads))

    base = AutoModelForSequenceClassification.from_pretrained(folders["fine-tune"]).eval()
    base_bytes = os.path.getsize(os.path.join(folders["fine-tune"], "model.safetensors"))
    add({"row": "fine-tune, PyTorch fp32 (baseline)", "who": "peer", "bytes": base_bytes}, _torch_predict(base))
    try:
        qmodel, qbytes = _torch_dynamic_int8(base)
        add({"row": "fine-tune, PyTorch dynamic int8 (torch.ao)", "who": "peer", "bytes": qbytes}, _torch_predict(qmodel))
    except Exception as err:  # removed or broken in this torch: say so in the table
        rows.append({"row": "fine-tune, PyTorch dynamic int8 (torch.ao)", "who": "peer",
                     "error": f"{type(err).__name__}: {str(err)[:80]}"})
    onnx_rows(base, "peer", "fine-tune", ((False, False, "fp32"), (True, False, "dynamic int8")))
    # OpenVINO on the same fp32 graph (optimum-intel does not install with our pins; `openvino` and `nncf` do).
    # Static int8 calibrates on 4 batches of 32 training rows.
    openvino_rows(os.path.join(work, "fine-tune-fp32", "model.onnx"), "peer", "fine-tune",
                  ("fp32", "int8 weights", "static int8"))
    for name in [n for n in STUDENTS if n in folders]:
        student = AutoModelForSequenceClassification.from_pretrained(folders[name]).eval()
        label = f"{name}, distilled"
        add({"row": f"{label}, PyTorch fp32", "who": "ours",
             "bytes": os.path.getsize(os.path.join(folders[name], "model.safetensors"))}, _torch_predict(student))
        variants = [(True, False, "dynamic int8"), (True, True, "dynamic int8, embeddings too")]
        if STUDENTS[name]["qat"]:  # the int4 graph its QAT trained for: MatMulNBits / GatherBlockQuantized, exact
            spec = STUDENTS[name]["qat"]
            variants.append((True, spec["quantize_embeddings"], f"int4 g{spec['group_size']} (QAT-exact"
                             f"{', embeddings too' if spec['quantize_embeddings'] else ''})", qat_arguments(spec)))
        onnx_rows(student, "ours", label, variants)
        if not STUDENTS[name]["qat"]:  # the same student in the other runtime (the choice of ONNX Runtime, measured)
            onnx_rows(student, "ours", label, [(False, False, "fp32")])
            openvino_rows(os.path.join(work, f"{label}-fp32".replace(" ", "_").replace(",", ""), "model.onnx"), "ours",
                          label, ("static int8",))
    return rows


def summarize(rows: list[dict]) -> dict:
    base = rows[0]
    for r in rows:
        if "accuracy" in r:
            r["batch-1 x"] = r["batch-1 s"] / base["batch-1 s"]
            r["batch-32 x"] = r["batch-32 s"] / base["batch-32 s"]
            r["size x smaller"] = base["bytes"] / r["bytes"]
            r["accuracy points vs fp32"] = 100 * (r["accuracy"] - base["accuracy"])
    ok = [r for r in rows if "accuracy" in r and r["accuracy points vs fp32"] >= -POINTS]
    peers = [r for r in ok if r["who"] == "peer"]
    best_peer_latency = min(r["batch-32 x"] for r in peers)
    best_peer_size = max(r["size x smaller"] for r in peers)
    fast = [r["row"] for r in ok if r["batch-32 x"] <= LATENCY_GOAL and r["who"] == "ours"]
    small = [r["row"] for r in ok if r["size x smaller"] >= SIZE_GOAL and r["who"] == "ours"]
    ours = [r for r in ok if r["who"] == "ours"]
    return {
        "within 1 point": [r["row"] for r in ok],
        "latency goal (<= 0.33x batch-32 within 1 point) met by": fast,
        "size goal (>= 10x smaller within 1 point) met by": small,
        "peers' best batch-32 x within 1 point": best_peer_latency,
        "peers' best size x within 1 point": best_peer_size,
        "ours' best batch-32 x within 1 point": min((r["batch-32 x"] for r in ours), default=None),
        "ours' best size x within 1 point": max((r["size x smaller"] for r in ours), default=None),
    }


def plot(rows: list[dict], path: str) -> None:
    """Accuracy vs batch-32 latency and accuracy vs size, peers and ours."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, key, label in ((axes[0], "batch-32 x", "batch-32 latency (x PyTorch fp32)"),
                           (axes[1], "size x smaller", "times smaller than PyTorch fp32")):
        for who, marker in (("peer", "o"), ("ours", "^")):
            pts = [r for r in rows if r.get("who") == who and "accuracy" in r]
            ax.scatter([r[key] for r in pts], [100 * r["accuracy"] for r in pts], marker=marker, label=who)
            for r in pts:
                ax.annotate(r["row"].replace(" -> ONNX Runtime", "\n->ORT"), (r[key], 100 * r["accuracy"]), fontsize=6)
        ax.axhline(100 * rows[0]["accuracy"] - POINTS, color="grey", linestyle=":", linewidth=1)
        ax.set_xlabel(label)
        ax.set_ylabel("accuracy (%)")
        ax.legend()
    fig.suptitle("MiniLM-L6 / Rotten Tomatoes, 2 CPU threads (dotted: 1 point under the baseline)")
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, path)


def main(argv=None) -> int:
    import nncf
    import onnxruntime as ort
    import openvino as ov
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few steps of everything, 200 rows")
    parser.add_argument("--phase", choices=("train", "measure", "all"), default="all")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--output-dir", default=None)
    a = parser.parse_args(argv)
    mode = "quick" if a.quick else "full"
    cfg = MODES[mode]
    cache = cache_folder(cfg)
    t0 = time.time()
    if a.phase == "measure" and not os.path.exists(os.path.join(cache, "done.json")):
        # Measure what the train phase finished so far (the fine-tune and the students already distilled).
        folders = {n: os.path.join(cache, n.replace(" ", "_").replace("/", "-")) for n in ("fine-tune", *STUDENTS)}
        folders = {n: f for n, f in folders.items() if os.path.exists(os.path.join(f, "config.json"))}
        print(f"Measuring the finished checkpoints only: {', '.join(folders)}", flush=True)
    else:
        folders = train_models(cfg, cache)
    if a.phase == "train":
        return 0
    threads = a.threads or os.cpu_count()
    rows = measure(cfg, folders, threads)
    summary = summarize(rows)
    result = {"settings": {"mode": mode, **cfg, "threads": threads, "max_length": MAX_LENGTH, "torch": torch.__version__,
                           "onnxruntime": ort.__version__, "openvino": ov.__version__,
                           "nncf": nncf.__version__, "students": STUDENTS,
                           "model": "MiniLM-L6 (all-MiniLM-L6-v2) + new head", "dataset": "rotten_tomatoes",
                           "distillation": "T=2, alpha=0.9, lr 1e-4, batch 16, from the fine-tune (benchmarks.results.train)"},
              "rows": rows, "summary": summary, "measure_wall_s": time.time() - t0}
    out = a.output_dir or OUTPUT_DIRS[mode]
    os.makedirs(out, exist_ok=True)
    s = result["settings"]
    head = (f"MiniLM-L6 / Rotten Tomatoes: fine-tune {s['base_steps']} steps, students distilled {s['student_steps']} steps; "
            f"{s['eval_rows']} test rows, median of {s['reps']} batches, {threads} threads, torch {s['torch']}, "
            f"onnxruntime {s['onnxruntime']}, openvino {s['openvino']}, nncf {s['nncf']}; every row measured in one process.\n\n")
    table = print_table(rows, ["row", "who", "accuracy", "accuracy points vs fp32", "batch-1 x", "batch-32 s",
                               "batch-32 x", "bytes", "size x smaller", "max |logit diff| to torch",
                               "max |logit diff| to QAT model", "int8 MatMulInteger", "int4 MatMulNBits", "error"])
    lines = "\n".join(f"- {k}: {v}" for k, v in summary.items())
    write_results(out, "runtime", result, head + table + "\n\n" + lines + "\n")
    plot(rows, os.path.join(out, "runtime.png"))
    print(lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
