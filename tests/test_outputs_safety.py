"""What hf_compress writes, and what it never writes (issue 23, part 1): no secret in a written file or log line,
`--overwrite` never deletes an input or a file we did not write, every folder and file written whole with the modes
`save_pretrained` gives, no stale weights after a save into an old folder, and a failed push leaves the remote as it
was."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import stat

import pytest
import torch
from conftest import random_classification_dataset, tiny_bert_config
from test_cli import FAST, make_csv, make_tiny_model

from hf_compress.atomic import OUTPUT_MARKER, atomic_file, atomic_output_dir, foreign_files, write_text
from hf_compress.cli.main import main
from hf_compress.redact import REDACTED, redact_command, redact_mapping

FAKE_TOKEN = "hf_AbCdEfGh1234567890secret"
OTHER_TOKEN = "hf_ZyXwVuTs0987654321other"


def _snapshot(folder) -> dict[str, str]:
    """`{relative path: sha256}` of every file under `folder`."""
    out = {}
    for dirpath, _, names in os.walk(folder):
        for n in names:
            p = os.path.join(dirpath, n)
            with open(p, "rb") as f:
                out[os.path.relpath(p, folder)] = hashlib.sha256(f.read()).hexdigest()
    return out


def _files_containing(root, needle: str) -> list[str]:
    hits = []
    for dirpath, _, names in os.walk(root):
        for n in names:
            with open(os.path.join(dirpath, n), "rb") as f:
                if needle.encode() in f.read():
                    hits.append(os.path.join(dirpath, n))
    return hits


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


# --- 1. no secret in any written file or log line -----------------------------------------------------------------

@pytest.mark.parametrize("argv, expected", [
    (["--hub_token", FAKE_TOKEN], ["--hub_token", REDACTED]),
    ([f"--hub_token={FAKE_TOKEN}"], [f"--hub_token={REDACTED}"]),
    (["--db-password", "hunter2", "--api_secret=s3"], ["--db-password", REDACTED, f"--api_secret={REDACTED}"]),
    (["--api_key", "k", "--service_credentials=c"], ["--api_key", REDACTED, f"--service_credentials={REDACTED}"]),
    (["--run_name", f"x-{FAKE_TOKEN}-y"], ["--run_name", f"x-{REDACTED}-y"]),  # a token-looking value anywhere
    ([f"HF_TOKEN={'plain'}", "MY_PASSWORD=p"], [f"HF_TOKEN={REDACTED}", f"MY_PASSWORD={REDACTED}"]),
    # words `tokens` / `tokenizer` are not secrets: these options stay readable
    (["--max_tokens", "5", "--tokenizer_name", "t", "--average_tokens_across_devices", "true"],
     ["--max_tokens", "5", "--tokenizer_name", "t", "--average_tokens_across_devices", "true"]),
    (["--hub_token", "--next"], ["--hub_token", "--next"]),  # no value followed: nothing to hide, nothing eaten
    (["--format", "hf_compress_bitmask", "--output_dir", "hf_compress_output"],  # `hf_` words, not tokens
     ["--format", "hf_compress_bitmask", "--output_dir", "hf_compress_output"]),
])
def test_redact_command(argv, expected, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    assert redact_command(argv) == expected


def test_redact_hides_the_environment_token_wherever_it_appears(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "plainsecretvalue")  # not `hf_`-shaped: known only from the environment
    assert redact_command(["--run_name", "a-plainsecretvalue"]) == ["--run_name", f"a-{REDACTED}"]
    assert redact_mapping({"hub_token": "x", "run_name": "plainsecretvalue", "n": 3}) == {"run_name": REDACTED, "n": 3}
    assert redact_mapping({"hub_token": "x"}, drop=False) == {"hub_token": REDACTED}


def test_cli_token_in_argv_lands_in_no_file_and_no_log_line(tmp_path, capsys, caplog, monkeypatch):
    """The card's "Reproduce" command and the report record the command line: a `--hub_token` given there (both
    spellings) and an `hf_...` value elsewhere are redacted in every file of the output and every console line."""
    monkeypatch.setenv("HF_TOKEN", OTHER_TOKEN)
    model = make_tiny_model(tmp_path / "model")
    data = make_csv(tmp_path / "data.csv")
    out = tmp_path / "out"
    caplog.set_level(logging.INFO)
    argv = ["--model", model, "--dataset", data, "--output_dir", str(out), "--no_quantize", "--no_train",
            "--sparsity", "0.5", "--use_cpu", "true", f"--hub_token={FAKE_TOKEN}", "--run_name", OTHER_TOKEN]
    assert main(argv) == 0
    for secret in (FAKE_TOKEN, OTHER_TOKEN):
        assert _files_containing(out, secret) == []
        assert secret not in caplog.text
    captured = capsys.readouterr()
    assert FAKE_TOKEN not in captured.out + captured.err and OTHER_TOKEN not in captured.out + captured.err
    card = (out / "README.md").read_text()
    assert f"'--hub_token={REDACTED}'" in card  # the option is shown, its value not
    assert f"--run_name '{REDACTED}'" in card


def test_error_lines_hold_no_token(tmp_path, capsys):
    """A mistyped secret option is an unknown option: the one error line names it without its value."""
    argv = ["--model", str(tmp_path / "nope"), "--my_secret_token", "plain-value", "--output_dir", str(tmp_path / "out")]
    assert main(argv) == 2
    line = _one_error_line(capsys)
    assert line == f"hf-compress: error: unknown options --my_secret_token {REDACTED}; see `hf-compress --help` for the options."


def test_compress_api_records_no_token(monkeypatch):
    """`compress(hub_token=...)`: the command string and the recipe handed to the card and report hold no token."""
    import hf_compress.pipeline.runner as runner

    seen = {}

    def fake_prepare(*groups, command, recipe):
        seen.update(command=command, recipe=recipe)
        return None

    monkeypatch.setattr(runner, "prepare", fake_prepare)
    monkeypatch.setattr(runner, "run", lambda plan: plan)
    runner.compress("m", "d.csv", "out", hub_token=FAKE_TOKEN, run_name=OTHER_TOKEN)
    assert FAKE_TOKEN not in seen["command"] and OTHER_TOKEN not in seen["command"]
    assert f"hub_token='{REDACTED}'" in seen["command"] and f"run_name='{REDACTED}'" in seen["command"]
    assert "hub_token" not in seen["recipe"] and seen["recipe"]["run_name"] == REDACTED


# --- 2. `--overwrite` never deletes user inputs -------------------------------------------------------------------

def _project(tmp_path):
    """A user's `proj/` holding the model, the data and notes: what `--output_dir proj --overwrite` must not eat."""
    proj = tmp_path / "proj"
    proj.mkdir()
    model = make_tiny_model(proj / "model")
    data = make_csv(proj / "data.csv")
    (proj / "notes.txt").write_text("my notes\n")
    return proj, model, data


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_overwrite_refuses_a_folder_holding_the_inputs(tmp_path, capsys):
    proj, model, data = _project(tmp_path)
    before = _snapshot(proj)
    capsys.readouterr()
    base = ["--dataset", data, "--output_dir", str(proj), "--overwrite", "--no_quantize", "--no_train", *FAST]
    assert main(["--model", model, *base]) == 2
    assert "is inside output_dir" in _one_error_line(capsys) and _snapshot(proj) == before
    # The dataset alone inside it (model elsewhere): refused too.
    outside = make_tiny_model(tmp_path / "elsewhere")
    capsys.readouterr()
    assert main(["--model", outside, *base]) == 2
    line = _one_error_line(capsys)
    assert "`--dataset`" in line and "is inside output_dir" in line and _snapshot(proj) == before
    # Only the user's notes (no input inside): still not ours, refused.
    shutil.rmtree(proj / "model")
    os.remove(proj / "data.csv")
    before = _snapshot(proj)
    capsys.readouterr()
    assert main(["--model", outside, "--dataset", make_csv(tmp_path / "d2.csv"), *base[2:]]) == 2
    assert f"was not written by hf-compress (no `{OUTPUT_MARKER}` in it)" in _one_error_line(capsys)
    assert _snapshot(proj) == before and not [p for p in os.listdir(tmp_path) if p.startswith(".hf-compress-")]


def test_overwrite_replaces_our_own_output_whole(tmp_path, capsys, umask_022):
    model = make_tiny_model(tmp_path / "model")
    data = make_csv(tmp_path / "data.csv")
    out = tmp_path / "out"
    common = ["--model", model, "--dataset", data, "--no_train", "--sparsity", "0.5", "--use_cpu", "true"]
    assert main([*common, "--output_dir", str(out), "--bits", "8"]) == 0  # compressed-tensors int8
    first = set(_snapshot(out))
    assert "quantization_report.json" in first and foreign_files(str(out)) == []
    inode = os.stat(out).st_ino
    # A second, dense run replaces it whole: no file of the quantized run is left (nothing merged).
    assert main([*common, "--output_dir", str(out), "--no_quantize", "--overwrite"]) == 0
    assert main([*common, "--output_dir", str(tmp_path / "fresh"), "--no_quantize"]) == 0
    assert set(_snapshot(out)) == set(_snapshot(tmp_path / "fresh"))
    assert "quantization_report.json" not in set(_snapshot(out))
    assert os.stat(out).st_ino != inode  # a new folder swapped in, not the old one written into
    assert sorted(os.listdir(tmp_path)) == ["data.csv", "fresh", "model", "out"]  # no scratch or old folder left
    # The output is readable as a save_pretrained folder is: 0o755 folder, 0o644 files (umask 022).
    assert _mode(out) == 0o755
    assert {f: oct(_mode(out / f)) for f in os.listdir(out)} == {f: "0o644" for f in os.listdir(out)}  # weights too
    # A file the user added to our output makes it no longer ours: refused, the file kept.
    (out / "my-eval.txt").write_text("keep me")
    capsys.readouterr()
    assert main([*common, "--output_dir", str(out), "--no_quantize", "--overwrite"]) == 2
    assert "holds 1 file(s) hf-compress did not write (my-eval.txt)" in _one_error_line(capsys)
    assert (out / "my-eval.txt").read_text() == "keep me"


def test_overwrite_refuses_our_output_when_it_is_the_model(tmp_path, capsys):
    """Compressing an earlier output again into the same folder would delete the model being read."""
    out = tmp_path / "out"
    with atomic_output_dir(str(out), marker=True) as tmp:
        make_tiny_model(tmp)
    data = make_csv(tmp_path / "data.csv")
    before = _snapshot(out)
    capsys.readouterr()
    assert main(["--model", str(out), "--dataset", data, "--output_dir", str(out), "--overwrite", *FAST]) == 2
    assert "`--model`" in _one_error_line(capsys) and _snapshot(out) == before


# --- 3. atomic writers with ordinary permissions ------------------------------------------------------------------

@pytest.mark.parametrize("umask, dmode, fmode", [(0o022, 0o755, 0o644), (0o027, 0o750, 0o640)])
def test_atomic_writers_give_ordinary_modes(tmp_path, umask, dmode, fmode):
    old = os.umask(umask)
    try:
        with atomic_output_dir(str(tmp_path / "d"), marker=True) as tmp:
            with open(os.path.join(tmp, "a.txt"), "w") as f:
                f.write("a")
        write_text(str(tmp_path / "f.txt"), "x")
        with atomic_file(str(tmp_path / "g.bin")) as tmp:
            with open(tmp, "wb") as f:
                f.write(b"g")
    finally:
        os.umask(old)
    assert _mode(tmp_path / "d") == dmode and _mode(tmp_path / "d" / OUTPUT_MARKER) == fmode
    assert _mode(tmp_path / "f.txt") == fmode and _mode(tmp_path / "g.bin") == fmode
    assert sorted(os.listdir(tmp_path)) == ["d", "f.txt", "g.bin"]  # no temporary name left
    assert json.loads((tmp_path / "d" / OUTPUT_MARKER).read_text())["files"] == ["a.txt"]


def test_exports_and_report_are_readable_by_others(tmp_path, tiny_bert, umask_022):
    """Today `tempfile`'s 0700 folder and 0600 report reach the user; every writer now gives 0o755 / 0o644."""
    from hf_compress.model_cards import save_report
    from hf_compress.pruning import save_compressed
    from hf_compress.quantization import QuantizationArguments, quantize_and_save

    save_compressed(tiny_bert, tmp_path / "bitmask")
    quantize_and_save(tiny_bert, tmp_path / "bnb", QuantizationArguments(bits=8))
    save_report({"x": 1}, str(tmp_path / "bitmask"))
    for folder in ("bitmask", "bnb"):
        assert _mode(tmp_path / folder) == 0o755, folder
        assert {_mode(tmp_path / folder / f) for f in os.listdir(tmp_path / folder)} == {0o644}, folder
    assert foreign_files(str(tmp_path / "bnb")) == []  # the export's marker lists every file it wrote
    assert foreign_files(str(tmp_path / "bitmask")) == ["compression_report.json"]  # added after the export
    assert json.loads((tmp_path / "bitmask" / "compression_report.json").read_text()) == {"x": 1}
    assert sorted(os.listdir(tmp_path)) == ["bitmask", "bnb"]


def test_benchmark_results_are_written_whole(tmp_path, umask_022):
    from benchmarks.common import write_results

    write_results(str(tmp_path / "r"), "bench", {"a": 1}, "table\n")
    assert json.loads((tmp_path / "r" / "bench.json").read_text()) == {"a": 1}
    assert sorted(os.listdir(tmp_path / "r")) == ["bench.json", "bench.md"]
    assert {_mode(tmp_path / "r" / f) for f in ("bench.json", "bench.md")} == {0o644}


# --- 4. no stale weights -------------------------------------------------------------------------------------------

def _model(seed: int):
    from transformers import BertForSequenceClassification

    torch.manual_seed(seed)
    model = BertForSequenceClassification(tiny_bert_config())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm" in name or name.endswith(".bias"):
                p.normal_(0.0 if name.endswith(".bias") else 1.0, 0.1)  # a wrong norm/bias formula must show
            elif ".layer." in name and p.ndim == 2:
                p.masked_fill_(p.abs() <= p.abs().flatten().kthvalue(p.numel() // 2).values, 0.0)
    return model.eval()


IDS = torch.randint(5, 97, (3, 10), generator=torch.Generator().manual_seed(3))


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def test_save_compressed_over_an_older_save_leaves_nothing_stale(tmp_path):
    from transformers import AutoModelForSequenceClassification

    import hf_compress  # noqa: F401  (registers the bitmask format with from_pretrained)
    from hf_compress.pruning import load_compressed, save_compressed

    a, b = _model(0), _model(1)
    assert not torch.equal(_logits(a), _logits(b))
    path = tmp_path / "ckpt"
    a.save_pretrained(path, max_shard_size="20KB")  # an older, sharded dense save: shards + index
    assert (path / "model.safetensors.index.json").exists()
    save_compressed(b, path)
    save_compressed(b, tmp_path / "fresh")
    assert sorted(os.listdir(path)) == sorted(os.listdir(tmp_path / "fresh"))
    assert torch.equal(_logits(load_compressed(str(path))), _logits(b))
    assert torch.equal(_logits(AutoModelForSequenceClassification.from_pretrained(path).eval()), _logits(b))
    # An older bitmask save of A (with a tokenizer) under the same path: replaced whole by B's.
    from task_helpers import tiny_tokenizer

    path2 = tmp_path / "ckpt2"
    save_compressed(a, path2, tokenizer=tiny_tokenizer(tmp_path / "tok"))
    save_compressed(b, path2)
    assert sorted(os.listdir(path2)) == sorted(os.listdir(tmp_path / "fresh"))
    for name, t in load_compressed(str(path2)).state_dict().items():
        assert torch.equal(t, b.state_dict()[name]), name


def _folder_appears_after_the_check(monkeypatch, atomic):
    """`os.path.lexists` says "absent" once: another process creates the folder between the check and the rename."""
    real, checks = os.path.lexists, []

    def lexists(path):
        checks.append(path)
        return False if len(checks) == 1 else real(path)

    monkeypatch.setattr(atomic.os.path, "lexists", lexists)
    return checks


def test_a_folder_another_process_created_after_the_check_is_never_replaced(tmp_path, monkeypatch):
    from hf_compress import atomic

    dest, new = tmp_path / "out", tmp_path / "new"
    for folder, text in ((dest, "theirs"), (new, "ours")):
        folder.mkdir()
        (folder / "a.txt").write_text(text)
    checks = _folder_appears_after_the_check(monkeypatch, atomic)
    with pytest.raises(OSError):
        atomic.replace_dir(str(new), str(dest))
    monkeypatch.undo()
    assert checks[0] == str(dest)
    assert (dest / "a.txt").read_text() == "theirs" and sorted(os.listdir(dest)) == ["a.txt"]


class _Saver:
    def __init__(self, name: str, text: str):
        self.name, self.text = name, text

    def save_pretrained(self, folder):
        with open(os.path.join(folder, self.name), "w") as f:
            f.write(self.text)


def test_two_first_conversions_at_once_keep_the_finished_one(tmp_path, monkeypatch):
    """The second of two processes converting the same cached model finds the first's complete folder at the end:
    it keeps that folder, drops its own copy, and returns the path; an incomplete folder there is still an error."""
    from hf_compress import atomic
    from hf_compress.models import save_converted

    out = tmp_path / "cache" / "model"
    out.mkdir(parents=True)
    for name in ("model.safetensors", "tokenizer.json"):
        (out / name).write_text("first process")
    _folder_appears_after_the_check(monkeypatch, atomic)
    assert save_converted(_Saver("model.safetensors", "second"), _Saver("tokenizer.json", "second"), out) == str(out)
    monkeypatch.undo()
    assert sorted(os.listdir(out.parent)) == ["model"]  # no temporary folder left
    assert (out / "model.safetensors").read_text() == "first process"
    (out / "tokenizer.json").unlink()  # not a finished conversion: the failed rename is raised
    _folder_appears_after_the_check(monkeypatch, atomic)
    with pytest.raises(OSError):
        save_converted(_Saver("model.safetensors", "second"), _Saver("tokenizer.json", "second"), out)
    monkeypatch.undo()
    assert sorted(os.listdir(out.parent)) == ["model"] and sorted(os.listdir(out)) == ["model.safetensors"]


def test_load_compressed_ignores_a_v1_file_left_beside_a_v2_save(tmp_path, caplog):
    """An older hf_compress merged saves file by file, so a v1 `model.compressed.safetensors` of model A can sit
    beside a v2 save of model B. config.json (written with B) names the v2 file, which `from_pretrained` reads too:
    `load_compressed` returns B, and warns about the v1 file."""
    from hf_compress.pruning import load_compressed, save_compressed
    from hf_compress.formats.bitmask import SAFE_WEIGHTS_NAME, WEIGHTS_NAME

    a, b = _model(0), _model(1)
    save_compressed(a, tmp_path / "a")
    save_compressed(b, tmp_path / "b")
    shutil.copy(tmp_path / "a" / SAFE_WEIGHTS_NAME, tmp_path / "b" / WEIGHTS_NAME)  # A's weights, v1-named
    with caplog.at_level(logging.WARNING):
        reloaded = load_compressed(str(tmp_path / "b"))
    assert torch.equal(_logits(reloaded), _logits(b))
    assert f"Ignoring {tmp_path / 'b' / WEIGHTS_NAME}: a v1 file from an older save" in caplog.text
    # A v1-only folder (config without `quantization_config`) still loads, from its v1 file.
    v1 = tmp_path / "v1"
    shutil.copytree(tmp_path / "a", v1)
    os.rename(v1 / SAFE_WEIGHTS_NAME, v1 / WEIGHTS_NAME)
    config = json.loads((v1 / "config.json").read_text())
    del config["quantization_config"]
    (v1 / "config.json").write_text(json.dumps(config))
    assert torch.equal(_logits(load_compressed(str(v1))), _logits(a))
    os.remove(tmp_path / "b" / SAFE_WEIGHTS_NAME)
    with pytest.raises(FileNotFoundError, match="names a v2 bitmask checkpoint but model.safetensors is missing"):
        load_compressed(str(tmp_path / "b"))


# --- 5. push rollback ----------------------------------------------------------------------------------------------

REPO = "acme/tiny-bert-rollback"


@pytest.fixture
def checkpoint(tmp_path, tiny_bert):
    """A pruned tiny BERT with its report (8 recorded examples) and card."""
    from hf_compress.model_cards import build_report, write_model_card

    base_dir, out = tmp_path / "base", tmp_path / "out"
    tiny_bert.save_pretrained(base_dir)
    comp = _model(2)
    comp.save_pretrained(out)
    build_report(comp, str(out), tiny_bert.eval(), str(base_dir), base_model_id="acme/tiny-bert",
                 eval_dataset=random_classification_dataset(32, seed=2), eval_info={"dataset": "rotten_tomatoes", "split": "test[:32]"})
    write_model_card(str(out), {"pruning": {"target_sparsity": 0.5}}, "hf-compress --sparsity 0.5", repo_id=REPO)
    return out


def _remote(hub) -> dict | None:
    """Everything a reader of the repo sees: its branches, main's history and main's files (None: no repo)."""
    if not hub.store.exists(REPO):
        return None
    return {"branches": hub.branches(REPO), "main": [c["id"] for c in hub.commits(REPO)],
            "files": hub.commits(REPO)[-1]["files"]}


def _tamper(out):
    from hf_compress.model_cards import save_report

    report = json.loads((out / "compression_report.json").read_text())
    report["verification"]["predictions"] = [1 - p for p in report["verification"]["predictions"]]
    save_report(report, str(out))


def test_failed_push_into_a_new_repo_deletes_it(hub, checkpoint):
    from hf_compress.hub import HubPushError, push_to_hub

    hub.fail_with, hub.fail_once = {"commit": 500}, True  # the repo is created, then the commit fails
    with pytest.raises(HubPushError, match=rf"nothing was committed, retry the same call\. The repo {REPO} that this "
                                           r"push created was deleted again\.$") as err:
        push_to_hub(checkpoint, REPO, endpoint=hub.url)
    assert "\n" not in str(err.value)
    assert any(r["path"] == "/api/repos/create" for r in hub.requests)
    assert _remote(hub) is None  # as before the call
    _tamper(checkpoint)  # a tampered verification of a new repo: deleted too
    with pytest.raises(HubPushError, match=rf"^Verification failed: .* The repo {REPO} that this push created was deleted"):
        push_to_hub(checkpoint, REPO, endpoint=hub.url, verify=True)
    assert _remote(hub) is None


def test_verified_push_to_an_existing_repo_moves_main_only_after_verification(hub, checkpoint):
    from hf_compress.hub import push_to_hub

    push_to_hub(checkpoint, REPO, endpoint=hub.url)
    before = _remote(hub)
    (checkpoint / "notes.txt").write_text("v2\n")
    result = push_to_hub(checkpoint, REPO, endpoint=hub.url, verify=True)
    after = _remote(hub)
    assert list(after["branches"]) == ["main"]  # the upload branch is gone
    assert after["main"] == before["main"] + [result.commit_oid]  # exactly one new commit on main
    assert "notes.txt" in after["files"] and "notes.txt" not in before["files"]
    assert OUTPUT_MARKER not in after["files"]
    branch_commits = [r["path"] for r in hub.requests if "/commit/hf-compress-upload-" in r["path"]]
    assert len(branch_commits) == 1 and result.verified["examples"] == 8


def test_push_killed_between_commits_leaves_main_as_it_was(hub, checkpoint):
    """The staged commit and its verification went through; the commit to `main` fails: `main` is unchanged and
    the upload branch is deleted."""
    from hf_compress.hub import HubPushError, push_to_hub

    push_to_hub(checkpoint, REPO, endpoint=hub.url)
    before = _remote(hub)
    (checkpoint / "notes.txt").write_text("v2\n")
    hub.fail_paths = {r"/commit/main$": 500}
    with pytest.raises(HubPushError, match=rf"HTTP 500: .* `main` of {REPO} was not moved \(the upload branch was deleted\)\.$"):
        push_to_hub(checkpoint, REPO, endpoint=hub.url, verify=True)
    assert any("/commit/hf-compress-upload-" in r["path"] for r in hub.requests)  # the first commit did land
    assert _remote(hub) == before


def test_tampered_verification_leaves_main_as_it_was(hub, checkpoint):
    from hf_compress.hub import HubPushError, push_to_hub

    push_to_hub(checkpoint, REPO, endpoint=hub.url)
    before = _remote(hub)
    _tamper(checkpoint)
    with pytest.raises(HubPushError, match=rf"^Verification failed: the downloaded model gives .* `main` of {REPO} was not moved"):
        push_to_hub(checkpoint, REPO, endpoint=hub.url, verify=True)
    assert _remote(hub) == before
    assert len([r for r in hub.requests if r["path"].endswith("/commit/main")]) == 1  # the first push's only


def test_report_names_no_work_folder_path(tmp_path):
    """The export stage's temporary folder (a machine path, gone after the run) is not recorded in the report."""
    from test_cli import make_csv, make_tiny_model

    from hf_compress.cli.main import main

    out = tmp_path / "out"
    assert main(["--model", make_tiny_model(tmp_path / "model"), "--dataset", make_csv(tmp_path / "data.csv"),
                 "--output_dir", str(out), "--max_steps", "2", "--base_finetune_steps", "0", "--use_cpu", "true",
                 "--report_to", "none"]) == 0
    text = (out / "compression_report.json").read_text()
    assert ".hf-compress-" not in text and "output_dir" not in json.loads(text)["pipeline"]["stages"]["export"]
