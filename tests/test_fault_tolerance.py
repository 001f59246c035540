"""Interrupted runs: a training run SIGKILLed mid-way and resumed ends where an uninterrupted one does; a save
interrupted half-way leaves no half-written output folder."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from hf_compress.distributed import atomic_output_dir, last_valid_checkpoint, validate_checkpoint

HERE = os.path.dirname(os.path.abspath(__file__))
RUN = ["--max-steps", "12", "--save-steps", "3", "--end-step", "9", "--frequency", "3", "--target-sparsity", "0.75"]


def _worker(out, dump, *extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(HERE), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, os.path.join(HERE, "ddp_worker.py"), "--output-dir", str(out), "--dump-dir", str(dump), *RUN, *extra]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)


def _truncate(path):
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    root = tmp_path_factory.mktemp("straight")
    proc = _worker(root / "out", root / "dump")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return load_file(root / "dump" / "rank0.safetensors"), json.load(open(root / "dump" / "rank0.json"))


def test_sigkill_then_resume_matches_uninterrupted_run(uninterrupted, tmp_path):
    out, dump = tmp_path / "out", tmp_path / "dump"
    killed = _worker(out, dump, "--kill-at-step", "8")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert sorted(os.listdir(out)) == ["checkpoint-3", "checkpoint-6"]  # killed before step 9's save
    assert not (dump / "rank0.json").exists()
    # A kill during the next save leaves a folder transformers' `get_last_checkpoint` would still pick.
    shutil.copytree(out / "checkpoint-6", out / "checkpoint-9")
    _truncate(out / "checkpoint-9" / "model.safetensors")
    assert last_valid_checkpoint(str(out)) == str(out / "checkpoint-6")

    resumed = _worker(out, dump, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    state, info = load_file(dump / "rank0.safetensors"), json.load(open(dump / "rank0.json"))
    ref_state, ref_info = uninterrupted
    assert info["resumed_from"] == str(out / "checkpoint-6") and info["global_step"] == ref_info["global_step"] == 12
    masks = sorted(k for k in ref_state if k.startswith("mask::"))
    assert masks and masks == sorted(k for k in state if k.startswith("mask::"))
    for key in masks:
        assert torch.equal(state[key], ref_state[key]), key
    assert (info["zeros"], info["total"]) == (ref_info["zeros"], ref_info["total"])
    assert info["zeros"] == sum(round(0.75 * ref_state[k[len("mask::"):]].numel()) for k in masks)
    for key in ref_state:  # same seed, same data order, restored RNG: the weights match too
        torch.testing.assert_close(state[key], ref_state[key], rtol=0, atol=1e-6, msg=key)
    # The schedule position survived: the logged sparsity after every step is the uninterrupted run's.
    logged = lambda i: {h["step"]: h["sparsity"] for h in i["log_history"] if "loss" in h}  # noqa: E731
    assert {s: v for s, v in logged(info).items() if s > 6} == {s: v for s, v in logged(ref_info).items() if s > 6}


def test_truncated_checkpoint_is_named_in_one_line(tmp_path):
    ckpt = tmp_path / "checkpoint-4"
    ckpt.mkdir()
    (ckpt / "trainer_state.json").write_text("{}")
    from safetensors.torch import save_file

    save_file({"w": torch.arange(100.0)}, ckpt / "model.safetensors")
    validate_checkpoint(str(ckpt))  # whole: no error
    _truncate(ckpt / "model.safetensors")
    with pytest.raises(ValueError, match=r"checkpoint-4/model.safetensors is truncated or corrupt \(\d+ bytes on disk, header says \d+\); delete"):
        validate_checkpoint(str(ckpt))
    (ckpt / "model.safetensors").write_bytes(b"\x00\x01")
    with pytest.raises(ValueError, match="shorter than the 8-byte header"):
        validate_checkpoint(str(ckpt))
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="has no model weights"):
        validate_checkpoint(str(ckpt))
    (ckpt / "trainer_state.json").unlink()
    with pytest.raises(ValueError, match=r"has no trainer_state.json \(an interrupted save\?\)"):
        validate_checkpoint(str(ckpt))
    with pytest.raises(ValueError, match="checkpoint-7 does not exist"):
        validate_checkpoint(str(tmp_path / "checkpoint-7"))
    assert last_valid_checkpoint(str(tmp_path)) is None


class _Boom(RuntimeError):
    pass


def test_interrupted_save_leaves_no_output_dir(tmp_path, tiny_bert, monkeypatch):
    import safetensors.torch

    target = tmp_path / "export"
    real = safetensors.torch.save_file

    def half_then_fail(tensors, filename, *args, **kwargs):
        real(tensors, filename, *args, **kwargs)
        _truncate(filename)
        raise _Boom("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", half_then_fail)
    with pytest.raises(_Boom):
        with atomic_output_dir(str(target)) as tmp:
            from hf_compress.pruning import save_compressed

            save_compressed(tiny_bert, tmp)
    assert not target.exists() and os.listdir(tmp_path) == []  # neither the folder nor a temporary one

    # An existing output is left whole by a failed overwrite, and replaced by a successful one.
    monkeypatch.setattr(safetensors.torch, "save_file", real)
    tiny_bert.save_pretrained(target)
    before = (target / "model.safetensors").read_bytes()
    with pytest.raises(_Boom):
        with atomic_output_dir(str(target)) as tmp:
            (open(os.path.join(tmp, "model.safetensors"), "wb")).write(b"partial")
            raise _Boom("killed")
    assert (target / "model.safetensors").read_bytes() == before and sorted(os.listdir(tmp_path)) == ["export"]
    with atomic_output_dir(str(target)) as tmp:
        (open(os.path.join(tmp, "new.txt"), "w")).write("x")
    assert sorted(os.listdir(target)) == ["new.txt"] and sorted(os.listdir(tmp_path)) == ["export"]
    with pytest.raises(ValueError, match="export already exists; pass `overwrite=True`"):
        with atomic_output_dir(str(target), overwrite=False):
            pass


def _export_pruned(model, folder):
    from hf_compress.pruning import save_compressed

    save_compressed(model, folder)


def _export_int8(model, folder):
    from hf_compress.quantization import QuantizationArguments, quantize_and_save

    quantize_and_save(model, folder, QuantizationArguments(bits=8))


@pytest.mark.parametrize("export", [_export_pruned, _export_int8], ids=["save_compressed", "quantize_and_save"])
def test_interrupted_export_leaves_previous_output_whole(export, tmp_path, tiny_bert, monkeypatch):
    import safetensors.torch
    import transformers.modeling_utils

    target = tmp_path / "export"
    export(tiny_bert, str(target))  # a first, complete export
    before = {f: (target / f).read_bytes() for f in os.listdir(target)}
    real = safetensors.torch.save_file

    def half_then_fail(tensors, filename, *args, **kwargs):  # the process dies while writing the weights
        real(tensors, filename, *args, **kwargs)
        _truncate(filename)
        raise _Boom("killed mid-write")

    monkeypatch.setattr(safetensors.torch, "save_file", half_then_fail)
    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", half_then_fail)
    with pytest.raises(_Boom):
        export(tiny_bert, str(target))
    assert os.listdir(tmp_path) == ["export"]  # no temporary folder left beside it
    assert {f: (target / f).read_bytes() for f in os.listdir(target)} == before  # the old export, byte for byte
    for name in before:
        if name.endswith(".safetensors"):
            from hf_compress.distributed import check_safetensors_file

            check_safetensors_file(str(target / name))
    # Without a previous export, a failed one leaves nothing at all.
    with pytest.raises(_Boom):
        export(tiny_bert, str(tmp_path / "fresh"))
    assert os.listdir(tmp_path) == ["export"]
