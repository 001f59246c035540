"""Distillation cost against TRL: peak memory and step time of three trainers on the same data, student and teacher.

One command, every row in one run: `python -m benchmarks.trl_cost [--batch-size 2] [--seq-len 64] [--layers 2]
[--warmup 1] [--steps 4]`; writes `benchmarks/results/trl_cost.json` and `.md`.

Trainers (each in a fresh process, one after the other, one thread):

- `hf_compress`: `hf_compress.DistillationTrainer`, live teacher, `alpha=1` (the soft part alone; the hard part is
  still computed, since the batch has labels) and `temperature=1`.
- `trl-gkd`: `trl.experimental.gkd.GKDTrainer` with `lmbda=0` (off-policy: `random.random() <= 0` never samples a
  completion), `seq_kd=False` and `beta=0`: `generalized_jsd_loss` with `beta=0` is `F.kl_div(log q, log p,
  log_target=True)`, i.e. the forward KL(teacher || student) per token averaged over the labelled tokens, which is our
  soft part. GKD's `compute_loss` does not pass its `temperature` to the loss (that field is the sampling
  temperature), so its loss is always at T = 1, without a T^2 factor: hence `temperature=1` for every trainer, the one
  setting where the three objectives are the same function.
- `trl-distillation`: `trl.DistillationTrainer` (`trl.experimental.distillation.DistillationTrainer` is a deprecated
  alias of it) with `beta=0` (forward KL at `temperature`, no T^2). It has no off-policy mode: each step the student
  samples `max_completion_length` tokens after each prompt and the loss covers the completion only. The closest
  off-policy setting is a subclass that replaces only that sampling (`_generate_single_turn`) by the row's own tokens:
  the prompt is the row's first token, the completion the other `seq_len - 1`, so the loss covers the same `seq_len -
  1` next-token positions as the other two. Everything else is TRL's: the backbones' hidden states, its chunked
  `ChunkedDivergenceFunction` (which never builds either model's `[tokens, vocab]` logits, and recomputes the
  projections in the backward pass), the optimizer step.

The same settings for all: SmolLM2-135M's shapes (hidden 576, 9 heads / 3 KV heads, intermediate 1536, tied embeddings)
with `--layers` decoder layers for the student and twice as many for the teacher, at vocabulary 49,152 (SmolLM2) and
262,144 (Gemma-3's), random weights (RMSNorm weights too, uniform in [0.5, 1.5]), float32 on CPU; the same random
tokens (`--batch-size` rows of `--seq-len`, every position labelled), `adamw_torch`, lr 1e-4 constant, no weight
decay, gradient clipping at 1, no gradient checkpointing. The dataset is exactly one batch, so every step trains on
the whole dataset whatever order each trainer's sampler picks, and the first step's loss and gradient norm (logged
before the optimizer moves) must agree between trainers: that is the like-for-like check.

Feeding the same tokens: a tokenized `Dataset` (`input_ids`, `attention_mask`, `labels`) with
`transformers.default_data_collator` for ours and for GKD (whose default `DataCollatorForChatML` wants `messages`,
but its `compute_loss` reads only those three columns, and it skips SFT's dataset preparation); TRL's
DistillationTrainer takes text prompts, so its rows are the same ids written as words of a word-level tokenizer whose
token `t<i>` has id `i` (checked: the tokenizer gives back the ids).

Figures: `median_step_s`, the median wall time of the optimizer steps after `--warmup` steps (forward, backward,
clipping, optimizer; `StepTimer`'s window), and `median_step_cpu_s`, the same steps' process CPU time (one thread, so
it is the step time with the core to itself: on a shared machine it moves less than the wall time).

Memory, per timed step, from the process's resident high-water mark (reset at each step's start through
`/proc/self/clear_refs`), over its resident memory at that start (the optimizer state is already allocated and held,
as in any step but the first): `peak_growth_mb`, the whole step's peak, and `loss_peak_growth_mb`, the peak up to
the optimizer step (forward of both models, loss, backward, clipping): the part a distillation trainer decides. Both
include the student's parameter gradients, the same for every trainer (4 bytes a parameter, `student_grads_mb`).
Each trainer runs twice, in two fresh processes: the times come from a run with glibc's default allocator (what a
user runs), the memory from a run with `MALLOC_MMAP_THRESHOLD_=131072`, where every freed block over 128 KB goes
back to the system at once. With the default allocator freed tensors of up to 32 MB stay in the heap, so the
high-water mark depended on the order of frees and moved by +-40 MB from run to run at 49,152 (kept as
`peak_growth_default_malloc_mb`); with the threshold it is the peak of the live tensors, the same to 1-2 MB in
repeated runs. `first_step_growth_mb` is the first step's growth over the post-setup high-water mark (optimizer state
allocated there, the same for every trainer), and `peak_rss_mb` the process's peak over its whole life.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

VOCABS = {"SmolLM2 49,152": 49152, "Gemma-3 262,144": 262144}
TRAINERS = ("hf_compress", "trl-gkd", "trl-distillation")
TEMPERATURE = 1.0
LEARNING_RATE = 1e-4
# Relative difference allowed between two trainers' first-step loss (and gradient norm): float32 sums over
# `tokens x vocab` terms in different orders and chunkings.
LOSS_RTOL = 1e-4
MEMORY_RTOL = 0.01
MEMORY_FIELDS = ("peak_growth_mb", "loss_peak_growth_mb", "first_step_growth_mb", "peak_rss_mb")


def _config(vocab: int, layers: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers, num_attention_heads=9,
        num_key_value_heads=3, head_dim=64, max_position_embeddings=2048, tie_word_embeddings=True,
        pad_token_id=0, bos_token_id=None, eos_token_id=2,
    )


def _model(vocab: int, layers: int, seed: int):
    """A random-weight LLaMA with SmolLM2-135M's shapes; RMSNorm weights random too (not all ones)."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(_config(vocab, layers))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def _tokenizer(vocab: int):
    """Word level, `vocab` tokens: `<pad>` 0, `<unk>` 1, `<eos>` 2, then `t<i>` has id `i`; no special tokens added."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<pad>": 0, "<unk>": 1, "<eos>": 2, **{f"t{i}": i for i in range(3, vocab)}}
    backend = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>",
                                   padding_side="left")


def _token_ids(vocab: int, batch_size: int, seq_len: int) -> list[list[int]]:
    import torch

    g = torch.Generator().manual_seed(0)
    return torch.randint(3, vocab, (batch_size, seq_len), generator=g).tolist()


def _probe_class():
    import statistics
    import time

    from transformers import TrainerCallback

    from benchmarks.common import StepTimer, reset_peak_rss
    from benchmarks.common import proc_status_mb as status

    class MemoryProbe(StepTimer):
        """Step times, the memory figures of the module's docstring, and the logged loss / gradient norm per step."""

        def __init__(self, warmup: int):
            super().__init__()
            self.warmup, self.logs, self.cpu_times = warmup, [], []
            self.post_setup_hwm = self.first_step_hwm = self.lifetime_hwm = None
            self.step_growth, self.loss_growth = [], []

        def on_step_begin(self, args, state, control, **kwargs):
            if not self.times:
                self.post_setup_hwm = status("VmHWM")
            if len(self.times) >= self.warmup:
                if len(self.times) == self.warmup:
                    self.lifetime_hwm = status("VmHWM")
                reset_peak_rss()
                self.step_base_rss = status("VmRSS")
            self._cpu0 = time.process_time()
            super().on_step_begin(args, state, control, **kwargs)

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            if len(self.times) >= self.warmup:  # forward, loss, backward and clipping, before the optimizer
                self.loss_growth.append(status("VmHWM") - self.step_base_rss)

        def on_step_end(self, args, state, control, **kwargs):
            super().on_step_end(args, state, control, **kwargs)
            self.cpu_times.append(time.process_time() - self._cpu0)
            if len(self.times) > self.warmup:
                self.step_growth.append(status("VmHWM") - self.step_base_rss)
                self.timed_peak = status("VmHWM")
            if len(self.times) == 1:
                self.first_step_hwm = status("VmHWM")

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.logs.append({"step": state.global_step, "loss": logs["loss"], "grad_norm": logs.get("grad_norm")})

        def result(self) -> dict:
            return {
                "median_step_s": statistics.median(self.times[self.warmup:]), "step_s": self.times,
                "median_step_cpu_s": statistics.median(self.cpu_times[self.warmup:]), "step_cpu_s": self.cpu_times,
                "peak_growth_mb": max(self.step_growth), "loss_peak_growth_mb": max(self.loss_growth),
                "first_step_growth_mb": self.first_step_hwm - self.post_setup_hwm,
                "peak_rss_mb": max(self.timed_peak, self.lifetime_hwm), "logs": self.logs, "measured_at": time.time(),
            }

    return MemoryProbe


def _common_args(output_dir: str, batch_size: int, steps: int) -> dict:
    return dict(
        output_dir=output_dir, per_device_train_batch_size=batch_size, max_steps=steps, learning_rate=LEARNING_RATE,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, optim="adamw_torch", max_grad_norm=1.0,
        logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, bf16=False, fp16=False,
        gradient_checkpointing=False, disable_tqdm=True, seed=0, dataloader_num_workers=0,
    )


def _trl_distillation_off_policy():
    """`trl.DistillationTrainer` with its sampling replaced by the row's own tokens (see the module's docstring)."""
    from trl import DistillationTrainer

    class DataCompletionDistillationTrainer(DistillationTrainer):
        def _tokenize_prompts(self, prompts):
            prompt_ids, images, fields = super()._tokenize_prompts(prompts)
            self._row_completions = [ids[1:] for ids in prompt_ids]
            return [ids[:1] for ids in prompt_ids], images, fields

        def _generate_single_turn(self, prompt_ids, images, multimodal_fields, has_tool_images=False):
            return self._row_completions

    return DataCompletionDistillationTrainer


def _trainer(name: str, student, teacher, tok, ids: list[list[int]], common: dict):
    from datasets import Dataset
    from transformers import default_data_collator

    tokenized = Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(r) for r in ids], "labels": ids})
    if name == "hf_compress":
        from hf_compress import DistillationArguments, DistillationTrainer

        args = DistillationArguments(temperature=TEMPERATURE, alpha=1.0, **common)
        return DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=tokenized,
                                   data_collator=default_data_collator, processing_class=tok, teacher_tokenizer=tok)
    if name == "trl-gkd":
        from trl.experimental.gkd import GKDConfig, GKDTrainer

        args = GKDConfig(lmbda=0.0, beta=0.0, seq_kd=False, temperature=TEMPERATURE, max_length=None, **common)
        return GKDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=tokenized,
                          data_collator=default_data_collator, processing_class=tok)
    from trl import DistillationConfig

    prompts = [" ".join(f"t{i}" for i in row) for row in ids]
    if tok(prompts)["input_ids"] != ids:
        raise RuntimeError("The word-level tokenizer does not give back the benchmark's token ids.")
    args = DistillationConfig(beta=0.0, temperature=TEMPERATURE, max_completion_length=len(ids[0]) - 1,
                              shuffle_dataset=False, **common)
    return _trl_distillation_off_policy()(model=student, teacher_model=teacher, args=args,
                                          train_dataset=Dataset.from_dict({"prompt": prompts}), processing_class=tok)


def _one(name: str, vocab: int, batch_size: int, seq_len: int, layers: int, warmup: int, steps: int) -> dict:
    import warnings

    import torch

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    student, teacher = _model(vocab, layers, seed=1), _model(vocab, 2 * layers, seed=0).eval().requires_grad_(False)
    tok = _tokenizer(vocab)
    probe = _probe_class()(warmup)
    with tempfile.TemporaryDirectory(prefix="trl-cost-") as out:
        trainer = _trainer(name, student, teacher, tok, _token_ids(vocab, batch_size, seq_len),
                           _common_args(out, batch_size, warmup + steps))
        trainer.add_callback(probe)
        trainer.train()
    params = sum(p.numel() for p in student.parameters())
    return {"trainer": name, "vocab": vocab, **probe.result(), "student_params": params,
            "student_grads_mb": params * 4 / 2**20}


def _loss_agreement(rows: list[dict]) -> dict:
    """First-step loss and gradient norm of each trainer, and their largest relative gap to ours."""
    ours = next(r for r in rows if r["trainer"] == "hf_compress")["logs"][0]
    out = {}
    for r in rows:
        first = r["logs"][0]
        out[r["trainer"]] = {
            "loss": first["loss"], "grad_norm": first["grad_norm"],
            "loss_rel_diff": abs(first["loss"] - ours["loss"]) / abs(ours["loss"]),
            "grad_norm_rel_diff": abs(first["grad_norm"] - ours["grad_norm"]) / abs(ours["grad_norm"]),
            "last_loss": r["logs"][-1]["loss"],
        }
    return out


def _child(cmd: list[str], env: dict, what: str) -> dict:
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"{what} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(batch_size: int = 2, seq_len: int = 64, layers: int = 2, warmup: int = 1, steps: int = 4,
        output_dir: str | None = "benchmarks/results", vocabs: dict[str, int] | None = None) -> dict:
    import platform
    import time

    from benchmarks.common import MMAP_THRESHOLD, live_tensor_env

    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONWARNINGS="ignore", TRL_EXPERIMENTAL_SILENCE="1")
    env["PYTHONPATH"] = os.pathsep.join([os.getcwd(), env.get("PYTHONPATH", "")])
    memory_env = live_tensor_env(env)
    started = time.time()
    results, rows = {}, []
    for label, vocab in (vocabs or VOCABS).items():
        runs = []
        for name in TRAINERS:
            cmd = [sys.executable, "-m", "benchmarks.trl_cost", "--one", name, "--vocab", str(vocab),
                   "--batch-size", str(batch_size), "--seq-len", str(seq_len), "--layers", str(layers),
                   "--warmup", str(warmup), "--steps", str(steps)]
            timed, measured = (_child(cmd, e, f"{name} at vocabulary {vocab}") for e in (env, memory_env))
            runs.append({**timed, "peak_growth_default_malloc_mb": timed["peak_growth_mb"],
                         **{k: measured[k] for k in MEMORY_FIELDS}, "memory_logs": measured["logs"]})
            print(f"{label} {name}: {runs[-1]['peak_growth_mb']:.0f} MB step, {runs[-1]['loss_peak_growth_mb']:.0f} MB "
                  f"to the optimizer, {runs[-1]['median_step_s']:.3f} s", flush=True)
        ours = runs[0]
        agreement = _loss_agreement(runs)
        for r in runs:
            rows.append({
                "vocab": label, "trainer": r["trainer"], "peak_growth_mb": r["peak_growth_mb"],
                "peak_over_ours": r["peak_growth_mb"] / ours["peak_growth_mb"],
                "loss_peak_growth_mb": r["loss_peak_growth_mb"],
                "loss_peak_over_ours": r["loss_peak_growth_mb"] / ours["loss_peak_growth_mb"],
                "peak_growth_default_malloc_mb": r["peak_growth_default_malloc_mb"], "median_step_s": r["median_step_s"],
                "step_over_ours": r["median_step_s"] / ours["median_step_s"],
                "median_step_cpu_s": r["median_step_cpu_s"],
                "cpu_over_ours": r["median_step_cpu_s"] / ours["median_step_cpu_s"],
                "first_step_growth_mb": r["first_step_growth_mb"], "peak_rss_mb": r["peak_rss_mb"],
                "first_loss": agreement[r["trainer"]]["loss"],
                "loss_rel_diff": agreement[r["trainer"]]["loss_rel_diff"],
                "grad_norm_rel_diff": agreement[r["trainer"]]["grad_norm_rel_diff"],
            })
        results[label] = {"runs": runs, "loss_agreement": agreement,
                          "logits_copy_mb": batch_size * seq_len * vocab * 4 / 2**20}
    trl_rows = [r for r in rows if r["trainer"] != "hf_compress"]
    summary = {
        "settings": {
            "batch_size": batch_size, "seq_len": seq_len, "student_layers": layers, "teacher_layers": 2 * layers,
            "warmup_steps": warmup, "timed_steps": steps, "temperature": TEMPERATURE, "alpha": 1.0, "beta": 0.0,
            "lmbda": 0.0, "learning_rate": LEARNING_RATE, "optimizer": "adamw_torch", "dtype": "float32",
            "device": "cpu", "threads": 1, "loss_rtol": LOSS_RTOL,
            "memory_runs_malloc_mmap_threshold": MMAP_THRESHOLD, "memory_rtol": MEMORY_RTOL, "trl": _version("trl"),
            "transformers": _version("transformers"), "torch": _version("torch"), "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d", time.gmtime(started)), "wall_s": round(time.time() - started, 1),
        },
        "rows": rows,
        "losses_agree": all(r["loss_rel_diff"] <= LOSS_RTOL and r["grad_norm_rel_diff"] <= LOSS_RTOL for r in rows),
        "lower_peak_than_trl": all(r["peak_over_ours"] > 1 for r in trl_rows),
        # Within MEMORY_RTOL: the memory runs repeat to 1-2 MB, so 1% is a tie, not a lead.
        "loss_peak_at_most_trl": all(r["loss_peak_over_ours"] >= 1 - MEMORY_RTOL for r in trl_rows),
        "lower_loss_peak_than_trl": all(r["loss_peak_over_ours"] > 1 + MEMORY_RTOL for r in trl_rows),
        "same_loss_in_memory_runs": all(
            r["memory_logs"] == r["logs"] for v in results.values() for r in v["runs"]),
        "faster_than_trl": all(r["step_over_ours"] > 1 and r["cpu_over_ours"] > 1 for r in trl_rows),
        "by_vocab": results,
    }
    text = _markdown(summary)
    print(text)
    if output_dir:
        from benchmarks.common import write_results

        os.makedirs(output_dir, exist_ok=True)
        write_results(output_dir, "trl_cost", summary, text)
    return summary


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


def _markdown(summary: dict) -> str:
    from benchmarks.common import print_table

    s = summary["settings"]
    head = (
        f"Distillation cost against TRL {s['trl']} (transformers {s['transformers']}, torch {s['torch']}): "
        "SmolLM2-135M "
        f"shapes, student {s['student_layers']} layers, teacher {s['teacher_layers']}, random weights, float32, CPU, "
        f"{s['threads']} thread; batch {s['batch_size']} x {s['seq_len']} tokens, T={s['temperature']}, forward KL "
        f"(ours alpha=1, GKD lmbda=0 beta=0, TRL distillation beta=0 off-policy); median of {s['timed_steps']} steps "
        f"after {s['warmup_steps']} warm-up; {s['date']}, {s['wall_s']:.0f} s in all.\n\n"
    )
    cols = ["vocab", "trainer", "peak_growth_mb", "peak_over_ours", "loss_peak_growth_mb", "loss_peak_over_ours",
            "peak_growth_default_malloc_mb", "median_step_s", "step_over_ours",
            "median_step_cpu_s", "cpu_over_ours", "peak_rss_mb",
            "first_loss", "loss_rel_diff", "grad_norm_rel_diff"]
    table = print_table(summary["rows"], cols)
    tail = (
        f"\n\nFirst-step loss and gradient norm agree within {s['loss_rtol']:g} (relative): "
        f"{summary['losses_agree']} (the memory runs logged the same losses: {summary['same_loss_in_memory_runs']}). "
        f"Lower whole-step peak than both TRL trainers: {summary['lower_peak_than_trl']}; peak up to the optimizer "
        f"step at most theirs (within {s['memory_rtol']:.0%}): {summary['loss_peak_at_most_trl']}, lower than both: "
        f"{summary['lower_loss_peak_than_trl']}; faster steps: {summary['faster_than_trl']}.\n"
    )
    return head + table + tail


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--layers", type=int, default=2, help="student decoder layers (the teacher has twice as many)")
    p.add_argument("--warmup", type=int, default=1, help="steps before the timed ones")
    p.add_argument("--steps", type=int, default=4, help="timed steps")
    p.add_argument("--vocab-only", type=int, choices=sorted(VOCABS.values()), help="run one vocabulary only")
    p.add_argument("--output-dir", default="benchmarks/results")
    p.add_argument("--one", choices=TRAINERS, help=argparse.SUPPRESS)
    p.add_argument("--vocab", type=int, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.warmup < 1 or a.steps < 1:
        p.error(f"--warmup and --steps must be >= 1 (the first step allocates the optimizer state), got "
                f"{a.warmup} and {a.steps}.")
    if a.one:
        print(json.dumps(_one(a.one, a.vocab, a.batch_size, a.seq_len, a.layers, a.warmup, a.steps)))
        return 0
    vocabs = {k: v for k, v in VOCABS.items() if a.vocab_only in (None, v)}
    run(a.batch_size, a.seq_len, a.layers, a.warmup, a.steps, a.output_dir, vocabs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
