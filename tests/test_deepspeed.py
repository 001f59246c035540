"""DeepSpeed ZeRO-3 for real (DeepSpeed's CPU accelerator, gloo, 2 ranks) and the ZeRO-3 refusals.

Two launches. tests/deepspeed_trainer_worker.py runs `DistillationTrainer` with `DistillationArguments(deepspeed=
<ZeRO-3 dict>, use_cpu=True)`: the Trainer wraps the student in a stage-3 `DeepSpeedEngine` (its AdamW inside
`DeepSpeedZeroOptimizer_Stage3`) and `prepare_teacher` shards the frozen teacher with TRL's `prepare_deepspeed`. Three
steps, clipped at every step, equal one process (each loss within 1e-6, measured 2.4e-7; the weights after the first
and the third update within 1e-5, measured 4.3e-7 and 1.2e-6), and the Trainer's `save_model` writes the gathered
weights exactly. Without `use_cpu=True` accelerate counts one process per rank on a machine without a GPU: refused
(`check_process_count`).

tests/deepspeed_worker.py is the hand-written engine loop: `deepspeed.initialize` with stage 3 partitions every
parameter (each rank keeps half of each, `param.data` is empty outside the forward), fixed pruning masks are
re-applied to the partitioned parameters inside `GatheredParameters(modifier_rank=0)` and to the optimizer's fp32
partitions, and the export goes through the gathered parameters (`hf_compress.fsdp.save_full_state_dict`): all three
steps equal one plain process's (losses within 1e-6, measured 4.8e-7; weights within 1e-5, measured 5.8e-6) with
DeepSpeed's default clipping to norm 1.0 turned off as in the reference, the pruned entries are exactly zero after
every re-application, the export is the gathered weights.
A magnitude selection on a rank's own partition is not the full weight's, so `GradualPruningCallback` selects on the
all-gathered fp32 master weights (tests/deepspeed_pruning_worker.py: a 2-rank ZeRO-3 `DistillationTrainer` run whose
global-scope masks equal one process's bit for bit, losses within 1e-6, weights within 5e-5, saved zeros exact);
`QATCallback`, `QuantizationCallback` and `StructuredPruningCallback` stay refused under ZeRO-3 (by
`check_distributed_support`, before training; `StructuredPruningCallback` also refuses partitioned parameters itself).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

HERE = os.path.dirname(os.path.abspath(__file__))
LOSS_TOL, WEIGHT_TOL = 1e-6, 1e-5


def _launch(worker: str, dump):
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(HERE), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(HERE, worker), "--dump-dir", str(dump)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    infos = [json.load(open(dump / f"rank{r}.json")) for r in range(2)]
    return infos, [load_file(dump / f"rank{r}.safetensors") for r in range(2)]


@pytest.fixture(scope="module")
def zero3(tmp_path_factory):
    pytest.importorskip("deepspeed")
    dump = tmp_path_factory.mktemp("zero3")
    infos, tensors = _launch("deepspeed_worker.py", dump)
    return dump, infos, tensors


@pytest.fixture(scope="module")
def trainer_zero3(tmp_path_factory):
    pytest.importorskip("deepspeed")
    pytest.importorskip("trl")
    dump = tmp_path_factory.mktemp("trainer_zero3")
    infos, tensors = _launch("deepspeed_trainer_worker.py", dump)
    return dump, infos, tensors, json.load(open(dump / "ref.json")), load_file(dump / "ref.safetensors")


@pytest.fixture(scope="module")
def pruning_zero3(tmp_path_factory):
    pytest.importorskip("deepspeed")
    dump = tmp_path_factory.mktemp("pruning_zero3")
    infos, tensors = _launch("deepspeed_pruning_worker.py", dump)
    return dump, infos, tensors, json.load(open(dump / "ref.json")), load_file(dump / "ref.safetensors")


def _max_diff(a: dict, b: dict, prefix: str) -> float:
    names = [k for k in b if k.startswith(prefix)]
    assert names and sorted(names) == sorted(k for k in a if k.startswith(prefix))
    return max((a[k] - b[k]).abs().max().item() for k in names)


def test_distillation_trainer_under_zero3_shards_the_teacher_with_trl_prepare_deepspeed(trainer_zero3):
    _, infos, _, _, _ = trainer_zero3
    for info in infos:
        assert info["world_size"] == info["accelerate_num_processes"] == 2
        assert info["distributed_type"] == "DistributedType.DEEPSPEED" and info["is_deepspeed_enabled"] is True
        assert info["zero_stage"] == 3 and info["teacher_class"] == "DeepSpeedEngine"
        for when in ("teacher", "teacher_after"):  # before and after training: partitioned, frozen, in eval mode
            t = info[when]
            assert t["with_ds_id"] == t["partitioned"] == t["count"] == 35 and t["persistent"] == []
            assert t["local_fraction"] == pytest.approx(0.5, abs=0.01) and t["requires_grad"] == 0
        assert info["teacher_training"] is False and info["teacher_ids_unchanged"] is True
        assert info["student_class"] == "DeepSpeedEngine" and info["student_optimizer"] == "DeepSpeedZeroOptimizer_Stage3"
        s = info["student"]
        assert s["partitioned"] == s["count"] == s["requires_grad"] == 35 and s["ds_numel"] == info["teacher"]["ds_numel"]
        assert s["local_fraction"] == pytest.approx(0.5, abs=0.01)


def test_distillation_trainer_under_zero3_trains_as_one_process(trainer_zero3):
    _, infos, tensors, ref, ref_tensors = trainer_zero3
    info = infos[0]
    assert infos[1]["losses"] == info["losses"] and len(info["losses"]) == 3
    assert max(abs(a - b) for a, b in zip(info["losses"], ref["losses"])) <= LOSS_TOL
    # DeepSpeed clips (`gradient_clipping: auto` -> `max_grad_norm`) at every step, as the reference does.
    assert info["gradient_clipping"] == info["max_grad_norm"] < min(info["grad_norms"])
    for when in ("first/", "final/"):  # after the first update and after the third, on both ranks
        assert all(_max_diff(t, ref_tensors, when) <= WEIGHT_TOL for t in tensors)
    # Not vacuous: the second and third updates moved the weights by far more than the tolerance.
    moved = max((ref_tensors[k] - ref_tensors["first/" + k[len("final/"):]]).abs().max().item()
                for k in ref_tensors if k.startswith("final/"))
    assert moved > 100 * WEIGHT_TOL


def test_trainer_save_model_under_zero3_writes_the_gathered_weights(trainer_zero3):
    dump, infos, tensors, _, _ = trainer_zero3
    assert [info["saved_equal_gathered"] for info in infos] == [True, True]
    saved = load_file(dump / "final" / "model.safetensors")
    assert sorted(saved) == sorted(k[len("final/"):] for k in tensors[0] if k.startswith("final/"))
    assert all(torch.equal(saved[n], tensors[0][f"final/{n}"]) for n in saved)


def test_deepspeed_on_cpu_without_use_cpu_is_refused(monkeypatch):
    from hf_compress.distributed import check_distributed_support

    monkeypatch.setenv("WORLD_SIZE", "2")
    args = SimpleNamespace(fsdp=None, deepspeed={"zero_optimization": {"stage": 3}}, world_size=1, use_cpu=False)
    with pytest.raises(ValueError, match=r"^DeepSpeed: the launcher started WORLD_SIZE=2 ranks but accelerate counts 1 process\(es\)"
                       r": without a GPU .* set `use_cpu=True` \(`--use_cpu`; DeepSpeed's CPU accelerator, gloo\) or launch on GPUs.$"):
        check_distributed_support(args, [])
    args.world_size = 2  # what `use_cpu=True` (or a GPU) gives
    assert check_distributed_support(args, []) == "deepspeed-zero3"


def test_zero3_really_partitions_every_parameter(zero3):
    _, infos, _ = zero3
    for info in infos:
        assert info["world_size"] == 2 and info["partitioned"] is True and info["partitioned_after"] is True
        assert info["local_fraction"] == pytest.approx(0.5, abs=0.01)  # each rank half of each (padded) parameter


def test_masks_reapplied_to_partitioned_parameters_hold(zero3):
    _, infos, tensors = zero3
    ref = infos[0]
    # Every update, and the masks re-applied after it, as one process (DeepSpeed's default clipping off, as there).
    assert len(ref["losses"]) == 3
    assert max(abs(a - b) for a, b in zip(ref["losses"], ref["ref_losses"])) <= LOSS_TOL
    assert infos[1]["losses"] == ref["losses"]
    names = [k[len("ds/"):] for k in tensors[0] if k.startswith("ds/")]
    assert max((tensors[0][f"ds/{n}"] - tensors[0][f"ref/{n}"]).abs().max().item() for n in names) <= WEIGHT_TOL
    masked = [k[len("mask/"):] for k in tensors[0] if k.startswith("mask/")]
    assert len(masked) == 14  # 7 matrices x 2 layers
    for n in masked:
        keep = tensors[0][f"mask/{n}"].bool()
        assert int((~keep).sum()) == round(0.5 * keep.numel())
        for r in range(2):  # gathered on both ranks: exact zeros where pruned
            assert torch.equal(tensors[r][f"ds/{n}"][~keep], torch.zeros(int((~keep).sum())))


def test_export_through_the_gathered_parameters_is_written_once(zero3):
    dump, infos, tensors = zero3
    assert [info["wrote"] for info in infos] == [True, False]
    exported = load_file(dump / "export.safetensors")
    assert sorted(exported) == sorted(k[len("ds/"):] for k in tensors[0] if k.startswith("ds/"))
    assert all(torch.equal(exported[n], tensors[0][f"ds/{n}"]) for n in exported)


def test_a_selection_on_a_zero3_partition_is_not_the_full_weights(zero3):
    _, infos, _ = zero3
    # why the pruning callback selects on the all-gathered master weights (`hf_compress.zero3`), not its partition
    assert all(info["local_selection_mismatches"] > 0 for info in infos)


def test_gradual_pruning_is_accepted_under_zero3_the_others_refused():
    from hf_compress.callbacks import GradualPruningCallback, QATCallback
    from hf_compress.distributed import check_distributed_support

    args = SimpleNamespace(fsdp=None, deepspeed={"zero_optimization": {"stage": 3}}, world_size=2)
    assert check_distributed_support(args, [GradualPruningCallback]) == "deepspeed-zero3"
    with pytest.raises(ValueError, match=r"^`QATCallback` cannot run under DeepSpeed ZeRO-3"):
        check_distributed_support(args, [GradualPruningCallback, QATCallback])


@pytest.mark.parametrize("callback", ["QATCallback", "QuantizationCallback", "StructuredPruningCallback"])
def test_zero3_refusals_stay(callback):
    import hf_compress.callbacks as cbs
    from hf_compress.distributed import check_distributed_support

    args = SimpleNamespace(fsdp=None, deepspeed={"zero_optimization": {"stage": 3}}, world_size=2)
    with pytest.raises(ValueError, match=rf"^`{callback}` cannot run under DeepSpeed ZeRO-3: .* compress the saved model"):
        check_distributed_support(args, [getattr(cbs, callback)])
    args.deepspeed = {"zero_optimization": {"stage": 2}}
    assert check_distributed_support(args, [getattr(cbs, callback)]) == "deepspeed"


def test_a_real_deepspeed_config_is_validated_and_detected(tmp_path):
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.config import DeepSpeedConfig

    from hf_compress.distributed import parallel_backend

    config = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 3}}
    parsed = DeepSpeedConfig(config)  # DeepSpeed's own parser (one process: world size 1)
    assert parsed.zero_optimization_stage == 3 and parsed.train_batch_size == 2
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(config))
    assert parallel_backend(SimpleNamespace(fsdp=None, deepspeed=str(path), world_size=1)) == "deepspeed-zero3"


def test_structured_pruning_refuses_zero3_partitioned_parameters(tiny_llama):
    from transformers import TrainerControl, TrainerState

    from hf_compress.callbacks import StructuredPruningCallback

    for p in tiny_llama.parameters():
        p.ds_id = 0  # what `deepspeed.initialize` with stage 3 (or `zero.Init`) sets on every parameter
    cb = StructuredPruningCallback("ffn", keep={"ffn": 0.5})
    with pytest.raises(ValueError, match=r"^`StructuredPruningCallback` cannot run under DeepSpeed ZeRO-3: .* prune the "
                       r"saved model with `structured_prune`.$"):
        cb.on_train_begin(SimpleNamespace(output_dir=None), TrainerState(max_steps=4), TrainerControl(), model=tiny_llama)


def test_gradual_pruning_under_zero3_selects_the_masks_of_one_process(pruning_zero3):
    # Global scope (one threshold over every weight) on ZeRO-3-partitioned weights: both ranks take the masks of
    # one plain process at every pruning event, bit for bit.
    _, infos, tensors, ref, ref_tensors = pruning_zero3
    assert [i["zero_stage"] for i in infos] == [3, 3] and all(i["zero3_path"] for i in infos)
    assert infos[0]["partitioning"]["partitioned"] == infos[0]["partitioning"]["count"]  # every weight partitioned
    assert infos[0]["events"] == ref["events"] == [0, 2, 4]
    masks = sorted(k for k in ref_tensors if k.startswith("mask"))
    assert len(masks) == 3 * len([k for k in ref_tensors if k.startswith("mask4/")]) > 0
    for r in range(2):
        assert sorted(k for k in tensors[r] if k.startswith("mask")) == masks
        assert all(torch.equal(tensors[r][k], ref_tensors[k]) for k in masks)
    kept = sum(int(ref_tensors[k].sum()) for k in masks if k.startswith("mask4/"))
    total = sum(ref_tensors[k].numel() for k in masks if k.startswith("mask4/"))
    assert 1 - kept / total == pytest.approx(0.5, abs=1e-3)  # the global target, over every pruned weight


def test_gradual_pruning_under_zero3_trains_as_one_process_and_saves_exact_zeros(pruning_zero3):
    dump, infos, tensors, ref, ref_tensors = pruning_zero3
    for loss, expected in zip(infos[0]["losses"], ref["losses"], strict=True):
        assert abs(loss - expected) <= LOSS_TOL
    # 6 AdamW steps at lr 1e-2 (3 in the distillation run): the reduce-scatter's summation order grows to 1.5e-5
    assert _max_diff(tensors[0], ref_tensors, "final/") <= 5 * WEIGHT_TOL
    saved = load_file(dump / "final" / "model.safetensors")
    for key in (k for k in ref_tensors if k.startswith("mask4/")):
        name = key[len("mask4/"):]
        pruned = ref_tensors[key] == 0
        assert bool((saved[name][pruned] == 0).all())  # pruned entries exactly zero in the saved checkpoint
        assert bool((tensors[1][f"final/{name}"][pruned] == 0).all())
    assert infos[0]["sparsity_logged"][-1] == pytest.approx(0.5, abs=1e-3)
    check = infos[0]["check"]  # the permanent-vs-masked self-check ran on the partitioned model (all ranks)
    assert check["permanent_vs_masked"] <= check["tolerance"]
