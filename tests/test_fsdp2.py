"""FSDP2 (`torch.distributed.fsdp.fully_shard`, gloo, CPU, 2 ranks) against one process, and the FSDP refusals.

tests/fsdp2_worker.py runs three times (one module fixture starts the three launches together): alone (the
one-process reference, whole batch), under `torchrun --nproc_per_node=2` with student and teacher `fully_shard`-ed (each rank half the
batch), and under `torchrun` with DDP (the README's parity table). Tolerances: the loss and every gradient within
1e-6 (measured: loss 4.8e-7, gradients 1.5e-8 at most: the float order of the cross-rank reductions); masks bit-identical; final weights
after 6 AdamW steps within 1e-4 (measured 1.0e-5: Adam divides the small gradient differences by small second
moments); pruned entries exactly zero. Structured pruning: importance scores within 1e-6 (measured 3.6e-7, the
skip-loss block scores; 1.2e-7 for activation means; magnitudes exact), the same plan, the pruned model's weights
and logits within 1e-4 (measured 7.0e-6 and 3.6e-7).
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
GRAD_TOL, WEIGHT_TOL = 1e-6, 1e-4
QAT = ("qat_bnb4", "qat_bnb8", "qat_int4")
SCOPES = ("prune_layer", "prune_global")
STRUCTURED = ("sp_act", "sp_loss", "sp_mag")  # activation scores (cosine / skip-loss block metric), weight magnitudes
SCORE_TOL = 1e-6


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(HERE), env.get("PYTHONPATH", "")])
    return env


def _start(root, ranks: int, *extra):
    dump = root / "dump"
    worker = [os.path.join(HERE, "fsdp2_worker.py"), "--dump-dir", str(dump), *extra]
    cmd = [sys.executable, *(["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"] if ranks > 1
                             else []), *worker]
    return subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True), dump, ranks


def _finish(proc, dump, ranks: int):
    try:
        stdout, stderr = proc.communicate(timeout=420)
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
    infos = [json.load(open(dump / f"rank{r}.json")) for r in range(ranks)]
    tensors = [load_file(dump / f"rank{r}.safetensors") for r in range(ranks)]
    return dump, infos, tensors


@pytest.fixture(scope="module")
def launches(tmp_path_factory):
    """The three runs of the worker, started together (they are independent; most of each is starting Python and
    importing torch and transformers, which overlaps) and each waited for: `{"single", "fsdp", "ddp"}` ->
    `(dump dir, per-rank infos, per-rank tensors)`."""
    started = {"single": _start(tmp_path_factory.mktemp("single"), 1),
               "fsdp": _start(tmp_path_factory.mktemp("fsdp2"), 2),
               "ddp": _start(tmp_path_factory.mktemp("ddp"), 2, "--ddp")}
    try:
        return {name: _finish(*run) for name, run in started.items()}
    finally:
        for proc, _, _ in started.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="module")
def single(launches):
    return launches["single"]


@pytest.fixture(scope="module")
def fsdp(launches):
    return launches["fsdp"]


@pytest.fixture(scope="module")
def ddp(launches):
    return launches["ddp"]


def _max_diff(a: dict, b: dict, prefix: str) -> float:
    keys = [k for k in a if k.startswith(prefix + "/")]
    assert keys and sorted(keys) == sorted(k for k in b if k.startswith(prefix + "/"))
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in keys)


def test_the_run_is_really_sharded(fsdp):
    _, infos, _ = fsdp
    assert infos[0]["world_size"] == 2
    assert infos[0]["kd_sharded"] == ["DTensor", "DTensor"]  # student and teacher parameters
    assert infos[0]["prune_layer_mask_type"] == infos[0]["prune_global_mask_type"] == "DTensor"


def test_distillation_loss_and_gradients_equal_one_process(single, fsdp):
    (_, ref, ref_t), (_, infos, tensors) = single, fsdp
    for info in infos:  # the loss averaged over the ranks: each rank's mean over the same number of positions
        assert info["kd_loss"] == pytest.approx(ref[0]["kd_loss"], abs=GRAD_TOL)
    assert _max_diff(ref_t[0], tensors[0], "kd/grad") <= GRAD_TOL
    assert _max_diff(tensors[0], tensors[1], "kd/grad") == 0.0  # gathered: the same full gradient on both ranks


@pytest.mark.parametrize("key", SCOPES)
def test_pruning_masks_are_those_of_one_process(single, fsdp, key):
    (_, ref, ref_t), (_, infos, tensors) = single, fsdp
    for stage in ("mask0", "mask"):  # chosen at step 0 from identical weights, and at the end of the schedule
        names = [k for k in ref_t[0] if k.startswith(f"{key}/{stage}/")]
        assert names
        for name in names:
            assert torch.equal(tensors[0][name], ref_t[0][name]), name
            assert torch.equal(tensors[1][name], ref_t[0][name]), name
    # Exact counts: `round(0.5 * numel)` per tensor (layer) or over all of them (global).
    sizes = [ref_t[0][k].numel() for k in ref_t[0] if k.startswith(f"{key}/mask/")]
    expected = sum(round(0.5 * n) for n in sizes) if key == "prune_layer" else round(0.5 * sum(sizes))
    assert infos[0][f"{key}_zeros"] == infos[1][f"{key}_zeros"] == ref[0][f"{key}_zeros"] == expected
    zeros0 = sum(int((ref_t[0][k] == 0).sum()) for k in ref_t[0] if k.startswith(f"{key}/mask0/"))
    target0 = sum(round(0.25 * n) for n in sizes) if key == "prune_layer" else round(0.25 * sum(sizes))
    assert zeros0 == target0


@pytest.mark.parametrize("key", SCOPES)
def test_gradient_hooks_and_masks_hold_on_shards(fsdp, key):
    _, infos, _ = fsdp
    for info in infos:
        # After every backward, before any callback pass: FSDP's post-accumulate-grad hook zeroed the pruned entries.
        assert info[f"{key}_pruned_grad_max"] == [0.0] * 6
        assert info[f"{key}_pruned_weight_max"] == 0.0  # after 6 AdamW steps with weight decay
        # Saved into a checkpoint (gathered, written by rank 0) and restored, sharded, into a fresh sharded student,
        # whose pruned entries are then zeroed.
        assert info[f"{key}_resumed_masks_equal"] is True and info[f"{key}_resumed_zero_weights"] is True


@pytest.mark.parametrize("key", SCOPES)
def test_export_is_gathered_written_once_and_equals_one_process(single, fsdp, key):
    (ref_dir, _, ref_t), (dump, infos, tensors) = single, fsdp
    assert [info[f"{key}_wrote"] for info in infos] == [True, False]
    assert not [f for f in os.listdir(dump) if ".tmp" in f]
    exported, expected = load_file(dump / f"{key}.safetensors"), load_file(ref_dir / f"{key}.safetensors")
    assert sorted(exported) == sorted(expected)
    assert all(exported[k].shape == expected[k].shape for k in expected)
    diff = max(float((exported[k] - expected[k]).abs().max()) for k in expected)
    assert diff <= WEIGHT_TOL
    for name in (k[len(f"{key}/mask/"):] for k in ref_t[0] if k.startswith(f"{key}/mask/")):
        mask = tensors[0][f"{key}/mask/{name}"].bool()
        assert torch.equal(exported[name] == 0, ~mask), name  # pruned entries exact zeros, no others


@pytest.mark.parametrize("key", QAT)
def test_fake_quantization_of_sharded_weights_equals_one_process(single, fsdp, key):
    (_, ref, ref_t), (_, infos, tensors) = single, fsdp
    assert infos[0][f"{key}_count"] == ref[0][f"{key}_count"] == 14  # 7 Linear layers x 2 decoder layers
    assert infos[0][f"{key}_loss"] == pytest.approx(ref[0][f"{key}_loss"], abs=GRAD_TOL)
    assert _max_diff(ref_t[0], tensors[0], f"{key}/grad") <= GRAD_TOL
    # The fake quantizers change the forward pass: the loss is not the unquantized one.
    assert abs(ref[0][f"{key}_loss"] - ref[0]["kd_loss"]) > 1e-6


def test_attaching_fake_quantizers_after_fully_shard_is_refused(fsdp):
    _, infos, _ = fsdp
    message = infos[0]["qat_after_shard_error"]
    assert message.startswith("model.layers.0.self_attn.q_proj.weight is already sharded by `fully_shard`")
    assert "BEFORE `fully_shard(model)`" in message and len(message.splitlines()) == 1


@pytest.mark.parametrize("key", STRUCTURED)
def test_structured_importance_scores_and_plan_equal_one_process(single, fsdp, key):
    (_, ref, ref_t), (_, infos, tensors) = single, fsdp
    names = [k for k in ref_t[0] if k.startswith(f"{key}/score/")]
    assert len(names) == (2 if key == "sp_loss" else 4)
    for name in names:  # each rank scored its half of the calibration batches; combined, the same on both ranks
        assert torch.equal(tensors[0][name], tensors[1][name]), name
    assert _max_diff(ref_t[0], tensors[0], f"{key}/score") <= (0.0 if key == "sp_mag" else SCORE_TOL)
    assert infos[0][f"{key}_plan"] == infos[1][f"{key}_plan"] == ref[0][f"{key}_plan"]
    if key != "sp_loss":  # half the FFN neurons, one of two KV groups, half the channels, two of four blocks
        assert ref[0][f"{key}_config"] == [20, 2, 1, 12, 2]
    assert infos[0][f"{key}_schedule"] == ref[0][f"{key}_schedule"] == [[0, 0.0], [1, 0.5], [2, 1.0]]


@pytest.mark.parametrize("key", STRUCTURED)
def test_structured_cut_of_the_gathered_state_equals_one_process(single, fsdp, key):
    (ref_dir, ref, ref_t), (dump, infos, tensors) = single, fsdp
    # Trained 4 steps under the gradual masks (blocks skipped on sharded layers): the same losses.
    assert max(abs(a - b) for a, b in zip(infos[0][f"{key}_losses"], ref[0][f"{key}_losses"])) <= GRAD_TOL
    # Rank 0 cut an unsharded copy of the gathered model, the other rank has none; the sharded model keeps its shapes.
    assert [info[f"{key}_has_pruned_copy"] for info in infos] == [True, False]
    assert ref[0][f"{key}_has_pruned_copy"] is False and ref[0][f"{key}_wrote_folder"] is False
    assert infos[0][f"{key}_config"] == ref[0][f"{key}_config"]
    pruned, expected = load_file(dump / f"{key}.safetensors"), load_file(ref_dir / f"{key}.safetensors")
    assert sorted(pruned) == sorted(expected) and all(pruned[k].shape == expected[k].shape for k in expected)
    assert max(float((pruned[k] - expected[k]).abs().max()) for k in expected) <= WEIGHT_TOL
    assert float((tensors[0][f"{key}/logits"] - ref_t[0][f"{key}/logits"]).abs().max()) <= WEIGHT_TOL
    # The self-check ran on rank 0 and every rank holds its figures; the folder rank 0 wrote reloads to the same logits.
    check = infos[0][f"{key}_check"]
    assert infos[1][f"{key}_check"] == check and check["pruned_vs_masked"] <= check["tolerance"] == 1e-4
    assert check["reloaded_vs_masked"] <= 1e-4
    assert infos[0][f"{key}_wrote_folder"] is True and infos[0][f"{key}_reloaded_logits_diff"] <= 1e-6


def test_shard_placement_teacher_equals_one_whole_teacher_and_no_rank_holds_it(single, fsdp):
    """`teacher_placement="shard"` (`prepare_teacher` with an FSDP2 accelerator) against one process's whole teacher."""
    (_, ref, ref_t), (_, infos, tensors) = single, fsdp
    total = ref[0]["teacher_shard_total_numel"]
    assert ref[0]["teacher_shard_local_numel"] == total and ref[0]["teacher_shard_groups"] == 0  # alone: replicated
    for info, t in zip(infos, tensors):
        assert float((t["teacher_shard/logits"] - ref_t[0]["teacher_shard/logits"]).abs().max()) <= GRAD_TOL
        assert info["teacher_shard_loss"] == pytest.approx(ref[0]["teacher_shard_loss"], abs=GRAD_TOL)
        assert _max_diff(ref_t[0], t, "teacher_shard/grad") <= GRAD_TOL  # the whole student's gradients
        assert info["teacher_shard_by_hand_diff"] <= GRAD_TOL  # `shard_teacher(teacher, mesh)` directly
        assert info["teacher_shard_total_numel"] == total and info["teacher_shard_local_numel"] < total
        assert info["teacher_shard_groups"] == 3  # 2 decoder layers + the root
        assert info["teacher_shard_resharded"] is True  # root included: nothing stays gathered after the forward
        assert info["teacher_shard_grads"] == info["teacher_shard_requires_grad"] == 0
        assert info["teacher_shard_training"] is False
    assert sum(info["teacher_shard_local_numel"] for info in infos) == total  # dim-0 shards, no copy
    # Why a stand-in accelerator: on CPU accelerate keeps MULTI_CPU and drops the FSDP2 plugin.
    assert infos[0]["accelerate_cpu_fsdp"] == ["DistributedType.MULTI_CPU", False]


def test_parity_with_ddp(single, fsdp, ddp):
    """The README's table: DDP and FSDP2 against one process, within the same tolerances."""
    (ref_dir, ref, ref_t) = single
    for dump, infos, tensors in (fsdp, ddp):
        assert infos[0]["kd_loss"] == pytest.approx(ref[0]["kd_loss"], abs=GRAD_TOL)
        assert _max_diff(ref_t[0], tensors[0], "kd/grad") <= GRAD_TOL
        for key in SCOPES:
            assert _max_diff(ref_t[0], tensors[0], f"{key}/mask") == 0.0
            exported, expected = load_file(dump / f"{key}.safetensors"), load_file(ref_dir / f"{key}.safetensors")
            assert max(float((exported[k] - expected[k]).abs().max()) for k in expected) <= WEIGHT_TOL
        for key in QAT:
            assert _max_diff(ref_t[0], tensors[0], f"{key}/grad") <= GRAD_TOL
        for key in STRUCTURED:
            assert _max_diff(ref_t[0], tensors[0], f"{key}/score") <= SCORE_TOL
            assert infos[0][f"{key}_plan"] == infos[1][f"{key}_plan"] == ref[0][f"{key}_plan"]
            pruned, expected = load_file(dump / f"{key}.safetensors"), load_file(ref_dir / f"{key}.safetensors")
            assert max(float((pruned[k] - expected[k]).abs().max()) for k in expected) <= WEIGHT_TOL


# ---- one process: the helpers and the refusals -----------------------------------------------------------------


def test_helpers_are_identities_without_dtensors(tmp_path):
    from hf_compress.fsdp import GatheredTensors, count_zeros, full_tensor, save_full_state_dict, shard_like

    t = torch.tensor([[0.0, 1.0], [2.0, 0.0]])
    assert full_tensor(t) is t and shard_like(t, t) is t and count_zeros(t) == 2
    assert dict(GatheredTensors({"a": t})) == {"a": t}
    model = torch.nn.Linear(2, 3)
    assert save_full_state_dict(model, str(tmp_path / "m.safetensors"))
    saved = load_file(tmp_path / "m.safetensors")
    assert torch.equal(saved["weight"], model.weight.detach()) and torch.equal(saved["bias"], model.bias.detach())


def test_gathered_copy_and_rank_means_without_torch_distributed():
    from transformers import LlamaForCausalLM

    from conftest import tiny_llama_config
    from hf_compress.fsdp import gathered_copy, unsharded, weighted_mean_over_ranks

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(tie_word_embeddings=True)).eval()
    copy = gathered_copy(model)
    assert type(copy) is LlamaForCausalLM and copy.lm_head.weight is copy.model.embed_tokens.weight
    assert copy.lm_head.weight is not model.lm_head.weight  # a copy, not the same storage
    ids = torch.randint(97, (2, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(copy(input_ids=ids).logits, model(input_ids=ids).logits)  # rotary buffers included
    with unsharded(model) as same:
        assert same is model
    scores = {"ffn": torch.tensor([1.0, 2.0]), "method": "activation"}
    assert weighted_mean_over_ranks(scores, 7.0) == scores


def _args(**kw):
    base = dict(fsdp=True, fsdp_config={}, deepspeed=None, world_size=2, use_cpu=False)
    base.update(kw)
    return SimpleNamespace(**base)


@pytest.mark.parametrize(
    "kwargs, callbacks, message",
    [
        ({"fsdp_config": {"version": 1}}, ["GradualPruningCallback"],
         r"^FSDP1 \(`fsdp_config\['version'\] = 1`\) is not supported: .* set `fsdp_config=\{'version': 2\}`"),
        ({"use_cpu": True}, [], r"^`use_cpu=True` with `fsdp` trains with DDP, not FSDP .* drop `fsdp`"),
        ({"fsdp_config": {"cpu_offload": True}}, ["QATCallback"],
         r"^`QATCallback` with FSDP `cpu_offload` is not supported .* drop `cpu_offload`"),
        ({}, ["QATCallback"], r"^`QATCallback` cannot run under the Trainer's FSDP: .* before `fully_shard`"),
        ({}, ["QuantizationCallback"],
         r"^`QuantizationCallback` cannot run under FSDP: .* quantize the saved model after training"),
    ],
    ids=["fsdp1", "use-cpu-fallback", "qat-offload", "qat-trainer", "quantization-export"],
)
def test_fsdp_refusals(kwargs, callbacks, message):
    import hf_compress.callbacks as cbs
    from hf_compress.distributed import check_distributed_support

    with pytest.raises(ValueError, match=message) as info:
        check_distributed_support(_args(**kwargs), [getattr(cbs, c) for c in callbacks])
    assert len(str(info.value).splitlines()) == 1


def test_fsdp2_pruning_is_accepted_and_settings_read(monkeypatch):
    from hf_compress.callbacks import GradualPruningCallback
    from hf_compress.distributed import check_distributed_support, fsdp_settings

    assert check_distributed_support(_args(), [GradualPruningCallback]) == "fsdp"
    assert fsdp_settings(_args()) == {"version": 2, "cpu_offload": False}  # transformers' default is FSDP2
    monkeypatch.setenv("FSDP_VERSION", "1")  # accelerate's config, without TrainingArguments
    monkeypatch.setenv("FSDP_OFFLOAD_PARAMS", "true")
    assert fsdp_settings(None) == {"version": 1, "cpu_offload": True}
    assert fsdp_settings(_args(fsdp=["full_shard", "offload"]))["cpu_offload"] is True


def test_the_trainer_refuses_the_silent_ddp_fallback_before_any_step(tiny_bert):
    from transformers import TrainingArguments

    from hf_compress.distillation import DistillationArguments
    from hf_compress.trainers import DistillationTrainer

    args = DistillationArguments("unused", use_cpu=True, fsdp=True, report_to="none")
    assert isinstance(args, TrainingArguments)
    with pytest.raises(ValueError, match=r"^`use_cpu=True` with `fsdp` trains with DDP, not FSDP"):
        DistillationTrainer(model=tiny_bert, teacher_model=tiny_bert, args=args)
