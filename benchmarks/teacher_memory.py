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

- `fsdp2`: (b) teacher and student `fully_shard`-ed over 2 ranks (`torchrun --nproc_per_node=2`, gloo, CPU), each
  rank half the batch; both built on the meta device and materialised after sharding (`to_empty`), so no rank ever
  holds a whole model; every rank reports its own peak.

The cache is written beforehand by a third process (`--write-cache`), which is not measured. `baseline` is a process
that only imports torch, transformers and hf_compress, to read the figures against. The results go to
`benchmarks/results/teacher_memory.{json,md}` (atomic writes), with the 8B-teacher / 1B-student extrapolation of
`extrapolate()`: a calculation on paper from the parameter counts, not a measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

MODES = ("baseline", "live", "hub-cache", "fsdp2")
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


def _sharded(layers: int, mesh, seed: int):
    """A Llama of SmolLM2's shapes built on the meta device, `fully_shard`-ed per decoder layer and at the root, then
    materialised shard by shard (random normal weights, unit norms) with fresh rotary tables."""
    import torch
    from torch.distributed.fsdp import fully_shard
    from transformers import LlamaForCausalLM

    cfg = _config(layers)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    model.to_empty(device="cpu")
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0) if "norm" in name else p.normal_(0.0, 0.02)
    model.model.rotary_emb = type(model.model.rotary_emb)(cfg)  # non-persistent buffers: to_empty left them blank
    return model


def _fsdp2_step(batch_size: int, seq_len: int) -> dict:
    import resource

    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from hf_compress.distillation import distillation_loss

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    ws, rank = dist.get_world_size(), dist.get_rank()
    mesh = init_device_mesh("cpu", (ws,))
    student = _sharded(15, mesh, 1)
    teacher = _sharded(30, mesh, 0).eval().requires_grad_(False)
    ds = _data(batch_size, seq_len)
    batch = {k: torch.tensor(ds[k]).chunk(ws)[rank] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        teacher_logits = teacher(**batch).logits
    logits = student(**batch).logits
    loss = distillation_loss(logits, teacher_logits, batch["input_ids"], 2.0, 0.5, shift_labels=True,
                             attention_mask=batch["attention_mask"]).loss
    loss.backward()
    local = sum(p.to_local().numel() for p in student.parameters())
    peak = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024], dtype=torch.float64)
    peaks = [torch.zeros_like(peak) for _ in range(ws)]
    dist.all_gather(peaks, peak)
    dist.destroy_process_group()
    return {"mode": "fsdp2", "ranks": ws, "peak_rss_mb_per_rank": [float(p) for p in peaks],
            "peak_rss_mb": max(float(p) for p in peaks), "student_params_rank0_shard": local,
            "rows_per_rank": int(batch["input_ids"].shape[0]), "loss_rank0": loss.item()}


def _params(config) -> int:
    import torch
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        return sum(p.numel() for p in LlamaForCausalLM(config).parameters())


def extrapolate(ranks: int = 8) -> dict:
    """
    On paper: per-GPU bytes of the weights and training state of an 8B teacher (Llama-3.1-8B's shapes) with a 1B
    student (Llama-3.2-1B's shapes), bf16 weights and gradients, fp32 AdamW moments (2 x 4 bytes); activations,
    logits and the framework's own memory are left out. (a) a whole teacher beside a whole student on each GPU (DDP);
    (b) both sharded over `ranks` GPUs (FSDP2: 1/ranks of each, plus the largest all-gathered unit in flight: the
    teacher's root group, its untied embeddings and head); (c) no teacher (Hub cache), a whole student per GPU.
    """
    from transformers import LlamaConfig

    teacher = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                          num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False)
    student = LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                          num_attention_heads=32, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True)
    t, s = _params(teacher), _params(student)
    gb = 1e9
    teacher_bytes, student_bytes = 2 * t, (2 + 2 + 8) * s
    root = 2 * 2 * teacher.vocab_size * teacher.hidden_size  # embeddings + head, bf16, gathered for the root forward
    a = (teacher_bytes + student_bytes) / gb
    b = (teacher_bytes + student_bytes) / ranks / gb + root / gb
    c = student_bytes / gb
    return {
        "teacher_params": t, "student_params": s, "gpus": ranks,
        "formula": "(a) 2*T + 12*S; (b) (2*T + 12*S)/gpus + 4*vocab*hidden_T; (c) 12*S  [bytes; T, S parameters]",
        "a_ddp_live_gb_per_gpu": round(a, 2), "b_fsdp2_gb_per_gpu": round(b, 2), "c_hub_cache_gb_per_gpu": round(c, 2),
        "a_over_b": round(a / b, 2), "a_over_c": round(a / c, 2), "c_over_b": round(c / b, 2),
    }


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
            cmd = me + ["--one", mode, "--cache-dir", folder, *common]
            if mode == "fsdp2":
                cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                       "-m", "benchmarks.teacher_memory", *cmd[3:]]
            out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
            lines = [line for line in out.stdout.strip().splitlines() if line.startswith("{")]
            results[mode] = json.loads(lines[-1])
        cache_bytes = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(folder) for f in fs)
    summary = {
        "batch_size": batch_size, "seq_len": seq_len, "vocab": VOCAB, "teacher_layers": 30, "student_layers": 15,
        "top_k": top_k, "cache_folder_bytes": cache_bytes,
        **{f"{m}_peak_rss_mb": r["peak_rss_mb"] for m, r in results.items()},
    }
    summary["live_over_hub_cache"] = summary["live_peak_rss_mb"] / summary["hub-cache_peak_rss_mb"]
    summary["fsdp2_peak_rss_mb_per_rank"] = results["fsdp2"]["peak_rss_mb_per_rank"]
    summary["live_over_fsdp2"] = summary["live_peak_rss_mb"] / summary["fsdp2_peak_rss_mb"]
    summary["extrapolated_8b_teacher_1b_student"] = extrapolate(8)
    return summary


def markdown(r: dict) -> str:
    x = r["extrapolated_8b_teacher_1b_student"]
    rows = [
        ("imports only (torch, transformers, hf_compress)", f"{r['baseline_peak_rss_mb']:,.0f} MB"),
        ("(a) live teacher beside the student", f"{r['live_peak_rss_mb']:,.0f} MB"),
        ("(b) FSDP2-sharded teacher and student, 2 ranks (torch fully_shard on gloo), per rank",
         " / ".join(f"{v:,.0f}" for v in r["fsdp2_peak_rss_mb_per_rank"]) + " MB"),
        (f"(c) top-{r['top_k']} teacher logits from the pushed cache folder", f"{r['hub-cache_peak_rss_mb']:,.0f} MB"),
    ]
    lines = [f"Batch [{r['batch_size']}, {r['seq_len']}], SmolLM2-135M shapes, teacher {r['teacher_layers']} layers, "
             f"student {r['student_layers']}, float32, CPU; peak RSS (`ru_maxrss`).", "", "| mode | peak RSS |", "|---|---|"]
    lines += [f"| {a} | {b} |" for a, b in rows]
    lines += ["", f"On paper, {x['teacher_params'] / 1e9:.2f}B teacher / {x['student_params'] / 1e9:.2f}B student on "
              f"{x['gpus']} GPUs, {x['formula']}: (a) {x['a_ddp_live_gb_per_gpu']} GB, (b) {x['b_fsdp2_gb_per_gpu']} GB, "
              f"(c) {x['c_hub_cache_gb_per_gpu']} GB per GPU; (a)/(b) = {x['a_over_b']}, (a)/(c) = {x['a_over_c']}."]
    return "\n".join(lines) + "\n"


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
    if a.one == "fsdp2":
        result = _fsdp2_step(a.batch_size, a.seq_len)
        if os.environ.get("RANK", "0") == "0":
            print(json.dumps(result))
        return 0
    if a.one:
        print(json.dumps(_step(a.one, a.batch_size, a.seq_len, a.cache_dir)))
        return 0
    from benchmarks.common import write_results

    result = run(a.batch_size, a.seq_len, a.top_k)
    write_results(os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"), "teacher_memory", result,
                  markdown(result))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
