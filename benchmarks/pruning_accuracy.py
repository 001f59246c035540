"""Held-out accuracy and sizes of the real MiniLM-L6 pruned to 50% and 80% on Rotten Tomatoes.

Fine-tunes MiniLM-L6 (`--base-steps`), then from that model prunes with `GradualPruningCallback` for `--steps`
(target reached at 60% of them), and prints accuracy on the first `--eval-rows` rows of the fixed test split vs the
unpruned fine-tune, with dense / compressed / information-limit sizes. Usage: `python -m benchmarks.pruning_accuracy`.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile

from benchmarks.common import print_table, real_data


def accuracy(model, dataset, tok) -> float:
    """Held-out accuracy through the sequence-classification task's one evaluation loop."""
    from hf_compress.model_cards import evaluate_classifier

    return evaluate_classifier(model, dataset, tok, ("accuracy",))["accuracy"]


def run(base_steps=200, steps=100, eval_rows=1000, batch_size=16, targets=(0.5, 0.8), base_model=None) -> list[dict]:
    import torch
    from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding, Trainer, TrainingArguments

    from hf_compress.callbacks import GradualPruningCallback
    from hf_compress.models import default_model_path
    from hf_compress.pruning import default_targets, save_compressed, sparsity_stats

    tok, ds = real_data(max_eval=eval_rows)
    test = ds["test"].select(range(min(eval_rows, len(ds["test"]))))
    work = tempfile.mkdtemp(prefix="hf_compress_bench_pruning_acc_")

    def train(model, n, callbacks=(), lr=1e-4):
        args = TrainingArguments(f"{work}/run", max_steps=n, per_device_train_batch_size=batch_size, learning_rate=lr,
                                 weight_decay=0.01, report_to="none", save_strategy="no", use_cpu=True, seed=0, disable_tqdm=True)
        Trainer(model=model, args=args, train_dataset=ds["train"], data_collator=DataCollatorWithPadding(tok), callbacks=list(callbacks)).train()

    torch.manual_seed(0)
    if base_model:  # an already fine-tuned sequence classifier: skip the base fine-tune
        base = AutoModelForSequenceClassification.from_pretrained(base_model)
        base_steps = f"given: {base_model}"
    else:
        base = AutoModelForSequenceClassification.from_pretrained(default_model_path(), num_labels=2)
        train(base, base_steps)
    base.save_pretrained(f"{work}/dense-base")
    rows = [{"model": f"unpruned fine-tune ({base_steps} steps)", "sparsity": 0.0, "accuracy": accuracy(base, test, tok),
             "dense MB": os.path.getsize(f"{work}/dense-base/model.safetensors") / 1e6}]
    for target in targets:
        model = copy.deepcopy(base)
        end = max(1, int(0.6 * steps))
        train(model, steps, [GradualPruningCallback(target_sparsity=target, end_step=end, frequency=max(1, end // 12))], lr=5e-5)
        stats = sparsity_stats(model, default_targets(model))
        report = save_compressed(model, f"{work}/pruned-{target}")
        model.save_pretrained(f"{work}/dense-{target}")
        rows.append({
            "model": f"pruned {int(target * 100)}% (+{steps} steps)", "sparsity": stats["sparsity"], "accuracy": accuracy(model, test, tok),
            "dense MB": os.path.getsize(f"{work}/dense-{target}/model.safetensors") / 1e6,
            "compressed MB": report["compressed_bytes"] / 1e6, "limit MB": report["information_limit_bytes"] / 1e6,
        })
    print(f"held-out: first {len(test)} rows of the fixed Rotten Tomatoes test split; batch {batch_size}")
    print_table(rows, ["model", "sparsity", "accuracy", "dense MB", "compressed MB", "limit MB"])
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-steps", type=int, default=200)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--eval-rows", type=int, default=1000)
    parser.add_argument("--base-model", default=None, help="a fine-tuned MiniLM-L6 classifier folder (skips the base fine-tune)")
    args = parser.parse_args(argv)
    print(json.dumps(run(args.base_steps, args.steps, args.eval_rows, base_model=args.base_model), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
