"""DeepSpeed ZeRO-3 for real (DeepSpeed's CPU accelerator, gloo, 2 ranks; tests/deepspeed_worker.py) and the ZeRO-3
refusals.

What ZeRO-3 on CPU runs here: `deepspeed.initialize` with stage 3 partitions every parameter (each rank keeps half
of each, `param.data` is empty outside the forward), a training step with a torch AdamW, re-applying fixed pruning
masks to the partitioned parameters inside `GatheredParameters(modifier_rank=0)`, and the export through the
gathered parameters (`hf_compress.fsdp.save_full_state_dict`): the first update and the masks re-applied after it
equal one plain process's (the next loss within 1e-6, measured 4.8e-7), the pruned entries are exactly zero after
every re-application, the export is the gathered weights. From the second update on, ZeRO-3's optimizer step on
CPU is not one process's even without any hf_compress code (measured in tests/deepspeed_worker.py), so no later
step is compared.
A magnitude selection on a rank's own partition is not the full weight's: `GradualPruningCallback`, `QATCallback`,
`QuantizationCallback` and `StructuredPruningCallback` stay refused under ZeRO-3 (by `check_distributed_support`,
before training; `StructuredPruningCallback` also refuses partitioned parameters itself).
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
LOSS_TOL = 1e-6


@pytest.fixture(scope="module")
def zero3(tmp_path_factory):
    pytest.importorskip("deepspeed")
    dump = tmp_path_factory.mktemp("zero3")
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(HERE), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(HERE, "deepspeed_worker.py"), "--dump-dir", str(dump)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    infos = [json.load(open(dump / f"rank{r}.json")) for r in range(2)]
    return dump, infos, [load_file(dump / f"rank{r}.safetensors") for r in range(2)]


def test_zero3_really_partitions_every_parameter(zero3):
    _, infos, _ = zero3
    for info in infos:
        assert info["world_size"] == 2 and info["partitioned"] is True and info["partitioned_after"] is True
        assert info["local_fraction"] == pytest.approx(0.5, abs=0.01)  # each rank half of each (padded) parameter


def test_masks_reapplied_to_partitioned_parameters_hold(zero3):
    _, infos, tensors = zero3
    ref = infos[0]
    # The first update, and the masks re-applied after it, as one process: the second forward sees the same weights.
    # (From the second update on ZeRO-3 on CPU is not one process's, with or without masks: see the worker.)
    assert max(abs(a - b) for a, b in zip(ref["losses"][:2], ref["ref_losses"][:2])) <= LOSS_TOL
    assert infos[1]["losses"] == ref["losses"]
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
    assert all(info["local_selection_mismatches"] > 0 for info in infos)  # why the pruning callback is refused


@pytest.mark.parametrize("callback", ["GradualPruningCallback", "QATCallback", "QuantizationCallback",
                                      "StructuredPruningCallback"])
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
