"""Peak memory of one distillation step: a live teacher in memory vs the teacher's top-k logits from a Hub cache.

One command: `python -m benchmarks.teacher_memory [--batch-size 2] [--seq-len 128] [--top-k 64]`.

SmolLM2-135M's shapes (hidden 576, 9 heads / 3 KV heads, intermediate 1536, vocab 49,152, tied embeddings), random
weights, float32: the teacher has SmolLM2-135M's 30 layers, the student 15. Each mode runs in a fresh process and
reports its peak resident memory (`ru_maxrss`) after building what it needs and running one forward + backward of
the student on a `[batch, seq]` batch with `hf_compress.distillation.distillation_loss`:

- `live`: (a) the teacher replicated beside the student (as each DDP rank holds it) and run on the batch;
- `hub-cache`: (c) no teacher in the process: the top-k log-probabilities and ids of the batch are read from a
  cache written by `hf_compress.distillation.hub_cache.write_teacher_cache_folder` (the folder a push uploads;
  read with `load_hub_teacher_cache`, no network) and placed by `TeacherCacheCollator`.

The cache is written beforehand by a third process (`--write-cache`), which is not measured. `baseline` is a process
that only imports torch, transformers and hf_compress, to read the figures against.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

MODES = ("baseline", "live", "hub-cache")
VOCAB = 49152


def _config(layers: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=VOCAB, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers, num_attention_heads=9,
        num_key_value_heads=3, head_dim=64, max_position_embeddings=2048, tie_word_embeddings=True,
    )


def _data(batch_size: int, seq_len: int):
    import torch
    from datasets import Dataset

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, VOCAB, (batch_size, seq_len), generator=g)
    return Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})


def _tokenizer():
    """A word-level tokenizer with SmolLM2's vocabulary size (only its vocabulary digest goes into the key)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<unk>": 1, **{f"t{i}": i for i in range(2, VOCAB)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>")


def write_cache(folder: str, batch_size: int, seq_len: int, top_k: int) -> None:
    import torch
    from transformers import LlamaForCausalLM

    from hf_compress.distillation.hub_cache import write_teacher_cache_folder

    torch.manual_seed(0)
    teacher = LlamaForCausalLM(_config(30)).eval()
    write_teacher_cache_folder(folder, teacher, _data(batch_size, seq_len), _tokenizer(), "causal-lm", top_k, 2.0,
                               batch_size=batch_size)


def _step(mode: str, batch_size: int, seq_len: int, cache_dir: str | None) -> dict:
    import resource

    import torch
    from transformers import LlamaForCausalLM

    from hf_compress.distillation import distillation_loss
    from hf_compress.distillation import cache as teacher_cache

    torch.set_num_threads(1)
    if mode == "baseline":
        return {"mode": mode, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    torch.manual_seed(1)
    student = LlamaForCausalLM(_config(15))
    ds = _data(batch_size, seq_len)
    if mode == "live":
        torch.manual_seed(0)
        teacher = LlamaForCausalLM(_config(30)).eval().requires_grad_(False)
        batch = {k: torch.tensor(ds[k]) for k in ("input_ids", "attention_mask")}
        with torch.no_grad():
            teacher_logits, indices = teacher(**batch).logits, None
    else:
        from transformers import DataCollatorWithPadding

        from hf_compress.distillation.hub_cache import load_hub_teacher_cache

        cache, key = load_hub_teacher_cache(cache_dir)
        collate = teacher_cache.TeacherCacheCollator(DataCollatorWithPadding(_tokenizer()), "causal-lm", cache,
                                                     dtype=key["dtype"], width=key["width"])
        rows = ds.add_column(teacher_cache.ROW, list(range(len(ds))))
        batch = collate([rows[i] for i in range(len(rows))])
        teacher_logits, indices = batch.pop(teacher_cache.LOGITS), batch.pop(teacher_cache.INDICES)
        batch.pop(teacher_cache.COVERED)
    logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    loss = distillation_loss(logits, teacher_logits, batch["input_ids"], 2.0, 0.5, shift_labels=True,
                             attention_mask=batch["attention_mask"], teacher_indices=indices).loss
    loss.backward()
    params = sum(p.numel() for p in student.parameters())
    return {"mode": mode, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "student_params": params, "loss": loss.item()}


def run(batch_size: int = 2, seq_len: int = 128, top_k: int = 64) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join([os.getcwd(), env.get("PYTHONPATH", "")])
    common = ["--batch-size", str(batch_size), "--seq-len", str(seq_len), "--top-k", str(top_k)]
    results = {}
    with tempfile.TemporaryDirectory(prefix="teacher-memory-") as tmp:
        folder = os.path.join(tmp, "cache")
        env["HF_DATASETS_CACHE"] = os.path.join(tmp, "datasets")
        me = [sys.executable, "-m", "benchmarks.teacher_memory"]
        subprocess.run(me + ["--write-cache", folder, *common], env=env, check=True, capture_output=True, text=True)
        for mode in MODES:
            out = subprocess.run(me + ["--one", mode, "--cache-dir", folder, *common], capture_output=True, text=True,
                                 env=env, check=True)
            results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
        cache_bytes = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(folder) for f in fs)
    summary = {
        "batch_size": batch_size, "seq_len": seq_len, "vocab": VOCAB, "teacher_layers": 30, "student_layers": 15,
        "top_k": top_k, "cache_folder_bytes": cache_bytes,
        **{f"{m}_peak_rss_mb": r["peak_rss_mb"] for m, r in results.items()},
    }
    summary["live_over_hub_cache"] = summary["live_peak_rss_mb"] / summary["hub-cache_peak_rss_mb"]
    return summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--top-k", type=int, default=64)
    p.add_argument("--one", choices=MODES, help=argparse.SUPPRESS)
    p.add_argument("--cache-dir", help=argparse.SUPPRESS)
    p.add_argument("--write-cache", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.write_cache:
        write_cache(a.write_cache, a.batch_size, a.seq_len, a.top_k)
        return 0
    if a.one:
        print(json.dumps(_step(a.one, a.batch_size, a.seq_len, a.cache_dir)))
        return 0
    print(json.dumps(run(a.batch_size, a.seq_len, a.top_k), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
