"""Checkpoint formats that load everywhere: size (against the information limit) and accuracy of each export.

    python -m benchmarks.formats                 # MiniLM-L6 on Rotten Tomatoes (2,000 test rows) + SmolLM2-135M on Hamlet
    python -m benchmarks.formats --quick         # a few rows and steps of each (what the test runs)
    python -m benchmarks.formats --skip-lm       # only the MiniLM table

MiniLM-L6 is fine-tuned on the shipped Rotten Tomatoes `train` split (`--steps`, batch 16, lr 1e-4, seed 0), then
exported once per format; each export is reloaded from disk the way a user loads it (compressed-tensors and dense with
plain `from_pretrained`, bitsandbytes with `load_quantized`) and evaluated on the first `--eval-rows` rows of the fixed
`test` split. SmolLM2-135M-Instruct (as shipped: its weights are already 4-bit-rounded GGUF) is exported to
compressed-tensors int4 with its tied embedding / `lm_head` quantized too, reloaded with plain `from_pretrained`, and its
perplexity measured on Hamlet's held-out scenes (`test` split, 128-token windows). Writes `results.json` and
`results.md` under `benchmarks/results-formats[-quick]/`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import tempfile
import time

from .common import print_table, real_data

BATCH = 16
# (name, format, QuantizationArguments fields)
MINILM_VARIANTS = [
    ("fp32 (dense safetensors)", "dense", {}),
    ("bnb 8-bit LLM.int8", "bitsandbytes", dict(bits=8)),
    ("bnb 8-bit + 8-bit embeddings", "bitsandbytes", dict(bits=8, quantize_embeddings=True)),
    ("bnb 4-bit NF4", "bitsandbytes", dict(bits=4)),
    ("bnb 4-bit NF4 + 4-bit embeddings", "bitsandbytes", dict(bits=4, quantize_embeddings=True)),
    ("ct int8 per-channel", "compressed-tensors", dict(bits=8)),
    ("ct int8 per-channel + embeddings", "compressed-tensors", dict(bits=8, quantize_embeddings=True)),
    ("ct int4 group 32", "compressed-tensors", dict(bits=4, group_size=32)),
    ("ct int4 group 32 + embeddings", "compressed-tensors", dict(bits=4, group_size=32, quantize_embeddings=True)),
    ("ct int4 per-channel + embeddings", "compressed-tensors", dict(bits=4, quantize_embeddings=True)),
]


def _weight_bytes(folder) -> int:
    return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder) if f.endswith(".safetensors"))


def _accuracy(model, tok, test_set) -> float:
    from .results import accuracy

    return accuracy(model, tok, test_set)


def _bnb_information_limit(model, info, fields) -> int:
    """bits x weights + the float32 scales bitsandbytes stores: one per row (LLM.int8) or per 64-value block (4-bit;
    along rows for every real width, so a group of 64)."""
    from hf_compress.quantization.backends.compressed_tensors import information_limit_bytes

    layout = (8, None) if fields["bits"] == 8 else (4, 64)
    return information_limit_bytes(model, {n: layout for n in info["quantized_linear_modules"] + info["quantized_embeddings"]})


def minilm(steps: int, eval_rows: int, work: str) -> list[dict]:
    import torch
    from transformers import AutoModelForSequenceClassification

    from hf_compress.models import default_model_path
    from hf_compress.quantization import QuantizationArguments, load_quantized, quantize_and_save

    from .results import train

    tok, ds = real_data(max_eval=eval_rows)
    test = ds["test"]
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(default_model_path(), num_labels=2)
    t0 = time.time()
    train(model, tok, ds["train"], steps, os.path.join(work, "run"))
    print(f"fine-tuned {steps} steps in {time.time() - t0:.0f} s", flush=True)
    model.eval()
    rows = []
    for name, fmt, fields in MINILM_VARIANTS:
        folder = os.path.join(work, name.replace(" ", "_").replace("+", "p"))
        if fmt == "dense":
            model.save_pretrained(folder)
            info = {"information_limit_bytes": sum(p.numel() * 4 for p in model.state_dict().values())}
            loaded = AutoModelForSequenceClassification.from_pretrained(folder)
        else:
            info = quantize_and_save(model, folder, QuantizationArguments(backend=fmt, **fields))
            if fmt == "compressed-tensors":
                loaded = AutoModelForSequenceClassification.from_pretrained(folder)  # what any user runs
            else:
                loaded = load_quantized(folder)
        size = _weight_bytes(folder)
        limit = info.get("information_limit_bytes") or _bnb_information_limit(model, info, fields)
        row = {"variant": name, "format": fmt, "accuracy": round(_accuracy(loaded, tok, test), 4), "bytes": size,
               "MB": round(size / 1e6, 2), "information_limit_MB": round(limit / 1e6, 2) if limit else "",
               "size_over_limit": round(size / limit, 4) if limit else ""}
        print(row, flush=True)
        rows.append(row)
        shutil.rmtree(folder, ignore_errors=True)
    return rows


def smollm(quick: bool, work: str, group_size: int = 32, window: int = 128) -> list[dict]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_compress.data import load_hamlet
    from hf_compress.models import smollm2_path
    from hf_compress.quantization import QuantizationArguments, quantize_and_save

    path = smollm2_path()
    tok = AutoTokenizer.from_pretrained(path)
    text = "\n\n".join(load_hamlet()["test"]["text"])
    ids = tok(text, return_tensors="pt").input_ids[0]
    n_windows = len(ids) // window
    if quick:
        n_windows = min(n_windows, 4)
    chunks = ids[: n_windows * window].view(n_windows, window)

    @torch.no_grad()
    def perplexity(model) -> float:
        model.eval()
        nll, count = 0.0, 0
        for i in range(0, n_windows, 8):
            batch = chunks[i : i + 8]
            out = model(input_ids=batch, labels=batch)
            n = batch.numel() - batch.shape[0]
            nll += out.loss.item() * n
            count += n
        return math.exp(nll / count)

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    rows = [{"variant": "SmolLM2-135M fp32 (as shipped)", "perplexity": round(perplexity(model), 3),
             "bytes": _weight_bytes(path), "MB": round(_weight_bytes(path) / 1e6, 2), "information_limit_MB": ""}]
    for name, fields in [
        (f"ct int4 group {group_size}, Linear only", dict(bits=4, group_size=group_size)),
        (f"ct int4 group {group_size} + tied embeddings / lm_head", dict(bits=4, group_size=group_size, quantize_embeddings=True)),
    ]:
        folder = os.path.join(work, "smollm-" + str(len(rows)))
        info = quantize_and_save(model, folder, QuantizationArguments(backend="compressed-tensors", **fields), tokenizer=tok)
        loaded = AutoModelForCausalLM.from_pretrained(folder)
        size = _weight_bytes(folder)
        row = {"variant": name, "perplexity": round(perplexity(loaded), 3), "bytes": size, "MB": round(size / 1e6, 2),
               "information_limit_MB": round(info["information_limit_bytes"] / 1e6, 2),
               "size_over_limit": round(size / info["information_limit_bytes"], 4)}
        print(row, flush=True)
        rows.append(row)
        shutil.rmtree(folder, ignore_errors=True)
    for r in rows:
        r["tokens"] = n_windows * window
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few steps and rows (smoke run)")
    parser.add_argument("--steps", type=int, default=None, help="MiniLM fine-tuning steps (default 400; quick 20)")
    parser.add_argument("--eval-rows", type=int, default=None, help="test rows (default 2000; quick 200)")
    parser.add_argument("--skip-lm", action="store_true", help="skip SmolLM2")
    parser.add_argument("--skip-minilm", action="store_true", help="skip MiniLM")
    parser.add_argument("--output-dir", default=None)
    args = parser.parse_args(argv)
    steps = args.steps or (20 if args.quick else 400)
    eval_rows = args.eval_rows or (200 if args.quick else 2000)
    out = args.output_dir or ("benchmarks/results-formats-quick" if args.quick else "benchmarks/results-formats")
    os.makedirs(out, exist_ok=True)
    t0 = time.time()
    results = {"date": time.strftime("%Y-%m-%d"), "minilm_steps": steps, "eval_rows": eval_rows}
    text = []
    with tempfile.TemporaryDirectory(prefix="hf-compress-formats-") as work:
        if not args.skip_minilm:
            results["minilm"] = minilm(steps, eval_rows, work)
            text.append(f"MiniLM-L6 fine-tuned {steps} steps on Rotten Tomatoes train; accuracy on test[:{eval_rows}]:\n")
            text.append(print_table(results["minilm"], ["variant", "format", "accuracy", "MB", "information_limit_MB", "size_over_limit"]))
        if not args.skip_lm:
            results["smollm2"] = smollm(args.quick, work)
            text.append(f"\nSmolLM2-135M-Instruct, perplexity on Hamlet test ({results['smollm2'][0]['tokens']} tokens, 128-token windows):\n")
            text.append(print_table(results["smollm2"], ["variant", "perplexity", "MB", "information_limit_MB", "size_over_limit"]))
    results["wall_seconds"] = round(time.time() - t0, 1)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("\n".join(text) + "\n")
    print(f"wrote {out} in {results['wall_seconds']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
