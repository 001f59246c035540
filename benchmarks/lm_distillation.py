"""Causal-LM distillation on the real SmolLM2-135M and Hamlet: held-out perplexity, cached vs live, TRL's SFTTrainer.

One command: `python -m benchmarks.lm_distillation` (the published run: 60 steps of batch 4, teacher correction 60
steps, all parts, about 35 minutes on 2 CPU cores; `--parts ce,live` and fewer `--steps` run pieces of it).

Teacher: SmolLM2-135M-Instruct (30 layers; `hf_compress.models.smollm2_path()`). Student: half the teacher's layers
(15 of 30: the first 8 and the last 7, `layer_dropped_student`), 81 M parameters. Data: Hamlet split by scene (`hf_compress.data.load_hamlet()`:
train 16 scenes, held-out `test` 4 scenes), tokenized and cut into blocks of `--seq-len` tokens. Every student run
starts from the same weights and trains the same steps on the same blocks in the same order (seed 0):

- `ce`: cross-entropy only (a plain `Trainer`);
- `live`: `DistillationTrainer`, the teacher running at every step;
- `cached`: the same with `cache_teacher_logits=True, teacher_logits_top_k=K` (cache size on disk is reported);
- `sft_ce` / `sft`: TRL's `SFTTrainer` / `SFTDistillationTrainer` on the same blocks written as chats (`messages`: the
  first half of a block as the user turn, the second half as the assistant turn; loss on the completion only).

- `exports`: the `ce` and `live` students saved in bf16 and exported with bitsandbytes to 8-bit and 4-bit NF4
  (`quantize_and_save`), reloaded from disk (`load_quantized`): perplexity and size on disk.

Teacher correction (`--teacher-steps N`, Minitron's "teacher correction"): the teacher is first fine-tuned with
cross-entropy on the same training blocks for N steps, since the student will be trained on text the shipped
teacher never saw; the student is then cut from the corrected teacher. `0` distils from the teacher as shipped.

Held-out perplexity: exp of the mean token cross-entropy over the first `--eval-blocks` blocks of the test split.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from benchmarks.common import weight_bytes, write_text  # noqa: E402

PARTS = ("ce", "live", "cached", "sft_ce", "sft", "exports")


def half_layers(n: int) -> list[int]:
    """Half of `n` layers: the first quarter and the last quarter (SmolLM2's 30: layers 0-7 and 23-29).

    Dropping the middle keeps the first layers (that read the embeddings) and the last ones (that write the logits):
    on SmolLM2 + Hamlet this student starts at perplexity 1.7e4 against 2.2e6 for the even layers (8 test blocks).
    """
    first = (n // 2 + 1) // 2
    return list(range(first)) + list(range(n - (n // 2 - first), n))


def hamlet_blocks(tokenizer, seq_len: int = 128):
    """Hamlet's train and test scenes, each split's text tokenized as one stream and cut into `seq_len` blocks."""
    from datasets import Dataset, DatasetDict

    from hf_compress.data import load_hamlet

    out = {}
    for split, ds in load_hamlet().items():
        ids = tokenizer("\n\n".join(ds["text"]))["input_ids"]
        blocks = [ids[i : i + seq_len] for i in range(0, len(ids) - seq_len + 1, seq_len)]
        out[split] = Dataset.from_dict({"input_ids": blocks, "attention_mask": [[1] * seq_len for _ in blocks], "labels": blocks})
    return DatasetDict(out)


@torch.no_grad()
def perplexity(model, blocks, batch_size: int = 8) -> float:
    """exp(mean next-token cross-entropy) over `blocks` (equal-length rows, no padding)."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(blocks), batch_size):
        ids = torch.tensor(blocks[start : start + batch_size]["input_ids"])
        logits = model(input_ids=ids).logits[:, :-1].float()
        total += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum").item()
        count += ids[:, 1:].numel()
    return math.exp(total / count)


def chat_blocks(tokenizer, blocks):
    """Each block as a prompt/completion chat: the first half's text asked by the user, the rest answered."""
    from datasets import Dataset

    prompts, completions = [], []
    for ids in blocks["input_ids"]:
        half = len(ids) // 2
        prompts.append([{"role": "user", "content": tokenizer.decode(ids[:half])}])
        completions.append([{"role": "assistant", "content": tokenizer.decode(ids[half:])}])
    return Dataset.from_dict({"prompt": prompts, "completion": completions})


class _Timer:
    def __init__(self):
        from transformers import TrainerCallback

        timer = self

        class Callback(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                timer.t0 = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                timer.times.append(time.perf_counter() - timer.t0)

        self.times: list[float] = []
        self.callback = Callback()

    def median(self) -> float:
        import statistics

        return statistics.median(self.times[2:] if len(self.times) > 4 else self.times)


def correct_teacher(teacher, train, steps: int, batch_size: int, lr: float, out_dir: str) -> float:
    """Fine-tune `teacher` in place with cross-entropy on `train` for `steps` steps (seed 0); returns seconds."""
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=out_dir, max_steps=steps, per_device_train_batch_size=batch_size, learning_rate=lr,
        lr_scheduler_type="cosine", warmup_steps=max(1, steps // 10), report_to="none", save_strategy="no",
        use_cpu=True, seed=0, disable_tqdm=True, logging_steps=max(1, steps // 4),
    )
    t0 = time.perf_counter()
    Trainer(model=teacher, args=args, train_dataset=train).train()
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return time.perf_counter() - t0


def export_students(students: dict, tokenizer, held_out, scratch: str) -> list[dict]:
    """Each trained student saved in bf16 and exported to bitsandbytes 8-bit and NF4, reloaded: perplexity and MB."""
    from transformers import AutoModelForCausalLM

    from hf_compress.quantization import QuantizationArguments, load_quantized, quantize_and_save

    rows = []
    for name, student in students.items():
        bf16 = copy.deepcopy(student).to(torch.bfloat16)
        folder = os.path.join(scratch, f"export-{name}-bf16")
        bf16.save_pretrained(folder)
        reloaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
        rows.append({"student": name, "format": "bf16 save", "ppl": perplexity(reloaded, held_out),
                     "MB": weight_bytes(folder) / 1e6})
        print(rows[-1], flush=True)
        for label, qargs in (("8-bit", QuantizationArguments(bits=8)), ("NF4", QuantizationArguments(bits=4, quant_type="nf4"))):
            folder = os.path.join(scratch, f"export-{name}-{label}")
            quantize_and_save(bf16, folder, qargs, tokenizer=tokenizer)
            model = load_quantized(folder)
            rows.append({"student": name, "format": label, "ppl": perplexity(model, held_out),
                         "MB": weight_bytes(folder) / 1e6})
            print(rows[-1], flush=True)
            del model
    return rows


def run(steps=60, batch_size=4, seq_len=128, lr=2e-4, alpha=0.9, temperature=1.0, top_k=64, eval_blocks=48,
        parts=PARTS, out_dir=None, threads=None, teacher_steps=0, teacher_lr=5e-5) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer

    from hf_compress.distillation import DistillationArguments, layer_dropped_student
    from hf_compress.models import smollm2_path
    from hf_compress.trainers import DistillationTrainer

    torch.set_num_threads(threads or max(1, min(2, os.cpu_count() or 1)))
    path = smollm2_path()
    tok = AutoTokenizer.from_pretrained(path)
    teacher = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    data = hamlet_blocks(tok, seq_len)
    train = data["train"].select(range(min(len(data["train"]), steps * batch_size)))
    held_out = data["test"].select(range(min(eval_blocks, len(data["test"]))))
    keep = half_layers(teacher.config.num_hidden_layers)
    scratch = out_dir or tempfile.mkdtemp(prefix="hf_compress_lm_distill_")
    result = {
        "model": "SmolLM2-135M-Instruct", "data": "Hamlet (hf_compress.data.load_hamlet), split by scene",
        "train_blocks": len(train), "train_blocks_available": len(data["train"]), "held_out_blocks": len(held_out),
        "seq_len": seq_len, "steps": steps, "batch_size": batch_size, "lr": lr, "alpha": alpha,
        "temperature": temperature, "top_k": top_k, "seed": 0, "student_layers": keep,
        "teacher_params": sum(p.numel() for p in teacher.parameters()),
        "ppl": {"teacher": perplexity(teacher, held_out)}, "teacher_steps": teacher_steps, "teacher_lr": teacher_lr,
    }
    if teacher_steps:
        teacher_train = data["train"].select(range(min(len(data["train"]), teacher_steps * batch_size)))
        result["teacher_correction_s"] = correct_teacher(teacher, teacher_train, teacher_steps, batch_size, teacher_lr,
                                                         os.path.join(scratch, "teacher"))
        result["ppl"]["teacher (corrected)"] = perplexity(teacher, held_out)
    torch.manual_seed(0)
    base_student = layer_dropped_student(teacher, keep)
    result["student_params"] = sum(p.numel() for p in base_student.parameters())
    result["ppl"]["student before training"] = perplexity(base_student, held_out)
    print(json.dumps(result, indent=1), flush=True)
    common = dict(
        max_steps=steps, per_device_train_batch_size=batch_size, per_device_eval_batch_size=batch_size, learning_rate=lr,
        lr_scheduler_type="constant", warmup_steps=0, report_to="none", save_strategy="no", use_cpu=True, seed=0,
        disable_tqdm=True, logging_steps=max(1, steps // 6), temperature=temperature, alpha=alpha,
    )
    timing, logs, trained = {}, {}, {}
    for part in (p for p in parts if p != "exports"):
        student = copy.deepcopy(base_student)
        timer = _Timer()
        run_dir = os.path.join(scratch, part)
        t0 = time.perf_counter()
        if part in ("ce", "live", "cached"):
            args = DistillationArguments(
                output_dir=run_dir, cache_teacher_logits=part == "cached",
                teacher_logits_top_k=top_k if part == "cached" else None,
                teacher_cache_dir=os.path.join(scratch, "teacher-cache") if part == "cached" else None, **common,
            )
            if part == "ce":
                trainer = Trainer(model=student, args=args, train_dataset=train, callbacks=[timer.callback])
            else:
                trainer = DistillationTrainer(
                    model=student, teacher_model=teacher, args=args, train_dataset=train, processing_class=tok,
                    callbacks=[timer.callback],
                )
            if part == "cached":
                result["cache_build_s"] = time.perf_counter() - t0
                cache_dir = os.path.join(scratch, "teacher-cache")
                result["cache_bytes_on_disk"] = sum(os.path.getsize(os.path.join(cache_dir, f)) for f in os.listdir(cache_dir))
                result["cache_tokens"] = len(train) * seq_len
                result["full_vocab_fp16_cache_bytes"] = len(train) * seq_len * teacher.config.vocab_size * 2
        else:
            from trl import SFTTrainer

            from hf_compress.trainers.sft import SFTDistillationConfig, SFTDistillationTrainer

            args = SFTDistillationConfig(
                output_dir=run_dir, max_length=seq_len + 32, bf16=False, completion_only_loss=True,
                alpha=0.0 if part == "sft_ce" else alpha, **{k: v for k, v in common.items() if k not in ("alpha",)},
            )
            chats = chat_blocks(tok, train)
            if part == "sft_ce":
                trainer = SFTTrainer(model=student, args=args, train_dataset=chats, processing_class=tok, callbacks=[timer.callback])
            else:
                trainer = SFTDistillationTrainer(
                    model=student, teacher_model=teacher, args=args, train_dataset=chats, processing_class=tok,
                    callbacks=[timer.callback],
                )
        trainer.train()
        timing[part] = timer.median()
        logs[part] = [h for h in trainer.state.log_history if "loss" in h]
        result["ppl"][part] = perplexity(student, held_out)
        result.setdefault("train_wall_s", {})[part] = time.perf_counter() - t0
        print(part, "held-out ppl", result["ppl"][part], "median step s", timing[part], flush=True)
        if "exports" in parts and part in ("ce", "live"):
            trained[part] = student
        del trainer, student
    if trained:
        result["exports"] = export_students(trained, tok, held_out, scratch)
    result["median_step_s"] = timing
    if "live" in timing and "cached" in timing:
        result["cached_over_live_step_time"] = timing["cached"] / timing["live"]
    if "live" in timing and "ce" in timing:
        result["live_over_ce_step_time"] = timing["live"] / timing["ce"]
    result["logs"] = logs
    if out_dir is None:
        shutil.rmtree(scratch, ignore_errors=True)
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--alpha", type=float, default=0.9)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=64)
    p.add_argument("--eval-blocks", type=int, default=58, help="first N held-out blocks (58: all of them at seq 128)")
    p.add_argument("--parts", default="all", help=f"comma-separated subset of {','.join(PARTS)}")
    p.add_argument("--teacher-steps", type=int, default=60, help="teacher correction: CE fine-tune steps before distilling (0: none)")
    p.add_argument("--teacher-lr", type=float, default=1e-4)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default="benchmarks/results/lm_distillation.json", help="also write the result there")
    a = p.parse_args(argv)
    parts = PARTS if a.parts == "all" else tuple(a.parts.split(","))
    result = run(a.steps, a.batch_size, a.seq_len, a.lr, a.alpha, a.temperature, a.top_k, a.eval_blocks, parts, threads=a.threads,
                 teacher_steps=a.teacher_steps, teacher_lr=a.teacher_lr)
    text = json.dumps(result, indent=2)
    print(text)
    if a.json:
        write_text(a.json, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
