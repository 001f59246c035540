"""Peak memory of one causal-LM training step: distillation vs plain fine-tuning.

One command: `python -m benchmarks.distillation_memory [--batch-size 4] [--seq-len 128] [--layers 2] [--vocab 49152]
[--hidden 576] [--dtype float32]` (Gemma-3-270M's head: `--vocab 262144 --hidden 640 --dtype bfloat16`), or
`--real gemma3`: the real Gemma-3-270M (its GGUF packages, `hf_compress.models.gemma3_path`) as the teacher and its
half-depth copy (`benchmarks.lm_distillation.half_layers`: 9 of its 18 layers) as the student, in `--dtype`, on blocks of Hamlet's text.

Each mode runs in a fresh process: SmolLM2-135M's shapes (hidden 576, 9 heads / 3 KV heads of 64, intermediate 1536, vocab
49,152, tied embeddings; `--vocab` / `--hidden` change those two, with `hidden / 64` heads) with `--layers` decoder layers for the student
(twice as many for the teacher), random weights in `--dtype`, one forward + backward on a `[batch, seq]` batch. The
figure is the growth of the process's peak resident memory during the step over its resident memory when the step
starts (the high-water mark is reset there through `/proc/self/clear_refs`, so setup's transients hide nothing), with `MALLOC_MMAP_THRESHOLD_=131072` (every freed block over 128 KB goes back to the
system at once, so it is the peak of the live tensors, not of glibc's heap); it includes the student's parameter
gradients (the same in every mode: at the defaults 2 x 4 MB per layer plus 113 MB for the tied embedding). Modes:

- `plain`: the student's own loss (`model(input_ids, labels=...)`, transformers' causal-LM cross-entropy);
- `distill`: live teacher + `hf_compress.distillation.distillation_loss` on both models' logits (chunked, gradient
  computed with the loss);
- `distill-projected`: the same loss with both output heads projected in the loss, as `DistillationTrainer` runs a
  training step (`hf_compress.distillation.heads`: neither model's `[batch, seq, vocab]` logits are built);
- `distill-unchunked`: the loss written with full-size float32 `log_softmax`es for student and teacher plus
  cross-entropy (several `[batch, seq, vocab]` float32 copies kept for backward).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

MODES = ("plain", "distill", "distill-projected", "distill-unchunked")


def _config(layers: int, vocab: int = 49152, hidden: int = 576):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=1536, num_hidden_layers=layers,
        num_attention_heads=hidden // 64, num_key_value_heads=3 if hidden // 64 % 3 == 0 else 1, head_dim=64, max_position_embeddings=2048, tie_word_embeddings=True,
    )


def _unchunked(s, t, labels, temperature=2.0, alpha=0.5):
    import torch.nn.functional as F

    s, t, y = s[:, :-1].float(), t[:, :-1].float(), labels[:, 1:]
    logq = F.log_softmax(s / temperature, -1)
    logp = F.log_softmax(t / temperature, -1)
    soft = (logp.exp() * (logp - logq)).sum(-1).mean() * temperature**2
    hard = F.cross_entropy(s.reshape(-1, s.shape[-1]), y.reshape(-1))
    return (1 - alpha) * hard + alpha * soft


def _real_pair(name: str, dtype, batch_size: int, seq_len: int):
    """The real teacher, its half-depth student and `[batch, seq]` Hamlet token ids."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from benchmarks.lm_distillation import half_layers, hamlet_blocks
    from hf_compress.distillation import layer_dropped_student
    from hf_compress.models import gemma3_path

    if name != "gemma3":
        raise ValueError(f"--real {name!r}: only `gemma3` is offered.")
    path = gemma3_path()
    teacher = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval().requires_grad_(False)
    student = layer_dropped_student(teacher, half_layers(teacher.config.num_hidden_layers)).train()
    blocks = hamlet_blocks(AutoTokenizer.from_pretrained(path), seq_len)["train"]
    return student, teacher, torch.tensor(blocks["input_ids"][:batch_size])


def _step(mode: str, batch_size: int, seq_len: int, layers: int, vocab: int = 49152, hidden: int = 576,
          dtype: str = "float32", real: str | None = None) -> dict:
    import torch
    from transformers import LlamaForCausalLM

    from benchmarks.common import proc_status_mb, reset_peak_rss
    from hf_compress.distillation import distillation_loss, heads

    torch.set_num_threads(1)
    torch.manual_seed(0)
    if real:
        student, teacher, ids = _real_pair(real, getattr(torch, dtype), batch_size, seq_len)
    else:
        torch.set_default_dtype(getattr(torch, dtype))
        student = LlamaForCausalLM(_config(layers, vocab, hidden))
        teacher = LlamaForCausalLM(_config(2 * layers, vocab, hidden)).eval().requires_grad_(False)
        torch.set_default_dtype(torch.float32)
        ids = torch.randint(0, vocab, (batch_size, seq_len))

    def step():
        student.zero_grad(set_to_none=True)
        if mode == "plain":
            loss = student(input_ids=ids, labels=ids).loss
        elif mode == "distill-projected":
            s_head, t_head = heads.output_head(student)[0], heads.output_head(teacher)[0]
            with heads.HeadInputCapture(s_head) as s_in:
                student(input_ids=ids)
            with torch.no_grad(), heads.HeadInputCapture(t_head) as t_in:
                teacher(input_ids=ids)
            loss = distillation_loss(s_head.logits(s_in.hidden), t_head.logits(t_in.hidden), ids, 2.0, 0.5,
                                     shift_labels=True).loss
        else:
            logits = student(input_ids=ids).logits
            with torch.no_grad():
                t = teacher(input_ids=ids).logits
            if mode == "distill":
                loss = distillation_loss(logits, t, ids, 2.0, 0.5, shift_labels=True).loss
            else:
                loss = _unchunked(logits, t, ids)
        loss.backward()
        return loss.item()

    base = proc_status_mb("VmRSS")
    reset_peak_rss()  # the high-water mark starts again from the resident size: setup's transients do not count
    loss = step()
    after = proc_status_mb("VmHWM")
    return {"mode": mode, "peak_growth_mb": after - base, "peak_rss_mb": after, "loss": loss,
            "vocab": student.config.vocab_size, "hidden": student.config.hidden_size,
            "student_layers": student.config.num_hidden_layers, "teacher_layers": teacher.config.num_hidden_layers}


def run(batch_size: int = 4, seq_len: int = 128, layers: int = 2, vocab: int = 49152, hidden: int = 576,
        dtype: str = "float32", real: str | None = None) -> dict:
    from benchmarks.common import MMAP_THRESHOLD, live_tensor_env

    env = live_tensor_env(dict(os.environ, OMP_NUM_THREADS="1"))
    env["PYTHONPATH"] = os.pathsep.join([os.getcwd(), env.get("PYTHONPATH", "")])
    results = {}
    for mode in MODES:
        out = subprocess.run(
            [sys.executable, "-m", "benchmarks.distillation_memory", "--one", mode, "--batch-size", str(batch_size),
             "--seq-len", str(seq_len), "--layers", str(layers), "--vocab", str(vocab), "--hidden", str(hidden),
             "--dtype", dtype, *(["--real", real] if real else [])],
            capture_output=True, text=True, env=env, check=True,
        )
        results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    itemsize = 2 if dtype == "bfloat16" else 4
    if real:
        vocab, hidden = results["plain"]["vocab"], results["plain"]["hidden"]
        layers = results["plain"]["student_layers"]
    summary = {
        "real": real, "batch_size": batch_size, "seq_len": seq_len, "vocab": vocab, "hidden": hidden, "dtype": dtype,
        "student_layers": layers, "teacher_layers": results["distill"].get("teacher_layers", 2 * layers),
        "malloc_mmap_threshold": MMAP_THRESHOLD,
        "one_logits_copy_mb": batch_size * seq_len * vocab * itemsize / 2**20,
        "one_fp32_logits_copy_mb": batch_size * seq_len * vocab * 4 / 2**20,
        **{f"{m}_peak_growth_mb": r["peak_growth_mb"] for m, r in results.items()},
        **{f"{m}_loss": r["loss"] for m, r in results.items()},
    }
    for m in MODES[1:]:
        summary[f"{m}_over_plain"] = summary[f"{m}_peak_growth_mb"] / summary["plain_peak_growth_mb"]
    return summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--real", choices=("gemma3",), help="the real Gemma-3-270M teacher and its half-depth student")
    p.add_argument("--one", choices=MODES, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.one:
        print(json.dumps(_step(a.one, a.batch_size, a.seq_len, a.layers, a.vocab, a.hidden, a.dtype, a.real)))
        return 0
    print(json.dumps(run(a.batch_size, a.seq_len, a.layers, a.vocab, a.hidden, a.dtype, a.real), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
