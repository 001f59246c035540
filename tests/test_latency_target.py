"""`hf-compress --target latency`: candidates parsed and refused in one line, the choice rule, and the search end to
end on a tiny BERT (every candidate cut, distilled, exported to ONNX Runtime, evaluated and timed; the fastest within
the budget written)."""

from __future__ import annotations

import json
import os

import pytest
from test_cli import FAST, make_csv, make_tiny_model

from hf_compress.cli.main import main
from hf_compress.pipeline.arguments import ModelArguments, candidate_name, parse_latency_candidates
from hf_compress.pipeline.latency import median_ms, pick
from hf_compress.tasks import CompressionInputError


def test_latency_candidates_parse_in_order_with_counts_and_fractions():
    got = parse_latency_candidates("none; ffn=0.5 ;ffn=0.25,layers=4")
    assert got == [{}, {"ffn": 0.5}, {"ffn": 0.25, "layers": 4}]
    assert isinstance(got[2]["layers"], int)
    assert [candidate_name(c) for c in got] == ["none", "ffn=0.5", "ffn=0.25,layers=4"]


@pytest.mark.parametrize("spec, part", [("ffn", "ffn"), ("ffn=0", "ffn=0"), ("ffn=2.5", "ffn=2.5"),
                                        ("mlp=0.5", "mlp=0.5"), ("ffn=0.5,ffn=0.25", "ffn=0.5,ffn=0.25"),
                                        ("none;", "")])
def test_bad_latency_candidate_is_one_line_naming_it(spec, part):
    with pytest.raises(CompressionInputError) as err:
        parse_latency_candidates(spec)
    assert str(err.value).startswith(f"latency_candidates: {part!r} is not a candidate;")
    assert "\n" not in str(err.value)


def test_latency_candidate_keeping_all_of_a_structure_is_refused_not_run_uncut():
    # `layers=1` reads as "one block" but a kept amount of 1 is the fraction 1.0 (every block): refused, not a
    # candidate whose layers are silently all kept
    with pytest.raises(CompressionInputError) as err:
        parse_latency_candidates("none;ffn=0.25,layers=1")
    assert str(err.value) == ("latency_candidates: 'layers=1' in 'ffn=0.25,layers=1' keeps every block (a kept amount "
                              "of 1 means all); pass a fraction below 1 (e.g. `layers=0.5`) or a whole count > 1, "
                              "or drop `layers=1`.")
    assert parse_latency_candidates("ffn=0.25,layers=2") == [{"ffn": 0.25, "layers": 2}]


def test_latency_candidate_listed_twice_is_refused():
    with pytest.raises(CompressionInputError, match="names a candidate twice"):
        parse_latency_candidates("none;ffn=0.5;ffn=0.50")


def test_target_latency_implies_onnx_and_refuses_other_formats():
    assert ModelArguments(target="latency").format == "onnx"
    with pytest.raises(CompressionInputError, match=r"^--target latency times ONNX Runtime graphs, not --format "
                                                    r"compressed-tensors; drop --format or pass --format onnx\.$"):
        ModelArguments(target="latency", format="compressed-tensors")
    with pytest.raises(CompressionInputError, match=r"^target must be one of latency, got 'speed'\.$"):
        ModelArguments(target="speed")


def _row(latency, within, gap):
    return {"latency_ms": latency, "within_budget": within, "metric_gap": gap}


def test_pick_is_the_fastest_within_budget_not_the_last_or_most_accurate():
    rows = [_row(10.0, True, 0.1), _row(4.0, True, 0.9), _row(6.0, True, 0.5), _row(2.0, False, 3.0)]
    assert pick(rows) == (1, True)


def test_pick_without_any_row_in_budget_is_the_closest_to_the_base():
    rows = [_row(10.0, False, 1.5), _row(4.0, False, 1.2), _row(2.0, False, 4.0)]
    assert pick(rows) == (1, False)


def test_median_ms_times_each_call_after_the_warmup():
    calls = []
    ms = median_ms(lambda: calls.append(1), warmup=2, repeats=5)
    assert len(calls) == 7 and 0 <= ms < 50


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("latency")
    return make_tiny_model(tmp / "model", head=True), make_csv(tmp / "data.csv"), tmp


@pytest.mark.parametrize("extra, message", [
    (["--sparsity", "0.5"], "--target latency cuts structures; unstructured `--sparsity 0.5` runs no faster in ONNX "
                            "Runtime: drop --sparsity (or pass --no_prune)."),
    (["--prune_structure", "ffn", "--prune_ffn_keep", "0.5"],
     "--target latency picks the structure from --latency_candidates; drop `--prune_structure ffn` (or pass it as a "
     "candidate, e.g. `--latency_candidates 'none;ffn=0.5'`)."),
    (["--no_train"], "--target latency distils every cut candidate from the base; drop --no_train."),
    (["--no_evaluate"], "--target latency compares every candidate's held-out metric with the base's; drop --no_evaluate."),
    (["--format", "bitmask"], "--target latency times ONNX Runtime graphs, not --format bitmask; drop --format or pass "
                              "--format onnx."),
    (["--qat"], "QAT"),
])
def test_target_latency_refusals_are_one_line_before_any_work(setup, extra, message, capsys):
    model, data, tmp = setup
    out = tmp / "refused"
    rc = main(["--model", model, "--dataset", data, "--output_dir", str(out), "--target", "latency", *extra, *FAST])
    assert rc == 2
    printed, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and printed == "" and not out.exists()
    if message == "QAT":  # the ONNX format's own refusal: ORT's run-time int8 has no QAT replay
        assert lines[0].startswith("hf-compress: error: ") and "--no_qat" in lines[0]
    else:
        assert lines[0] == "hf-compress: error: " + message


def test_user_candidate_the_family_cannot_cut_is_refused_but_the_default_list_skips_it():
    from family_configs import config_of

    from hf_compress.pipeline.plan import resolve_latency_candidates

    config = config_of("deberta_v2", conv_kernel_size=3)  # DeBERTa-v2's convolution is tied to the first block
    kept, skipped = resolve_latency_candidates(config, ModelArguments(target="latency"))
    assert [candidate_name(c) for c in kept] == ["none", "ffn=0.5", "ffn=0.25"]
    assert [name for name, _ in skipped] == ["ffn=0.25,layers=0.67"] and "conv_kernel_size" in skipped[0][1]
    with pytest.raises(CompressionInputError, match=r"^--latency_candidates layers=2: `layers` pruning is not supported"):
        resolve_latency_candidates(config, ModelArguments(target="latency", latency_candidates="none;layers=2"))


@pytest.fixture(scope="module")
def searched(setup):
    """One search on the tiny BERT: three candidates, a budget every candidate meets (so the fastest is kept)."""
    model, data, tmp = setup
    out = tmp / "searched"
    rc = main(["--model", model, "--dataset", data, "--output_dir", str(out), "--target", "latency",
               "--latency_candidates", "none;ffn=0.5;ffn=0.25,layers=0.5", "--max_accuracy_drop", "100",
               "--prune_calibration_batches", "2", *FAST])
    assert rc == 0
    with open(os.path.join(out, "compression_report.json")) as f:
        return out, json.load(f)


def test_target_latency_tries_every_candidate_and_writes_the_fastest(searched):
    import onnx

    out, report = searched
    search = report["pipeline"]["stages"]["latency_search"]
    rows = search["rows"]
    assert [r["candidate"] for r in rows] == ["none", "ffn=0.5", "ffn=0.25,layers=0.5"]
    assert all(r["within_budget"] for r in rows) and search["within_budget"] and search["not_tried"] == []
    fastest = min(rows, key=lambda r: r["latency_ms"])
    assert search["chosen"] == fastest["candidate"]
    for r in rows:
        assert r["latency_ms"] > 0 and r["latency_x_base"] == pytest.approx(r["latency_ms"] / search["base_pytorch_ms"], rel=1e-3)
    # the cut candidates were distilled for the run's steps from the base; `none` is the base as it is
    assert [r["train_steps"] for r in rows] == [0, 6, 6]
    assert [r["parameters"] for r in rows][0] > rows[1]["parameters"] > rows[2]["parameters"]
    # the written graph is the chosen candidate's: its FFN width and depth, int8, evaluated as the row says
    with open(os.path.join(out, "config.json")) as f:
        config = json.load(f)
    shapes = {"none": (128, 2), "ffn=0.5": (64, 2), "ffn=0.25,layers=0.5": (32, 1)}[search["chosen"]]
    assert (config["intermediate_size"], config["num_hidden_layers"]) == shapes
    graph = onnx.load(os.path.join(out, "model.onnx"))
    assert sum(n.op_type == "MatMulInteger" for n in graph.graph.node) > 0
    assert report["metrics"]["compressed"]["accuracy"] == fastest["value"]
    assert report["pipeline"]["stages"]["export"]["max_abs_logit_diff"] >= 0
    assert report["loaders"]["onnxruntime.InferenceSession (without hf_compress)"]["ok"]


def test_target_latency_card_shows_every_candidate_and_the_choice(searched):
    out, report = searched
    card = open(os.path.join(out, "README.md")).read()
    search = report["pipeline"]["stages"]["latency_search"]
    assert f"Chosen by `--target latency`: `{search['chosen']}`, the fastest of the candidates below within the budget" in card
    for r in search["rows"]:
        assert f"| {r['candidate']} | {r['value']:.4f} |" in card
    assert "| base (PyTorch) |" in card


def test_target_latency_stops_at_the_first_candidate_over_the_budget(setup, capsys):
    # A budget no candidate meets (the metric must rise 100 points): the first candidate is over, the cut ones are
    # not trained at all, the closest to the base is written and the guard says so plainly.
    model, data, tmp = setup
    out = tmp / "over"
    rc = main(["--model", model, "--dataset", data, "--output_dir", str(out), "--target", "latency",
               "--latency_candidates", "none;ffn=0.5", "--max_accuracy_drop", "-100", *FAST])
    assert rc == 0
    printed = capsys.readouterr().out
    with open(os.path.join(out, "compression_report.json")) as f:
        report = json.load(f)
    search = report["pipeline"]["stages"]["latency_search"]
    assert [r["candidate"] for r in search["rows"]] == ["none"] and search["not_tried"] == ["ffn=0.5"]
    assert search["chosen"] == "none" and not search["within_budget"]
    assert "train" not in report["pipeline"]["stages"] and "structured pruning" not in report["techniques"]
    assert report["quality_guard"].startswith("Quality guard: the result is far worse than the base")
    assert "Latency search (this machine):" in printed and report["quality_guard"] in printed
