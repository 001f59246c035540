"""W4A16 int4 (group 64) on the real SmolLM2-135M: round-to-nearest, our GPTQ, llm-compressor's GPTQ (and AWQ).

    python -m benchmarks.lm_quantization [--quick] [--skip-llmcompressor] [--output-dir benchmarks/results]

Model: SmolLM2-135M-Instruct (`hf_compress.models.smollm2_path`), loaded in bf16; every quantized Linear of the 30
decoder layers gets int4 weights with one bf16 scale per 64 input columns (128 does not divide SmolLM2's 576), the
embedding (tied `lm_head`) stays bf16. Every row is a compressed-tensors `pack-quantized` folder on disk, reloaded
with plain `AutoModelForCausalLM.from_pretrained` (our transformers, compressed-tensors installed) and measured by
the same perplexity code (`benchmarks.lm_pruning.perplexity`).

Data: the shipped Hamlet, split by scene (`hf_compress.data.load_hamlet`). Held out: the 4 `test` scenes as one
contiguous token stream (scenes joined with EOS), cut into non-overlapping windows of `--eval-seq` tokens. Calibration
(every method gets the same): `--calib-blocks` blocks of `--calib-seq` tokens drawn (seeded) from the 16 `train`
scenes, never from the held-out ones.

Rows (one run): bf16; RTN (`quantize_and_save`, compressed-tensors, ours); our GPTQ (`hf_compress.quantization.gptq`) plain and
with act-order + MSE scales; ours with training (row c): the model distilled into itself under int4 g64 QAT
(`--qat-steps` steps of 4 x 128 tokens from the train scenes, pure KL to the frozen model), then the RTN row's export;
llm-compressor's `GPTQModifier` and `AWQModifier` with the same group-64 int4 scheme (on a machine without an
accelerator `torch.Tensor.pin_memory` is made the identity in their process: AWQ's activation cache pins host memory,
which CPU-only torch refuses; each row lists the patches), run in their own venv (llm-compressor 0.14 pins transformers 5.15-5.17), created under
`$HF_COMPRESS_CACHE/venvs/llmcompressor` (default `~/.cache/hf_compress/...`) if missing: `torch==2.13.0` (the CPU
build) first, then `llmcompressor==0.14.0.1`. Each row: perplexity, weight bytes on disk, wall time of the method
(quantize + save; for llm-compressor the `oneshot` call + save inside the venv, and the whole subprocess). Our GPTQ's
reload is checked against the in-memory GPTQ-dequantized model (logits equal, `torch.equal`).
Writes `lm_quantization.json` and `.md` in `--output-dir`.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import random
import subprocess
import sys
import tempfile
import textwrap
import time

from benchmarks.common import print_table, weight_bytes, write_results

LLMCOMPRESSOR = "llmcompressor==0.14.0.1"
TORCH_CPU = "torch==2.13.0"
READY = ".hf_compress_ready"

# Runs inside the llm-compressor venv: argv = model dir, calibration json, output root, methods (comma-separated).
_LLMC_SCRIPT = textwrap.dedent("""
    import json, sys, time, traceback
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    import llmcompressor, transformers, compressed_tensors
    from llmcompressor import oneshot
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.awq import AWQModifier

    model_dir, calib_file, out_root, methods = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4].split(",")
    patches = []
    if not torch.cuda.is_available():
        # AWQ's activation cache pins host memory (llmcompressor/pipelines/cache.py, _pin_intermediate), which a
        # CPU-only torch refuses ("Cannot access accelerator device"); pinning only speeds host-to-device copies,
        # so on a machine without one the tensor itself is the same result.
        torch.Tensor.pin_memory = lambda self, *args, **kwargs: self
        patches.append("torch.Tensor.pin_memory is the identity (no accelerator)")
    blocks = json.load(open(calib_file))
    scheme = {"targets": ["Linear"], "weights": {"num_bits": 4, "type": "int", "symmetric": True,
                                                 "strategy": "group", "group_size": 64}}
    versions = {"llmcompressor": llmcompressor.__version__, "transformers": transformers.__version__,
                "compressed_tensors": compressed_tensors.__version__, "torch": torch.__version__}
    for method in methods:
        rec = {"method": method, "versions": versions, "patches": patches}
        try:
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
            tok = AutoTokenizer.from_pretrained(model_dir)
            ds = Dataset.from_dict({"input_ids": blocks, "attention_mask": [[1] * len(b) for b in blocks]})
            cls = {"gptq": GPTQModifier, "awq": AWQModifier}[method]
            recipe = cls(config_groups={"group_0": scheme}, ignore=["lm_head"])
            t0 = time.perf_counter()
            oneshot(model=model, dataset=ds, recipe=recipe, max_seq_length=len(blocks[0]),
                    num_calibration_samples=len(blocks))
            rec["oneshot_seconds"] = time.perf_counter() - t0
            model.save_pretrained(out_root + "/" + method, save_compressed=True)
            tok.save_pretrained(out_root + "/" + method)
            rec["seconds"] = time.perf_counter() - t0
            rec["folder"] = out_root + "/" + method
        except Exception as err:
            rec["error"] = f"{type(err).__name__}: {err}"
            rec["traceback"] = traceback.format_exc()[-3000:]
        print("RESULT " + json.dumps(rec), flush=True)
""")


def cache_root() -> str:
    return os.environ.get("HF_COMPRESS_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "hf_compress")


def llmcompressor_python(venv: str | None = None) -> str:
    """The Python of the llm-compressor venv, created (CPU torch first, so pip does not pull CUDA wheels) if missing.
    A venv is only used once the marker file written after a complete install is there."""
    venv = venv or os.path.join(cache_root(), "venvs", "llmcompressor")
    python = os.path.join(venv, "bin", "python")
    if not os.path.isfile(os.path.join(venv, READY)):
        print(f"creating the llm-compressor venv at {venv} (minutes)", flush=True)
        subprocess.run([sys.executable, "-m", "venv", "--clear", venv], check=True)
        subprocess.run([python, "-m", "pip", "install", "-q", TORCH_CPU], check=True)
        subprocess.run([python, "-m", "pip", "install", "-q", LLMCOMPRESSOR], check=True)
        with open(os.path.join(venv, READY), "w") as f:
            f.write(f"{TORCH_CPU} {LLMCOMPRESSOR}\n")
    return python


def run_llmcompressor(model_dir: str, calib: list[list[int]], out_root: str, methods: list[str], venv=None) -> list[dict]:
    python = llmcompressor_python(venv)
    calib_file = os.path.join(out_root, "calibration.json")
    script = os.path.join(out_root, "llmc_run.py")
    with open(calib_file, "w") as f:
        json.dump(calib, f)
    with open(script, "w") as f:
        f.write(_LLMC_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # their transformers, not ours
    t0 = time.perf_counter()
    proc = subprocess.run([python, script, model_dir, calib_file, out_root, ",".join(methods)], env=env,
                          capture_output=True, text=True)
    total = time.perf_counter() - t0
    recs = [json.loads(line[len("RESULT "):]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if not recs:
        raise RuntimeError(f"llm-compressor run failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    for r in recs:
        r["subprocess_seconds_all_methods"] = round(total, 1)
    return recs


def calibration_blocks(tokenizer, n: int, seq: int, seed: int = 0) -> list[list[int]]:
    from benchmarks.lm_pruning import hamlet_blocks

    blocks = hamlet_blocks(tokenizer, "train", seq)
    return [blocks[i] for i in sorted(random.Random(seed).sample(range(len(blocks)), n))]


def distilled_qat_row(base, tok, args, test, tmp: str, steps: int, seed: int = 0, batch_size: int = 4, seq: int = 128,
                      lr: float = 5e-5) -> dict:
    """Row (c): the bf16 model distilled into itself under int4 g64 QAT (`QATCallback`, every step fake-quantized on
    the export's grid), pure KL to the frozen model's logits (alpha 1, T 1), on blocks of the Hamlet train scenes; then
    the same compressed-tensors export as the RTN row. Trained in fp32 (this CPU has no bf16 instructions; the
    teacher is the fp32 copy of the bf16 weights)."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    from benchmarks.lm_pruning import hamlet_blocks, perplexity
    from hf_compress.callbacks import QATCallback
    from hf_compress.distillation import DistillationArguments
    from hf_compress.quantization import quantize_and_save
    from hf_compress.trainers import DistillationTrainer

    blocks = hamlet_blocks(tok, "train", seq)
    rng = random.Random(seed)
    blocks = [blocks[i] for i in sorted(rng.sample(range(len(blocks)), min(len(blocks), steps * batch_size)))]
    train = Dataset.from_dict({"input_ids": blocks, "attention_mask": [[1] * seq for _ in blocks], "labels": blocks})
    teacher = copy.deepcopy(base).float().eval()
    student = copy.deepcopy(base).float()
    qargs = dataclasses.replace(args, qat_fraction=1.0)
    targs = DistillationArguments(
        output_dir=os.path.join(tmp, "qat-run"), max_steps=steps, per_device_train_batch_size=batch_size,
        learning_rate=lr, lr_scheduler_type="constant", warmup_steps=0, report_to="none", save_strategy="no",
        use_cpu=True, seed=seed, disable_tqdm=True, logging_steps=max(1, steps // 6), temperature=1.0, alpha=1.0)
    t0 = time.perf_counter()
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=targs, train_dataset=train,
                                  processing_class=tok, callbacks=[QATCallback(qargs)])
    trainer.train()
    train_seconds = time.perf_counter() - t0
    out = os.path.join(tmp, "distil-qat")
    # back to the base's bf16 before the export, as the other rows: the embedding (tied lm_head) is stored in the
    # model's own dtype, and fp32 would add 57 MB; the int4 scales are the bf16 model's
    quantize_and_save(student.to(torch.bfloat16), out, args)
    seconds = time.perf_counter() - t0
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16).eval()
    row = {"method": f"distillation + int4 g64 QAT (ours, {steps} steps)", "ppl": perplexity(model, test),
           "MB": weight_bytes(out) / 1e6, "seconds": round(seconds, 1), "train_seconds": round(train_seconds, 1),
           "train_tokens": len(blocks) * seq, "lr": lr, "batch_size": batch_size,
           "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h]}
    del model, teacher, student, trainer
    return row


def run(calib_blocks=64, calib_seq=128, eval_seq=512, eval_windows=None, seed=0, llmc_methods=("gptq", "awq"),
        ours=("act-order+mse", "plain"), venv=None, on_row=None, qat_steps=60) -> dict:
    """Every row (see the module doc); `on_row(result)` is called after each, so a cut run keeps its rows."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from benchmarks.lm_pruning import hamlet_blocks, perplexity
    from hf_compress.models import smollm2_path
    from hf_compress.quantization import QuantizationArguments
    from hf_compress.quantization import quantize_and_save
    from hf_compress.quantization.gptq import apply_gptq, gptq_quantize

    torch.manual_seed(seed)
    path = smollm2_path()
    tok = AutoTokenizer.from_pretrained(path)
    test = hamlet_blocks(tok, "test", eval_seq)[:eval_windows]
    calib = calibration_blocks(tok, calib_blocks, calib_seq, seed)
    args = QuantizationArguments(backend="compressed-tensors", bits=4, group_size=64)
    result = {
        "model": "SmolLM2-135M-Instruct (GGUF Q4_1 weights, converted), bf16",
        "scheme": "W4A16: int4 symmetric, one bf16 scale per 64 input columns, every decoder Linear; embedding/lm_head bf16",
        "held_out": f"Hamlet test scenes (3, 8, 13, 18) as one stream, {len(test)} windows of {eval_seq} tokens "
                    f"({len(test) * (eval_seq - 1)} predicted tokens)",
        "calibration": f"{calib_blocks} blocks of {calib_seq} tokens, seeded ({seed}) from the 16 Hamlet train scenes",
        "threads": torch.get_num_threads(), "rows": [],
    }
    rows = result["rows"]
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()

    def add(row):
        rows.append(row)
        print(json.dumps(row), flush=True)
        if on_row is not None:
            on_row(result)

    with tempfile.TemporaryDirectory(prefix="hf_compress_bench_quant_") as tmp:
        folder = os.path.join(tmp, "bf16")
        base.save_pretrained(folder)
        add({"method": "bf16", "ppl": perplexity(base, test), "MB": weight_bytes(folder) / 1e6})

        t0 = time.perf_counter()
        quantize_and_save(base, os.path.join(tmp, "rtn"), args)
        seconds = time.perf_counter() - t0
        model = AutoModelForCausalLM.from_pretrained(os.path.join(tmp, "rtn"), dtype=torch.bfloat16).eval()
        add({"method": "RTN int4 g64 (ours, compressed-tensors)", "ppl": perplexity(model, test),
             "MB": weight_bytes(os.path.join(tmp, "rtn")) / 1e6, "seconds": round(seconds, 1)})
        del model

        batches = [torch.tensor(calib[i : i + 8]) for i in range(0, len(calib), 8)]
        variants = {"plain": {}, "act-order+mse": {"act_order": True, "scale_search": "mse"},
                    "mse": {"scale_search": "mse"}, "act-order": {"act_order": True}}

        def ours_row(name):
            t0 = time.perf_counter()
            results = gptq_quantize(base, batches, bits=4, group_size=64, **variants[name])
            gptq_seconds = time.perf_counter() - t0
            out = os.path.join(tmp, f"gptq-{name}")
            quantize_and_save(base, out, args, precomputed=results)
            seconds = time.perf_counter() - t0
            model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16).eval()
            expected = apply_gptq(copy.deepcopy(base), results)
            with torch.no_grad():
                ids = torch.tensor(test[:2])
                exact = bool(torch.equal(model(input_ids=ids).logits, expected(input_ids=ids).logits))
            add({"method": f"GPTQ int4 g64 (ours, {name})", "ppl": perplexity(model, test), "MB": weight_bytes(out) / 1e6,
                 "seconds": round(seconds, 1), "gptq_seconds": round(gptq_seconds, 1), "options": variants[name],
                 "reload_logits_equal_in_memory": exact})
            del model, expected, results

        # our best variant first, then llm-compressor, then the rest: a cut run still has the comparison
        for name in ours[:1]:
            ours_row(name)
        if qat_steps:
            add(distilled_qat_row(base, tok, args, test, tmp, qat_steps, seed))

        if llmc_methods:
            for rec in run_llmcompressor(path, calib, tmp, list(llmc_methods), venv):
                label = f"llm-compressor {rec['method'].upper()} int4 g64 ({rec['versions']['llmcompressor']}, own venv)"
                if "error" in rec:
                    add({"method": label, "error": rec["error"], "traceback": rec.get("traceback")})
                    continue
                model = AutoModelForCausalLM.from_pretrained(rec["folder"], dtype=torch.bfloat16).eval()
                add({"method": label, "ppl": perplexity(model, test), "MB": weight_bytes(rec["folder"]) / 1e6,
                     "seconds": round(rec["seconds"], 1), "oneshot_seconds": round(rec["oneshot_seconds"], 1),
                     "subprocess_seconds_all_methods": rec["subprocess_seconds_all_methods"], "versions": rec["versions"],
                     "patches": rec.get("patches", [])})
                del model
        for name in ours[1:]:
            ours_row(name)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calib-blocks", type=int, default=64)
    parser.add_argument("--calib-seq", type=int, default=128)
    parser.add_argument("--eval-seq", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=None, help="first N held-out windows (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--llmcompressor", default="gptq,awq", help="llm-compressor methods, comma-separated ('' to skip)")
    parser.add_argument("--ours", default="act-order+mse,plain", help="our GPTQ variants: plain, mse, act-order, act-order+mse")
    parser.add_argument("--qat-steps", type=int, default=60, help="row (c): distillation + int4 QAT steps (0 to skip)")
    parser.add_argument("--quick", action="store_true", help="8 calibration blocks, 2 windows, no llm-compressor, 4 QAT steps")
    parser.add_argument("--output-dir", default=None, help="default: benchmarks/results (benchmarks/results-quick with --quick)")
    a = parser.parse_args(argv)
    if a.quick:
        a.calib_blocks, a.eval_windows, a.llmcompressor, a.qat_steps = 8, 2, "", 4
    out_dir = a.output_dir or ("benchmarks/results-quick" if a.quick else "benchmarks/results")
    os.makedirs(out_dir, exist_ok=True)

    def write(result, final=False):
        table = print_table(result["rows"], ["method", "ppl", "MB", "seconds"]) if final else _table(result["rows"])
        settings = (f"{result['model']}; {result['scheme']}.\n\nHeld out: {result['held_out']}. "
                    f"Calibration: {result['calibration']}. CPU threads: {result['threads']}.\n\n")
        result["complete"] = final
        write_results(out_dir, "lm_quantization", result, "# W4A16 int4 g64 on SmolLM2-135M\n\n" + settings + table + "\n")

    result = run(a.calib_blocks, a.calib_seq, a.eval_seq, a.eval_windows, a.seed,
                 [m for m in a.llmcompressor.split(",") if m], [m for m in a.ours.split(",") if m], on_row=write,
                 qat_steps=a.qat_steps)
    write(result, final=True)
    return 0


def _table(rows):
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        return print_table(rows, ["method", "ppl", "MB", "seconds"])


if __name__ == "__main__":
    raise SystemExit(main())
