"""Prefill and generate tokens/s of SmolLM2-135M on the CPU: PyTorch bf16 (the peer) and fp32, and our KV-cache
ONNX Runtime graphs (`--format onnx`: fp32, dynamic int8, weight-only int4 g64 `MatMulNBits`).

    python -m benchmarks.lm_runtime [--quick] [--threads 2] [--runs 3] [--output-dir benchmarks/results]

Model: SmolLM2-135M-Instruct (`hf_compress.models.smollm2_path`), loaded in fp32; the bf16 row is the same model cast
to bf16. The graphs are written by `export_onnx` (the export's own checks run: fp32 prefill and decode within
`FP32_ATOL` of the model, int4 within fp32 rounding of the fake-quantized model). int4: compressed-tensors grid,
symmetric, group 64, every decoder Linear; the tied embedding / `lm_head` stays fp32 (as `--format onnx --bits 4`
without `--quantize_embeddings`).

Prompt: the first 128 / 512 tokens of the shipped Hamlet (`hf_compress.data.load_hamlet`, first train scene), batch 1.
Each row, in one process, on `--threads` threads (`torch.set_num_threads`, ORT `intra_op_num_threads`, one inter-op
thread), median of `--runs` runs after one warm-up:

- prefill tokens/s: prompt tokens / wall time of the one call on the prompt (empty past) that returns its KV cache.
  The graph returns logits for every prompt position (optimum's layout); the PyTorch rows compute only the last one
  (`logits_to_keep=1`, as `generate` does), so they skip a [prompt, 576] x [576, 49152] product the graph does.
- generate tokens/s: greedy decoding of 128 new tokens after the 128-token prompt (never stopping at eos): 127 / wall
  time of the 127 single-token calls after the prefill (whose call gives the first token).
- token agreement: each row's 128 greedy tokens against the ORT fp32 graph's (fraction of equal positions, and the
  length of the common prefix); a perplexity-free sanity check of int8 / int4.

Writes `lm_runtime.json` and `.md` in `--output-dir`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

from benchmarks.common import OUTPUT_DIRS, print_table, write_results

PROMPTS, NEW_TOKENS, GROUP = (128, 512), 128, 64
PEER = "PyTorch bf16"


def hamlet_ids(tokenizer, length: int) -> list[int]:
    from hf_compress.data import load_hamlet

    ids = tokenizer(load_hamlet()["train"]["text"][0])["input_ids"]
    assert len(ids) >= length, f"the first Hamlet scene has {len(ids)} tokens, fewer than {length}"
    return ids[:length]


class TorchRunner:
    """Greedy decoding with a transformers model and its `DynamicCache`."""

    def __init__(self, model):
        self.model = model.eval()

    def prefill(self, ids):
        import torch

        with torch.no_grad():
            out = self.model(input_ids=torch.tensor([ids]), use_cache=True, logits_to_keep=1)
        return int(out.logits[0, -1].argmax()), out.cache

    def generate(self, ids, new_tokens: int):
        import torch

        t0 = time.perf_counter()
        token, cache = self.prefill(ids)
        t1 = time.perf_counter()
        tokens = [token]
        with torch.no_grad():
            for _ in range(new_tokens - 1):
                out = self.model(input_ids=torch.tensor([[token]]), cache=cache, use_cache=True)
                cache, token = out.cache, int(out.logits[0, -1].argmax())
                tokens.append(token)
        return tokens, t1 - t0, time.perf_counter() - t1


class OrtRunner:
    """Greedy decoding with our KV-cache graph (the loop of `onnx_kv.onnx_generate`, timed in two parts)."""

    def __init__(self, path: str, threads: int):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
        self.session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        self.past = [i for i in self.session.get_inputs() if i.name.startswith("past_key_values.")]
        self.outputs = ["logits"] + [i.name.replace("past_key_values.", "present.") for i in self.past]

    def step(self, ids, past, seen: int):
        import numpy as np

        n = len(ids)
        feed = {"input_ids": np.array([ids], dtype="int64"), "attention_mask": np.ones((1, seen + n), dtype="int64"),
                "position_ids": np.arange(seen, seen + n, dtype="int64")[None], **past}
        logits, *present = self.session.run(self.outputs, feed)
        return int(logits[0, -1].argmax()), dict(zip(past, present))

    def prefill(self, ids):
        import numpy as np

        empty = {i.name: np.zeros((1, i.shape[1], 0, i.shape[3]), dtype="float32") for i in self.past}
        return self.step(ids, empty, 0)

    def generate(self, ids, new_tokens: int):
        t0 = time.perf_counter()
        token, past = self.prefill(ids)
        t1 = time.perf_counter()
        tokens = [token]
        for i in range(new_tokens - 1):
            token, past = self.step([token], past, len(ids) + i + 1)
            tokens.append(token)
        return tokens, t1 - t0, time.perf_counter() - t1


def measure(runner, prompts: dict, runs: int) -> dict:
    """Prefill tokens/s per prompt length and generate tokens/s (medians of `runs` after one warm-up), and the
    greedy tokens."""
    row = {}
    for length, ids in prompts.items():
        runner.prefill(ids)
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            runner.prefill(ids)
            times.append(time.perf_counter() - t0)
        row[f"prefill {length} tok/s"] = length / statistics.median(times)
    ids = prompts[PROMPTS[0]]
    runner.generate(ids, 8)
    decode, tokens = [], None
    for _ in range(runs):
        tokens, _, seconds = runner.generate(ids, NEW_TOKENS)
        decode.append(seconds)
    row[f"generate tok/s ({NEW_TOKENS} new)"] = (NEW_TOKENS - 1) / statistics.median(decode)
    row["tokens"] = tokens
    return row


def agreement(tokens: list[int], reference: list[int]) -> dict:
    prefix = next((i for i, (a, b) in enumerate(zip(tokens, reference)) if a != b), min(len(tokens), len(reference)))
    same = sum(a == b for a, b in zip(tokens, reference)) / max(1, len(reference))
    return {"token agreement vs ORT fp32": same, "common prefix": prefix}


def export_graphs(model, tokenizer, folder: str) -> dict:
    """The three `--format onnx` graphs of `model` under `folder`: name -> (path, export info)."""
    from hf_compress.quantization import QuantizationArguments
    from hf_compress.quantization.onnx import ONNX_FILE, export_onnx

    int4 = QuantizationArguments(backend="compressed-tensors", bits=4, group_size=GROUP)
    specs = {"ORT fp32 (KV graph)": dict(quantize=False), "ORT dynamic int8": dict(quantize=True),
             f"ORT int4 g{GROUP} (MatMulNBits)": dict(quantize=True, args=int4)}
    graphs = {}
    for name, kw in specs.items():
        out = os.path.join(folder, name.split()[1])
        t0 = time.perf_counter()
        info = export_onnx(model, out, tokenizer, "causal-lm", **kw)
        info["export_seconds"] = time.perf_counter() - t0
        graphs[name] = (os.path.join(out, ONNX_FILE), info)
    return graphs


def run(threads: int, runs: int, prompt_lengths=PROMPTS) -> dict:
    import copy

    import onnxruntime as ort
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_compress.models import smollm2_path

    torch.set_num_threads(threads)
    path = smollm2_path()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompts = {n: hamlet_ids(tok, n) for n in prompt_lengths}
    result = {"model": "SmolLM2-135M-Instruct (hf_compress.models.smollm2_path)", "threads": threads, "runs": runs,
              "prompt": "the first tokens of the shipped Hamlet (first train scene), batch 1",
              "new_tokens": NEW_TOKENS, "peer": PEER, "cpu": _cpu_name(), "measured_on": "a shared CPU",
              "versions": {"torch": torch.__version__, "onnxruntime": ort.__version__,
                           "transformers": transformers.__version__}, "rows": []}
    with tempfile.TemporaryDirectory(prefix="hf_compress_lm_runtime_") as tmp:
        graphs = export_graphs(model, tok, tmp)
        runners = {PEER: lambda: TorchRunner(copy.deepcopy(model).to(torch.bfloat16)),
                   "PyTorch fp32": lambda: TorchRunner(model)}
        runners.update({name: (lambda p=p: OrtRunner(p, threads)) for name, (p, _) in graphs.items()})
        for name, make in runners.items():
            row = {"runtime": name, **measure(make(), prompts, runs)}
            if name in graphs:
                p, info = graphs[name]
                row.update({"MB": os.path.getsize(p) / 1e6, "export_seconds": info["export_seconds"],
                            "max_abs_logit_diff": info["max_abs_logit_diff"], "precision": info["precision"],
                            "op_counts": info["op_counts"]})
            result["rows"].append(row)
            print(name, {k: v for k, v in row.items() if k != "tokens"}, flush=True)
    reference = next(r for r in result["rows"] if r["runtime"] == "ORT fp32 (KV graph)")["tokens"]
    peer = result["rows"][0]
    for row in result["rows"]:
        row.update(agreement(row["tokens"], reference))
        for key in [k for k in row if k.endswith("tok/s") or "tok/s (" in k]:
            row[f"{key} x {PEER}"] = row[key] / peer[key]
    return result


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown"


def table(result: dict) -> str:
    gen = f"generate tok/s ({NEW_TOKENS} new)"
    cols = [f"prefill {n} tok/s" for n in PROMPTS if f"prefill {n} tok/s" in result["rows"][0]]
    rows = [{"runtime": r["runtime"], **{c: r[c] for c in cols}, gen: r[gen], f"generate x {PEER}": r[f"{gen} x {PEER}"],
             "token agreement vs ORT fp32": r["token agreement vs ORT fp32"], "common prefix": r["common prefix"],
             "MB": r.get("MB", "")} for r in result["rows"]]
    return print_table(rows, ["runtime", *cols, gen, f"generate x {PEER}", "token agreement vs ORT fp32",
                              "common prefix", "MB"])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="one run, the 128-token prompt only")
    parser.add_argument("--output-dir", default=None, help="default: benchmarks/results (results-quick with --quick)")
    a = parser.parse_args(argv)
    out = a.output_dir or OUTPUT_DIRS["quick" if a.quick else "full"]
    os.makedirs(out, exist_ok=True)
    result = run(a.threads, 1 if a.quick else a.runs, PROMPTS[:1] if a.quick else PROMPTS)
    text = (f"# Prefill and generate tokens/s, SmolLM2-135M on the CPU\n\n{result['model']}; {result['prompt']}; "
            f"{result['threads']} threads, median of {result['runs']} runs; greedy, {NEW_TOKENS} new tokens after the "
            f"128-token prompt. Measured on {result['measured_on']} ({result['cpu']}); versions {result['versions']}.\n\n"
            + table(result) + "\n")
    write_results(out, "lm_runtime", result, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
