"""DistillationTrainer + GradualPruningCallback under real DDP: `torchrun --nproc_per_node=2`, gloo, CPU.

One launch (~30-50 s on 2 shared cores) is shared by the tests of this module. Losses are not compared: with
`average_tokens_across_devices=True` the logged losses of a DDP run are not those of a single process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

HERE = os.path.dirname(os.path.abspath(__file__))
MAX_STEPS, END_STEP, FREQUENCY, TARGET, GRAD_ACCUM = 8, 6, 2, 0.5, 2
HIDDEN, INTERMEDIATE, LAYERS = 32, 64, 2  # tiny_bert_config()


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(HERE), env.get("PYTHONPATH", "")])
    return env


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        os.path.join(HERE, "ddp_worker.py"), "--output-dir", str(root / "out"), "--dump-dir", str(root / "dump"),
        "--final-dir", str(root / "final"), "--max-steps", str(MAX_STEPS), "--save-steps", str(MAX_STEPS),
        "--end-step", str(END_STEP), "--frequency", str(FREQUENCY), "--target-sparsity", str(TARGET),
        "--grad-accum", str(GRAD_ACCUM), "--quantize-dir", str(root / "int8"), "--cache-dir", str(root / "cache"),
    ]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    infos = [json.load(open(root / "dump" / f"rank{r}.json")) for r in (0, 1)]
    states = [load_file(root / "dump" / f"rank{r}.safetensors") for r in (0, 1)]
    return root, infos, states


def _expected_zeros(step: int) -> int:
    """Zeros after optimizer step `step`, by hand: the cubic schedule held between events, rounded per tensor."""
    t = END_STEP if step >= END_STEP else step // FREQUENCY * FREQUENCY  # the last pruning event
    s = TARGET + (0.0 - TARGET) * (1 - t / END_STEP) ** 3
    per_layer = 4 * round(s * HIDDEN * HIDDEN) + 2 * round(s * HIDDEN * INTERMEDIATE)  # q, k, v, o + up, down
    return LAYERS * per_layer


def test_ranks_end_with_identical_masks_and_weights(ddp_run):
    _, infos, states = ddp_run
    assert [i["world_size"] for i in infos] == [2, 2]
    masks = [{k: v for k, v in s.items() if k.startswith("mask::")} for s in states]
    assert len(masks[0]) == LAYERS * 6
    assert infos[0]["mask_digest"] == infos[1]["mask_digest"]
    # Rank 1 flipped one mask entry before `broadcast_masks`: all 12 masks came back equal to rank 0's.
    assert [(i["broadcast_count"], i["broadcast_restored"]) for i in infos] == [(LAYERS * 6, True)] * 2
    assert masks[0].keys() == masks[1].keys() and states[0].keys() == states[1].keys()
    for name in states[0]:
        assert torch.equal(states[0][name], states[1][name]), name  # bit-identical, weights and masks


def test_final_sparsity_is_exact(ddp_run):
    _, infos, states = ddp_run
    total = LAYERS * (4 * HIDDEN * HIDDEN + 2 * HIDDEN * INTERMEDIATE)
    for info, state in zip(infos, states):
        assert (info["zeros"], info["total"]) == (total // 2, total)
        for key, mask in state.items():
            if key.startswith("mask::"):
                weight = state[key[len("mask::"):]]
                assert int((mask == 0).sum()) == weight.numel() // 2  # every tensor at exactly 50%
                assert torch.equal(weight == 0, mask == 0)  # the pruned entries, and only they, are zero


def test_schedule_counts_global_optimizer_steps(ddp_run):
    # With 2 ranks and 2 accumulation steps an optimizer step is 4 micro-batches; the logged sparsity after
    # each optimizer step must be the schedule's value at that step (not at a micro-batch count).
    _, infos, _ = ddp_run
    total = LAYERS * (4 * HIDDEN * HIDDEN + 2 * HIDDEN * INTERMEDIATE)
    logged = {h["step"]: h["sparsity"] for h in infos[0]["log_history"] if "loss" in h}
    assert sorted(logged) == list(range(1, MAX_STEPS + 1))
    for step, sparsity in logged.items():
        assert sparsity == pytest.approx(_expected_zeros(step) / total, abs=1e-6), step
    local = ("hard_loss", "soft_loss")  # see the next test
    drop = lambda history: [{k: v for k, v in h.items() if k not in local} for h in history if "loss" in h]  # noqa: E731
    assert drop(infos[0]["log_history"]) == drop(infos[1]["log_history"])  # `loss` is reduced over ranks


def test_logged_loss_parts_are_reduced_over_ranks(ddp_run):
    _, infos, _ = ddp_run
    parts = [[(h["step"], h["hard_loss"], h["soft_loss"]) for h in i["log_history"] if "hard_loss" in h] for i in infos]
    assert len(parts[0]) == MAX_STEPS
    assert parts[0] == parts[1]


def test_only_the_main_process_writes(ddp_run):
    root, infos, _ = ddp_run
    # Rank 1 writes its own RNG state into the checkpoint (Trainer saves one per process) and nothing else.
    assert infos[1]["writes"] == [str(root / "out" / "checkpoint-8" / "rng_state_1.pth")]
    written = {os.path.relpath(p, root) for p in infos[0]["writes"]}
    # The audit sees native writers too: rank 0's weights, masks and card are in its list.
    assert {"out/checkpoint-8/model.safetensors", "out/checkpoint-8/pruning_masks.safetensors",
            "final/model.safetensors", "final/README.md", "final/compression_report.json"} <= written
    assert os.listdir(root / "out") == ["checkpoint-8"]  # one checkpoint
    assert {"README.md", "compression_report.json", "model.safetensors"} <= set(os.listdir(root / "final"))
    assert not [f for f in os.listdir(root / "final") if f.startswith(".")]  # no temporary file left
    # QuantizationCallback exported once, by rank 0, atomically (no temporary folder beside it).
    assert str(root / "int8") in infos[0]["writes"]  # the rename of its temporary folder into place
    assert sorted(p for p in os.listdir(root) if "int8" in p) == ["int8"]
    assert {"config.json", "model.safetensors"} <= set(os.listdir(root / "int8"))
    # The card and report describe the pruned model exactly.
    from huggingface_hub import ModelCard

    card = ModelCard.load(str(root / "final" / "README.md"))
    assert "pruning" in card.data.tags and "distillation" in card.data.tags
    report = json.load(open(root / "final" / "compression_report.json"))
    pruned = {k[len("mask::"):] for k in ddp_run[2][0] if k.startswith("mask::")}
    assert {k: v for k, v in report["sparsity"]["per_layer"].items() if k in pruned} == dict.fromkeys(pruned, 0.5)
    assert sorted(os.listdir(root / "out" / "checkpoint-8")) == sorted(
        ["config.json", "model.safetensors", "optimizer.pt", "pruning_masks.safetensors", "rng_state_0.pth",
         "rng_state_1.pth", "scheduler.pt", "trainer_state.json", "training_args.bin"]
    )
    from hf_compress.pruning import load_masks

    saved = load_masks(str(root / "out" / "checkpoint-8" / "pruning_masks.safetensors"))
    _, _, states = ddp_run
    for name, mask in saved.items():
        assert torch.equal(mask, states[0][f"mask::{name}"].bool())


def test_teacher_cache_is_computed_once_by_the_main_process(ddp_run):
    """`cache_teacher_logits=True` under DDP: rank 0 runs the teacher over the data once and writes the cache
    (atomically); rank 1 computes nothing, writes nothing there, and trains from the same file."""
    from hf_compress.distillation.cache import DATA_FILE, KEY_FILE

    root, infos, _ = ddp_run
    assert [i["cache_computations"] for i in infos] == [1, 0]
    assert sorted(os.listdir(root / "cache")) == sorted([DATA_FILE, KEY_FILE])
    assert not [p for p in infos[1]["writes"] if p.startswith(str(root / "cache"))]
    assert str(root / "cache") in infos[0]["writes"]  # the rename of its temporary folder into place
    # Both ranks read the same cache: their logged soft losses agree step by step (reduced over ranks).
    soft = [[h["soft_loss"] for h in i["log_history"] if "soft_loss" in h] for i in infos]
    assert len(soft[0]) == MAX_STEPS and soft[0] == soft[1]


@pytest.mark.slow  # not a real-model test, but it runs the whole `hf-compress` pipeline on 2 processes (~60 s)
def test_cli_under_torchrun_writes_one_output(tmp_path):
    from test_cli import FAST, make_csv, make_tiny_model

    model, data = make_tiny_model(tmp_path / "model"), make_csv(tmp_path / "data.csv")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "hf_compress.cli.main", "--model", model, "--dataset", data, "--output_dir", str(out), "--sparsity", "0.5",
           "--no_quantize", "--ddp_backend", "gloo", *FAST]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert {"README.md", "compression_report.json", "model.safetensors"} <= set(os.listdir(out))
    assert [p for p in os.listdir(tmp_path) if p.startswith(".hf-compress-")] == []
    assert proc.stdout.count("Wrote ") == 1


FSDP2_ACCELERATE_CONFIG = """compute_environment: LOCAL_MACHINE
distributed_type: FSDP
fsdp_config:
  fsdp_version: 2
  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP
  fsdp_state_dict_type: FULL_STATE_DICT
  fsdp_reshard_after_forward: true
mixed_precision: 'no'
num_machines: 1
num_processes: 2
machine_rank: 0
use_cpu: false
"""


def test_cli_under_accelerate_launch_with_an_fsdp2_config_on_cpu_refuses_in_one_line_before_any_work(tmp_path):
    # On a machine without a GPU accelerate sets up no distributed training for an FSDP config (DistributedType.NO,
    # parallel mode `not_parallel`): each rank would train alone, unsynchronised, into the same output folder.
    from test_cli import FAST, make_csv, make_tiny_model

    model, data = make_tiny_model(tmp_path / "model"), make_csv(tmp_path / "data.csv")
    config = tmp_path / "fsdp.yaml"
    config.write_text(FSDP2_ACCELERATE_CONFIG)
    out = tmp_path / "out"
    i = FAST.index("--use_cpu")
    fast = FAST[:i] + FAST[i + 2:]  # without `--use_cpu true`
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "-m", "hf_compress.cli.main",
           "--model", model, "--dataset", data, "--output_dir", str(out), "--ddp_backend", "gloo", *fast]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode != 0
    ours = [line for line in proc.stderr.splitlines() if line.startswith("hf-compress")]
    assert ours == 2 * [
        "hf-compress: error: FSDP: the launcher started WORLD_SIZE=2 ranks but accelerate counts 2 process(es) in "
        "parallel mode `not_parallel`: without a GPU and without `use_cpu=True` it sets up no distributed training, so "
        "every rank would train alone, unsynchronised, and write the same files; FSDP shards on GPUs only: launch on "
        "GPUs, or drop the FSDP config and set `use_cpu=True` (`--use_cpu`) to train with DDP over gloo."]
    assert "[hf-compress]" not in proc.stdout  # refused before the plan: nothing read, trained or written
    assert not out.exists() and [p for p in os.listdir(tmp_path) if p.startswith(".hf-compress-")] == []
