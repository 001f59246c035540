"""`teacher_placement`: the option, the rule `"auto"` follows, the one-line refusals and the `prepare_teacher` glue.

The sharding itself (`teacher_placement="shard"` under FSDP2, `fully_shard` on 2 gloo ranks) is checked against one
process's whole teacher in tests/test_fsdp2.py (`test_shard_placement_teacher_equals_one_whole_teacher...`).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from hf_compress.distillation import DistillationArguments
from hf_compress.distillation.teacher import prepare_teacher, resolve_teacher_placement


def _teacher(kind: str) -> torch.nn.Module:
    """A module flagged as accelerate / bitsandbytes flag a dispatched or quantized model (what the rules read)."""
    teacher = torch.nn.Linear(3, 2)
    if kind == "dispatched":
        teacher.hf_device_map = {"": "cpu"}
    elif kind == "quantized":
        teacher.is_loaded_in_8bit = True
    return teacher


def test_the_option_parses_from_the_command_line_and_defaults_to_auto(tmp_path):
    from transformers import HfArgumentParser

    (args,) = HfArgumentParser(DistillationArguments).parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--teacher_placement", "shard", "--report_to", "none"])
    assert args.teacher_placement == "shard"
    assert DistillationArguments(str(tmp_path), report_to="none").teacher_placement == "auto"


@pytest.mark.parametrize("kwargs, message", [
    ({"teacher_placement": "sharded"},
     r"^teacher_placement must be one of auto, replicate, shard, device_map, got 'sharded'\.$"),
    ({"teacher_placement": "shard", "cache_teacher_logits": True},
     r"^teacher_placement='shard' with cache_teacher_logits: the cache is built by the main process with a whole "
     r"teacher; use `teacher_placement=\"replicate\"`"),
    ({"teacher_placement": "shard", "teacher_device": "cpu"},
     r"^teacher_placement='shard' puts each rank's shard on the student's device, not on teacher_device='cpu'; drop "
     r"`teacher_device`"),
    ({"teacher_placement": "replicate", "teacher_logits": "me/logits"},
     r"^teacher_placement='replicate' places a teacher, but teacher_logits='me/logits' loads none; drop "
     r"`teacher_placement`"),
], ids=["bad-value", "shard-with-cache", "shard-with-teacher-device", "hub-logits"])
def test_arguments_refuse_impossible_placements_in_one_line(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message) as info:
        DistillationArguments(str(tmp_path), report_to="none", **kwargs)
    assert len(str(info.value).splitlines()) == 1


@pytest.mark.parametrize("backend, kind, cached, expected", [
    ("single", "plain", False, "replicate"),
    ("ddp", "plain", False, "replicate"),
    ("fsdp", "plain", False, "shard"),
    ("fsdp", "plain", True, "replicate"),  # the main process builds the cache with a whole teacher
    ("fsdp", "dispatched", False, "device_map"),
    ("fsdp", "quantized", False, "as_loaded"),
    ("ddp", "dispatched", True, "device_map"),
    ("deepspeed-zero3", "plain", False, "shard"),  # TRL's prepare_deepspeed
    ("deepspeed-zero3", "dispatched", False, "shard"),
])
def test_auto_picks_the_documented_placement(backend, kind, cached, expected):
    assert resolve_teacher_placement("auto", backend, _teacher(kind), cached) == expected


@pytest.mark.parametrize("placement, backend, kind, cached, message", [
    ("shard", "ddp", "plain", False,
     r"^teacher_placement='shard' needs FSDP2 or DeepSpeed ZeRO-3, but this run is 'ddp'; launch with FSDP2"),
    ("shard", "fsdp", "plain", True, r"^teacher_placement='shard' with cache_teacher_logits: the cache is built"),
    ("shard", "fsdp", "quantized", False,
     r"^teacher_placement='shard' cannot shard a teacher quantized \(bitsandbytes\); use `teacher_placement=\"auto\"`"),
    ("shard", "fsdp", "dispatched", False,
     r"^teacher_placement='shard' cannot shard a teacher loaded with `device_map` \(it has an `hf_device_map`\)"),
    ("device_map", "fsdp", "plain", False,
     r"^teacher_placement='device_map' needs a teacher loaded with `device_map` \(this one has no `hf_device_map`\)"),
    ("replicate", "fsdp", "dispatched", False,
     r"^teacher_placement='replicate' would move a teacher loaded with `device_map`"),
    ("replicate", "single", "quantized", False, r"^teacher_placement='replicate' would move a teacher quantized"),
    ("replicate", "deepspeed-zero3", "plain", False,
     r"^teacher_placement='replicate' is not offered under DeepSpeed ZeRO-3, .* use `teacher_placement=\"shard\"`"),
    ("auto", "deepspeed-zero3", "plain", True,
     r"^cache_teacher_logits runs the teacher on the main process alone, which a ZeRO-3-sharded teacher cannot do"),
    ("sharded", "fsdp", "plain", False, r"^teacher_placement must be one of auto, replicate, shard, device_map"),
])
def test_impossible_placements_are_refused_in_one_line(placement, backend, kind, cached, message):
    with pytest.raises(ValueError, match=message) as info:
        resolve_teacher_placement(placement, backend, _teacher(kind), cached)
    assert len(str(info.value).splitlines()) == 1


def _fsdp2_accelerator(mesh=None):
    """What `prepare_teacher` reads of an FSDP2 `Accelerator` (which cannot be built on CPU: accelerate drops the
    FSDP plugin there and keeps `MULTI_CPU`)."""
    plugin = SimpleNamespace(mixed_precision_policy="MP", cpu_offload=False)
    return SimpleNamespace(is_fsdp2=True, state=SimpleNamespace(fsdp_plugin=plugin), torch_device_mesh=mesh,
                           parallelism_config=SimpleNamespace(fsdp_dim_names=["dp_shard"]))


def test_auto_under_fsdp2_shards_with_the_plugin_options_and_the_cache_replicates(monkeypatch):
    import hf_compress.fsdp

    calls = []
    monkeypatch.setattr(hf_compress.fsdp, "shard_teacher", lambda t, **kw: calls.append((t, kw)) or "sharded")
    teacher = torch.nn.Linear(3, 2)
    meshes = {("dp_shard",): "MESH"}  # the data-parallel sub-mesh, as TRL's prepare_fsdp slices it
    assert prepare_teacher(teacher, "cpu", "bfloat16", accelerator=_fsdp2_accelerator(meshes)) == "sharded"
    assert calls == [(teacher, {"mesh": "MESH", "mp_policy": "MP", "offload_policy": None})]
    assert teacher.weight.dtype == torch.bfloat16 and not teacher.training and not teacher.weight.requires_grad
    cached = torch.nn.Linear(3, 2)
    assert prepare_teacher(cached, "meta", accelerator=_fsdp2_accelerator(), cached=True) is cached
    assert cached.weight.is_meta and len(calls) == 1  # replicated: moved to the device, never sharded


def test_device_map_placement_leaves_the_dispatched_teacher_where_it_is():
    teacher = _teacher("dispatched")
    assert prepare_teacher(teacher, "meta", "float16", accelerator=_fsdp2_accelerator(), placement="device_map") is teacher
    assert teacher.weight.device.type == "cpu" and teacher.weight.dtype == torch.float32 and not teacher.training


def test_the_trainer_refuses_shard_without_fsdp_before_building_anything(tiny_bert, tmp_path):
    from hf_compress.trainers import DistillationTrainer

    args = DistillationArguments(str(tmp_path / "out"), teacher_placement="shard", report_to="none", use_cpu=True)
    teacher = type(tiny_bert)(tiny_bert.config)
    with pytest.raises(ValueError, match=r"^teacher_placement='shard' needs FSDP2 or DeepSpeed ZeRO-3, but this run "
                                         r"is 'single'") as info:
        DistillationTrainer(model=tiny_bert, teacher_model=teacher, args=args)
    assert len(str(info.value).splitlines()) == 1
    assert teacher.training and not (tmp_path / "out").exists()  # not frozen, not placed, nothing written


def test_the_trainer_refuses_a_placement_for_hub_teacher_logits_given_to_it(tiny_bert, tmp_path):
    from hf_compress.trainers import DistillationTrainer

    args = DistillationArguments(str(tmp_path), teacher_placement="device_map", report_to="none", use_cpu=True)
    with pytest.raises(ValueError, match=r"^teacher_placement='device_map' places a teacher, but "
                                         r"teacher_logits='me/logits' loads none"):
        DistillationTrainer(model=tiny_bert, teacher_model=None, args=args, teacher_logits="me/logits")
