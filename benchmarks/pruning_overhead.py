"""Step-time overhead of `GradualPruningCallback` on the real MiniLM-L6 (36 encoder Linear weights, 10.6 M entries).

Trains the same model on the same batches with and without the callback, alternating the two runs `--rounds` times
so that load on the machine hits both alike, and prints from that one run: the median step time with the callback
over the median without it (the steady per-step cost: masking gradients before and weights after every optimizer
step; target <= 1.03) and the ratio of mean step times (also paying the mask updates every `--frequency` steps and
the sparsity logging). Usage: `python -m benchmarks.pruning_overhead [--steps N] [--rounds R]`.
"""

from __future__ import annotations

import argparse
import json
import statistics

from benchmarks.common import StepTimer, print_table, real_data


def run(steps: int = 30, batch_size: int = 16, rounds: int = 2, frequency: int = 10, scope: str = "layer") -> dict:
    import torch
    from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding, Trainer, TrainingArguments

    from hf_compress.callbacks import GradualPruningCallback
    from hf_compress.models import default_model_path

    tok, ds = real_data(max_train=steps * batch_size)
    medians = {"plain": [], "pruning": []}
    means = {"plain": [], "pruning": []}
    for _ in range(rounds):
        for mode in ("plain", "pruning"):
            torch.manual_seed(0)
            model = AutoModelForSequenceClassification.from_pretrained(default_model_path(), num_labels=2)
            args = TrainingArguments(
                f"/tmp/hf_compress_bench_pruning/{mode}", max_steps=steps, per_device_train_batch_size=batch_size,
                logging_steps=10, report_to="none", save_strategy="no", use_cpu=True, seed=0, disable_tqdm=True,
            )
            timer = StepTimer()
            callbacks = [timer]
            if mode == "pruning":
                # The schedule ends before the last third, so the median is taken over steps with 80 % sparse masks.
                callbacks.insert(0, GradualPruningCallback(target_sparsity=0.8, end_step=2 * steps // 3, frequency=frequency, scope=scope))
            Trainer(model=model, args=args, train_dataset=ds["train"], data_collator=DataCollatorWithPadding(tok), callbacks=callbacks).train()
            medians[mode].append(timer.median())
            means[mode].append(statistics.mean(timer.times[2:]))
            print(f"{mode}: median step {medians[mode][-1]:.3f} s, mean {means[mode][-1]:.3f} s", flush=True)
    # The best of the rounds: the run least disturbed by other load on the machine.
    plain, pruned = min(medians["plain"]), min(medians["pruning"])
    result = {
        "steps": steps,
        "batch_size": batch_size,
        "rounds": rounds,
        "frequency": frequency,
        "scope": scope,
        "plain_median_step_s": plain,
        "pruning_median_step_s": pruned,
        "median_ratio": pruned / plain,
        "mean_ratio": min(means["pruning"]) / min(means["plain"]),
    }
    print_table(
        [
            {"run": "plain Trainer", "median step (s)": plain, "mean step (s)": min(means["plain"]), "ratio (median)": 1.0},
            {"run": "+ GradualPruningCallback", "median step (s)": pruned, "mean step (s)": min(means["pruning"]),
             "ratio (median)": pruned / plain},
        ],
        ["run", "median step (s)", "mean step (s)", "ratio (median)"],
    )
    print(f"pruning/plain median step = {result['median_ratio']:.3f} (target <= 1.03); mean step = {result['mean_ratio']:.3f}")
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--frequency", type=int, default=10)
    parser.add_argument("--scope", default="layer", choices=["layer", "global"])
    args = parser.parse_args(argv)
    print(json.dumps(run(args.steps, rounds=args.rounds, frequency=args.frequency, scope=args.scope), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
