"""SmolLM2-135M pruned (50% unstructured, 2:4) with a short recovery run, and its 8/4-bit bf16 exports, on Hamlet.

Held-out perplexity on the Hamlet `test` scenes (split by scene, never trained on), in blocks of `--seq` tokens:
the model as shipped; pruned one-shot before any training; after `--steps` recovery steps on the `train` scenes with
`GradualPruningCallback` holding the masks (and a dense fine-tune with the same steps, seed and data as control); and
the bf16 model exported with bitsandbytes to 8-bit and 4-bit NF4, reloaded from disk, with the sizes on disk.
Usage: `python -m benchmarks.lm_pruning` (long on a CPU: `--parts`, `--steps`, `--eval-blocks` run pieces of it);
writes `benchmarks/results/lm_pruning.json`.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import tempfile
import time

from benchmarks.common import print_table, weight_bytes, write_text


def hamlet_blocks(tokenizer, split: str, seq: int = 128) -> list[list[int]]:
    """The scenes of `split` tokenized, joined with EOS and cut into blocks of `seq` tokens (the tail is dropped)."""
    from hf_compress.data import load_hamlet

    ids: list[int] = []
    for text in load_hamlet()[split]["text"]:
        ids += tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]
    return [ids[i : i + seq] for i in range(0, len(ids) - seq + 1, seq)]


def perplexity(model, blocks: list[list[int]], batch_size: int = 8) -> float:
    """exp(mean next-token negative log-likelihood) over every predicted token of `blocks` (float32 loss)."""
    import torch
    import torch.nn.functional as F

    model.eval()
    nll, count = 0.0, 0
    device = next(model.parameters()).device
    with torch.no_grad():
        for i in range(0, len(blocks), batch_size):
            ids = torch.tensor(blocks[i : i + batch_size], device=device)
            logits = model(input_ids=ids).logits.float()
            nll += float(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"))
            count += ids[:, 1:].numel()
    return math.exp(nll / count)


def _recover(model, train_blocks, steps, batch_size, lr, seed, callback, out):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    data = Dataset.from_dict({"input_ids": train_blocks, "labels": train_blocks})
    args = TrainingArguments(
        out, max_steps=steps, per_device_train_batch_size=batch_size, learning_rate=lr, warmup_steps=max(1, steps // 10),
        lr_scheduler_type="cosine", weight_decay=0.0, max_grad_norm=1.0, logging_steps=max(1, steps // 5), report_to="none",
        use_cpu=True, save_strategy="no", seed=seed, data_seed=seed, disable_tqdm=True,
    )
    start = time.perf_counter()
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[callback] if callback else [])
    trainer.train()
    return time.perf_counter() - start


PARTS = ("baseline", "oneshot", "control", "recovery", "exports")  # "recovery-50" / "recovery-2:4": one of the two


def run(steps=40, seq=128, batch_size=8, lr=1e-4, seed=0, parts=PARTS, eval_blocks=None) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_compress.callbacks import GradualPruningCallback
    from hf_compress.models import smollm2_path
    from hf_compress.pruning import default_targets, magnitude_masks, nm_masks, sparsity_stats
    from hf_compress.quantization import QuantizationArguments, load_quantized, quantize_and_save

    path = smollm2_path()
    tok = AutoTokenizer.from_pretrained(path)
    train_blocks, test_blocks = hamlet_blocks(tok, "train", seq), hamlet_blocks(tok, "test", seq)[:eval_blocks]
    result = {
        "model": "SmolLM2-135M-Instruct (GGUF Q4_1 weights, converted)", "data": "Hamlet, split by scene",
        "test_blocks": len(test_blocks), "test_tokens_predicted": len(test_blocks) * (seq - 1),
        "train_blocks": len(train_blocks), "seq": seq, "batch_size": batch_size, "steps": steps, "lr": lr, "seed": seed,
        "rows": [],
    }
    rows = result["rows"]

    def load(dtype=torch.float32):
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype)

    base = load()
    names = default_targets(base)
    if "baseline" in parts:
        rows.append({"model": "SmolLM2 fp32 (as shipped)", "ppl": perplexity(base, test_blocks)})
        print(rows[-1], flush=True)

    if "oneshot" in parts:
        for label, make in (
            ("50% unstructured (per matrix)", lambda w: magnitude_masks(w, 0.5, "layer")),
            ("50% unstructured (global)", lambda w: magnitude_masks(w, 0.5, "global")),
            ("2:4", lambda w: nm_masks(w, "2:4")),
        ):
            model = copy.deepcopy(base)
            weights = {n: model.get_parameter(n) for n in names}
            with torch.no_grad():
                for n, m in make(weights).items():
                    weights[n].mul_(m)
            stats = sparsity_stats(model, names)
            rows.append({"model": f"{label}, one-shot, no recovery", "ppl": perplexity(model, test_blocks),
                         "sparsity": stats["sparsity"], "zeros": stats["zeros"], "total": stats["total"]})
            print(rows[-1], flush=True)
            del model

    runs = [("dense fine-tune (control)", None)] if "control" in parts else []
    if "recovery" in parts or "recovery-50" in parts:
        runs.append(("50% unstructured (per matrix) + recovery",
                     GradualPruningCallback(target_sparsity=0.5, initial_sparsity=0.5, start_step=0, end_step=1, log_per_layer=False)))
    if "recovery" in parts or "recovery-2:4" in parts:
        runs.append(("2:4 + recovery", GradualPruningCallback(target_sparsity=0.5, pattern="2:4", start_step=0, log_per_layer=False)))
    if runs:
        with tempfile.TemporaryDirectory() as tmp:
            for label, callback in runs:
                torch.manual_seed(seed)
                model = load()
                seconds = _recover(model, train_blocks, steps, batch_size, lr, seed, callback, os.path.join(tmp, "run"))
                stats = sparsity_stats(model, names)
                row = {"model": f"{label}, {steps} steps", "ppl": perplexity(model, test_blocks), "sparsity": stats["sparsity"],
                       "zeros": stats["zeros"], "total": stats["total"], "train_seconds": round(seconds, 1)}
                if "2:4" in label:
                    row["groups_with_2_of_4_kept"] = all(
                        bool(((model.get_parameter(n) != 0).reshape(-1, 4).sum(1) <= 2).all()) for n in names
                    )
                rows.append(row)
                print(rows[-1], flush=True)
                del model

    if "exports" in parts:
        with tempfile.TemporaryDirectory() as tmp:
            bf16 = load(torch.bfloat16)
            bf16.save_pretrained(os.path.join(tmp, "bf16"))
            reloaded = AutoModelForCausalLM.from_pretrained(os.path.join(tmp, "bf16"), dtype=torch.bfloat16)
            rows.append({"model": "bf16 save, reloaded", "ppl": perplexity(reloaded, test_blocks), "MB": weight_bytes(os.path.join(tmp, "bf16")) / 1e6})
            print(rows[-1], flush=True)
            del reloaded
            for label, qargs in (("8-bit LLM.int8", QuantizationArguments(bits=8)), ("4-bit NF4", QuantizationArguments(bits=4, quant_type="nf4"))):
                folder = os.path.join(tmp, label.split()[0])
                info = quantize_and_save(bf16, folder, qargs, tokenizer=tok)
                model = load_quantized(folder)
                rows.append({"model": f"bf16 -> {label}, reloaded", "ppl": perplexity(model, test_blocks), "MB": weight_bytes(folder) / 1e6,
                             "precision": {k: v["parameters"] for k, v in info["precision"].items()}})
                print(rows[-1], flush=True)
                del model
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-blocks", type=int, default=None, help="first N held-out blocks (default: all 58)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    parser.add_argument("--output", default="benchmarks/results/lm_pruning.json")
    a = parser.parse_args(argv)
    result = run(a.steps, a.seq, a.batch_size, a.lr, a.seed, parts=a.parts.split(","), eval_blocks=a.eval_blocks)
    print_table(result["rows"], ["model", "ppl", "sparsity", "MB"])
    write_text(a.output, json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
