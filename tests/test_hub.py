"""push_to_hub against a real Hub-API server on 127.0.0.1 (tests/hub_server.py), with the real huggingface_hub client."""

from __future__ import annotations

import hashlib
import logging
import os
import socket

import pytest
import torch
from conftest import HUB_TOKEN as TOKEN
from conftest import random_classification_dataset, tiny_bert_config

from hf_compress.hub import HubPushError, push_to_hub
from hf_compress.model_cards import build_report, save_report, write_model_card

REPO = "acme/tiny-bert-pruned"
RECIPE = {"pruning": {"target_sparsity": 0.5}}
COMMAND = "hf-compress prune --target_sparsity 0.5 --output_dir out"


@pytest.fixture
def checkpoint(tmp_path, tiny_bert):
    """A pruned tiny BERT saved with its report (8 recorded examples) and card, next to its base."""
    from transformers import BertForSequenceClassification

    base_dir, out = tmp_path / "base", tmp_path / "out"
    tiny_bert.save_pretrained(base_dir)
    comp = BertForSequenceClassification(tiny_bert_config())
    comp.load_state_dict(tiny_bert.state_dict())
    with torch.no_grad():
        w = comp.bert.encoder.layer[1].output.dense.weight
        w[w.abs() < w.abs().median()] = 0
    comp.save_pretrained(out)
    build_report(comp.eval(), str(out), tiny_bert.eval(), str(base_dir), base_model_id="acme/tiny-bert",
                 eval_dataset=random_classification_dataset(32, seed=2), eval_info={"dataset": "rotten_tomatoes", "split": "test[:32]"})
    write_model_card(str(out), RECIPE, COMMAND, repo_id=REPO)
    return out, comp


def _snapshot(folder) -> dict[str, str]:
    out = {}
    for dirpath, _, names in os.walk(folder):
        for n in names:
            p = os.path.join(dirpath, n)
            with open(p, "rb") as f:
                out[os.path.relpath(p, folder)] = hashlib.sha256(f.read()).hexdigest()
    return out


def _all_bytes_under(root) -> list[str]:
    hits = []
    for dirpath, _, names in os.walk(root):
        for n in names:
            p = os.path.join(dirpath, n)
            with open(p, "rb") as f:
                if TOKEN.encode() in f.read():
                    hits.append(p)
    return hits


def test_push_is_one_commit_and_serves_back(hub, checkpoint, tmp_path):
    from huggingface_hub import HfApi, ModelCard, hf_hub_download, snapshot_download
    from transformers import AutoModelForSequenceClassification

    out, comp = checkpoint
    local = sorted(_snapshot(out))
    assert {"model.safetensors", "config.json", "compression_report.json", "README.md", "accuracy_vs_size.png"} <= set(local)

    result = push_to_hub(out, REPO, endpoint=hub.url, commit_message="Upload pruned tiny BERT")
    commits = hub.commits(REPO)
    assert len(commits) == 2  # the repo's initial commit + exactly one for the push
    assert commits[-1]["title"] == "Upload pruned tiny BERT" and commits[-1]["id"] == result.commit_oid
    assert sorted(commits[-1]["files"]) == sorted(local + [".gitattributes"])
    assert len([r for r in hub.requests if r["path"].endswith("/commit/main")]) == 1

    api = HfApi(endpoint=hub.url)
    assert [c.commit_id for c in api.list_repo_commits(REPO)][0] == result.commit_oid
    for name in local:
        path = hf_hub_download(REPO, name, endpoint=hub.url, cache_dir=tmp_path / "dl")
        with open(path, "rb") as f, open(out / name, "rb") as g:
            assert f.read() == g.read(), name
    card = ModelCard.load(REPO)  # no endpoint argument: goes through constants.ENDPOINT
    assert card.data.base_model == "acme/tiny-bert" and card.data.base_model_relation == "finetune"
    card.validate()  # the server's /api/validate-yaml accepts it
    snap = snapshot_download(REPO, endpoint=hub.url, local_dir=tmp_path / "snap")
    reloaded = AutoModelForSequenceClassification.from_pretrained(snap).eval()
    ids = torch.randint(5, 97, (3, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, comp.eval()(input_ids=ids).logits)


def test_push_verify_reproduces_recorded_metric(hub, checkpoint):
    import json

    out, _ = checkpoint
    result = push_to_hub(out, REPO, endpoint=hub.url, verify=True)
    recorded = json.loads((out / "compression_report.json").read_text())["verification"]
    assert result.verified["examples"] == 8
    assert result.verified["metrics"] == recorded["metrics"]
    assert result.verified["max_abs_logit_diff"] <= 1e-5
    assert result.verified["files_checked"] == len(result.files)

    # A report whose recorded numbers the model does not give is caught after download.
    report = json.loads((out / "compression_report.json").read_text())
    report["verification"]["predictions"] = [1 - p for p in report["verification"]["predictions"]]
    save_report(report, str(out))
    with pytest.raises(HubPushError, match="Verification failed: the downloaded model gives"):
        push_to_hub(out, REPO, endpoint=hub.url, verify=True)


def test_second_push_adds_one_commit_and_endpoint_from_env(hub, checkpoint, monkeypatch):
    out, _ = checkpoint
    push_to_hub(out, REPO, endpoint=hub.url)
    (out / "notes.txt").write_text("second version\n")
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    result = push_to_hub(out, REPO)  # endpoint from HF_ENDPOINT, token from HF_TOKEN
    assert result.endpoint == hub.url
    commits = hub.commits(REPO)
    assert len(commits) == 3 and "notes.txt" in commits[-1]["files"] and "notes.txt" not in commits[-2]["files"]


def test_401_is_clear_leaves_folder_whole_and_retry_works(hub, checkpoint, caplog, capsys):
    out, _ = checkpoint
    before = _snapshot(out)
    caplog.set_level(logging.DEBUG)
    with pytest.raises(HubPushError, match=r"HTTP 401: the Hub refused the token") as err:
        push_to_hub(out, REPO, endpoint=hub.url, token="hf_wrong_token_123")
    assert "hf_wrong_token_123" not in str(err.value) and "\n" not in str(err.value)
    assert _snapshot(out) == before
    assert not os.path.exists(hub.store.repo_dir(REPO))  # refused at create_repo: nothing on the server

    result = push_to_hub(out, REPO, endpoint=hub.url, token=TOKEN)
    assert len(hub.commits(REPO)) == 2 and hub.commits(REPO)[-1]["id"] == result.commit_oid
    # The token reached the server (it authenticated every call) but no log line, output or file.
    assert all(r["headers"].get("authorization") == f"Bearer {TOKEN}" for r in hub.requests[-3:])
    captured = capsys.readouterr()
    assert TOKEN not in caplog.text and TOKEN not in captured.out + captured.err
    assert _all_bytes_under(out) == [] and _all_bytes_under(hub.store.root) == []


def test_500_mid_upload_commits_nothing_and_retry_commits_once(hub, checkpoint):
    out, _ = checkpoint
    before = _snapshot(out)
    hub.fail_with, hub.fail_once = {"commit": 500}, True
    with pytest.raises(HubPushError, match=r"HTTP 500: the Hub failed while uploading; nothing was committed, retry"):
        push_to_hub(out, REPO, endpoint=hub.url)
    paths = [r["path"] for r in hub.requests]
    assert any(p.endswith("/preupload/main") for p in paths)  # it failed mid-upload, after the preupload
    assert not hub.store.exists(REPO)  # the repo this push created was deleted again: the remote is as before
    assert _snapshot(out) == before

    result = push_to_hub(out, REPO, endpoint=hub.url)
    assert len(hub.commits(REPO)) == 2 and hub.commits(REPO)[-1]["id"] == result.commit_oid


def test_server_down_is_one_clear_line(checkpoint, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out, _ = checkpoint
    before = _snapshot(out)
    with pytest.raises(HubPushError, match=rf"Push to http://127.0.0.1:{port} failed: cannot reach .*ConnectError"):
        push_to_hub(out, REPO, endpoint=f"http://127.0.0.1:{port}", token=TOKEN)
    assert _snapshot(out) == before


def test_invalid_metadata_is_refused_before_upload(hub, checkpoint):
    out, _ = checkpoint
    readme = out / "README.md"
    readme.write_text(readme.read_text().replace("base_model_relation: finetune", "base_model_relation: pruned"))
    with pytest.raises(ValueError, match="base_model_relation"):
        push_to_hub(out, REPO, endpoint=hub.url)
    assert not hub.store.exists(REPO)  # the repo this push created was deleted again
    assert not any(r["path"].endswith("/commit/main") for r in hub.requests)


def test_bad_arguments(tmp_path, checkpoint):
    out, _ = checkpoint
    with pytest.raises(ValueError, match="repo_id must look like `namespace/name`, got 'no-namespace'"):
        push_to_hub(out, "no-namespace")
    with pytest.raises(ValueError, match="does not exist"):
        push_to_hub(tmp_path / "missing", REPO)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="has no config.json"):
        push_to_hub(tmp_path / "empty", REPO)
    (out / "compression_report.json").unlink()
    with pytest.raises(ValueError, match="verify=True needs"):
        push_to_hub(out, REPO, verify=True)


def test_load_quantized_takes_a_hub_id_as_the_card_snippet_does(hub, tmp_path):
    """The card of a bnb checkpoint with low-bit embeddings says `load_quantized("<repo id>")`: it must download."""
    from transformers import BertForSequenceClassification

    from hf_compress.quantization import QuantizationArguments, load_quantized, quantize_and_save

    torch.manual_seed(0)
    model = BertForSequenceClassification(tiny_bert_config(hidden_size=64, intermediate_size=128)).eval()
    out = tmp_path / "int8-emb"
    quantize_and_save(model, out, QuantizationArguments(bits=8, quantize_embeddings=True, backend="bitsandbytes"))
    push_to_hub(out, REPO, endpoint=hub.url)
    ids = torch.randint(5, 97, (3, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        local = load_quantized(str(out))(input_ids=ids).logits
        remote = load_quantized(REPO)(input_ids=ids).logits
    assert torch.equal(remote, local)
