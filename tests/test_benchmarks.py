"""`python -m benchmarks.results --quick` on the real MiniLM-L6: every variant, numbers consistent with the files."""

import json

import pytest


@pytest.mark.slow
def test_results_quick_mode(tmp_path, real_finetuned):
    from benchmarks import results

    out = results.run("quick", str(tmp_path), base_model=str(real_finetuned))
    rows = {r["variant"]: r for r in out["rows"]}
    assert len(rows) == 9
    base = out["rows"][0]
    assert base["ratio_to_baseline"] == 1.0
    # fp32 MiniLM-L6: 4 bytes a parameter, plus the safetensors header.
    assert base["params"] * 4 <= base["bytes"] < base["params"] * 4 * 1.001
    for r in out["rows"]:
        assert r["ratio_to_baseline"] == pytest.approx(base["bytes"] / r["bytes"])
        assert r["bits_per_weight"] == pytest.approx(8 * r["bytes"] / r["params"])
        assert 0.0 <= r["accuracy"] <= 1.0
    # Sizes ordered as the techniques promise.
    assert rows["pruned 90% (bitmask format)"]["bytes"] < rows["pruned 80% (bitmask format)"]["bytes"] < rows["pruned 50% (bitmask format)"]["bytes"] < base["bytes"]
    assert rows["4-bit NF4 (PTQ)"]["bytes"] < rows["8-bit LLM.int8 (PTQ)"]["bytes"] < base["bytes"]
    assert rows["pruned 90% (bitmask format)"]["sparsity"] == pytest.approx(0.9, abs=1e-3)
    combined = out["rows"][-1]
    assert combined["ratio_to_baseline"] > 6  # 3 layers, 4-bit weights and embeddings
    assert out["goal_met"] == (combined["ratio_to_baseline"] >= 8 and combined["accuracy_delta_pts"] >= -1.0)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(out["rows"]))
    assert (tmp_path / "results.md").read_text().count("\n|") >= 10
    assert (tmp_path / "accuracy_vs_size.png").stat().st_size > 10_000
