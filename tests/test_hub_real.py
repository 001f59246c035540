"""The real fine-tuned MiniLM-L6: prune, save compressed, report, card, push to the test Hub and verify."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import evaluate_accuracy
from hub_server import HubServer

TOKEN = "hf_real_test_token_8d2e"
SPARSITY = 0.5
EVAL_ROWS = 300  # each row is evaluated four times (report base and result, and the two checks here)


def _magnitude_prune_encoder(model, sparsity: float) -> int:
    """Zero the smallest-magnitude `sparsity` of each encoder Linear weight; returns how many entries were zeroed."""
    zeroed = 0
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and ".encoder." in f".{name}.":
                w = module.weight
                k = int(sparsity * w.numel())
                threshold = w.abs().flatten().kthvalue(k).values
                mask = w.abs() <= threshold
                zeroed += int(mask.sum())
                w[mask] = 0
    return zeroed


@pytest.mark.slow
def test_real_minilm_report_card_push_verify(real_finetuned, real_data, tmp_path, monkeypatch):
    from huggingface_hub import ModelCard, constants
    from transformers import AutoModelForSequenceClassification

    from hf_compress.hub import push_to_hub
    from hf_compress.model_cards import build_report, write_model_card
    from hf_compress.pruning import save_compressed

    tok, ds = real_data
    test = ds["test"].select(range(EVAL_ROWS))
    base = AutoModelForSequenceClassification.from_pretrained(real_finetuned).eval()
    comp = AutoModelForSequenceClassification.from_pretrained(real_finetuned).eval()
    zeroed = _magnitude_prune_encoder(comp, SPARSITY)
    out = tmp_path / "minilm-rt-pruned50"
    save_compressed(comp, str(out))
    tok.save_pretrained(out)

    report = build_report(
        comp, str(out), base, str(real_finetuned), base_model_id="sentence-transformers/all-MiniLM-L6-v2",
        techniques=["pruning"], eval_dataset=test, tokenizer=tok,
        eval_info={"dataset": "rotten_tomatoes", "dataset_name": "Rotten Tomatoes (hf_compress fixed split)",
                   "split": f"test[:{EVAL_ROWS}]"},
    )
    # Cross-check the metrics with the conftest helper on the same 1,000 rows.
    assert report["metrics"]["base"]["accuracy"] == pytest.approx(evaluate_accuracy(base, test, tok))
    assert report["metrics"]["compressed"]["accuracy"] == pytest.approx(evaluate_accuracy(comp, test, tok))
    assert report["metrics"]["compressed"]["num_examples"] == EVAL_ROWS
    assert report["nonzeros"]["base"] - report["nonzeros"]["compressed"] >= zeroed - 100  # a few were already 0
    assert report["sparsity"]["linear_weights"] > 0.45
    assert report["size"]["ratio"] > 1.2  # bitmask + values for the pruned matrices, embeddings dense
    assert report["metrics"]["base"]["accuracy"] > 0.7

    card = write_model_card(str(out), {"pruning": {"target_sparsity": SPARSITY, "scope": "per-layer encoder Linear"}},
                            "pytest tests/test_hub_real.py -m slow", repo_id="acme/minilm-rt-pruned50", license="apache-2.0")
    assert card.data.base_model_relation == "finetune"
    assert (out / "accuracy_vs_size.png").is_file()

    with HubServer(tmp_path / "hub", require_token=TOKEN) as hub:
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "ENDPOINT", hub.url)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.url + "/{repo_id}/resolve/{revision}/{filename}")
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf_cache"))
        result = push_to_hub(out, "acme/minilm-rt-pruned50", endpoint=hub.url, token=TOKEN, verify=True)
        assert len(hub.commits("acme/minilm-rt-pruned50")) == 2
        assert result.verified["metrics"] == report["verification"]["metrics"]
        assert result.verified["max_abs_logit_diff"] <= 1e-4
        loaded = ModelCard.load("acme/minilm-rt-pruned50", token=TOKEN)
        assert loaded.data.eval_results[0].metric_value == report["metrics"]["compressed"]["accuracy"]
    print("\nREAL-FIGURES " + json.dumps({
        "base_weights_bytes": report["size"]["base_weights_bytes"],
        "compressed_weights_bytes": report["size"]["compressed_weights_bytes"],
        "ratio": report["size"]["ratio"],
        "bits_per_weight_on_disk": report["bits_per_weight"]["on_disk"],
        "linear_sparsity": report["sparsity"]["linear_weights"], "global_sparsity": report["sparsity"]["global"],
        "base_accuracy": report["metrics"]["base"]["accuracy"], "compressed_accuracy": report["metrics"]["compressed"]["accuracy"],
        "verified": result.verified,
    }))
