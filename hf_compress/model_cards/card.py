"""The model card of a compressed checkpoint, built from its compression report.

Metadata goes through `huggingface_hub.ModelCardData` and `EvalResult` (never hand-written YAML); the body is
the Jinja template `template.md` shipped in this package.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import os

import yaml

PLOT_NAME = "accuracy_vs_size.png"
# The relations the Hub knows (https://huggingface.co/docs/hub/model-cards#specifying-a-base-model).
BASE_MODEL_RELATIONS = ("adapter", "merge", "quantized", "finetune")


def base_model_relation(report: dict) -> str:
    """
    `quantized` when the checkpoint holds quantized weights, else `finetune`.

    The Hub has no `pruned` or `distilled` relation: a pruned or distilled checkpoint is the base model's weights
    changed by training, which is what `finetune` means in the model tree; a quantized one keeps the base
    weights at lower precision, so quantization wins when both were applied.
    """
    return "quantized" if report.get("quantization") else "finetune"


def format_tags(report: dict) -> list[str]:
    """Hub tags of the format actually written: the `tags` of the format of the saved `quantization_config`
    ([`hf_compress.formats.quantization_format`]: `bitsandbytes` with `8-bit` / `4-bit`, or `compressed-tensors`),
    nothing for dense or bitmask weights."""
    from ..formats import quantization_format

    quant = report.get("quantization") or {}
    if not quant:
        return []
    fmt = quantization_format(quant.get("quantization_config"))
    # A method no format of ours writes (a checkpoint quantized elsewhere) gets no format tag.
    return fmt.tags(quant) if fmt.name == quant.get("method") else []


def _fmt_bytes(n) -> str:
    return "n/a" if n is None else f"{n / 1e6:.1f} MB"


def _fmt(v, digits=4) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def _metric_names(report: dict) -> list[str]:
    names = []
    for m in (report["metrics"].get("compressed") or {}, report["metrics"].get("base") or {}):
        names += [k for k, v in m.items() if k != "num_examples" and isinstance(v, (int, float)) and k not in names]
    return names


def plot_accuracy_vs_size(variants: list[dict], path: str, metric: str = "accuracy") -> str:
    """
    Scatter of `metric` against weights-on-disk size, one labelled point per variant (matplotlib, Agg backend).

    Args:
        variants (`list[dict]`): `{"name", "weights_bytes", "metrics": {metric: value}}` each.
        path (`str`): PNG to write.
        metric (`str`, defaults to `"accuracy"`): which metric goes on the y axis.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [(v["name"], v["weights_bytes"] / 1e6, v["metrics"][metric]) for v in variants if metric in (v.get("metrics") or {})]
    if len(points) < 2:
        raise ValueError(f"An accuracy-vs-size plot needs at least 2 variants with `{metric}`, got {len(points)}.")
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=100)
    for name, mb, value in points:
        ax.scatter([mb], [value], s=40)
        ax.annotate(name, (mb, value), textcoords="offset points", xytext=(5, 5), fontsize=9)
    ax.set_xlabel("weights on disk (MB)")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} against size")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _recipe_dict(recipe) -> dict:
    if dataclasses.is_dataclass(recipe):
        return dataclasses.asdict(recipe)
    if not isinstance(recipe, dict):
        raise ValueError(f"recipe must be a dict (or dataclass) of the compression arguments, got {type(recipe).__name__}.")
    out = {}
    for k, v in recipe.items():
        out[k] = _recipe_dict(v) if dataclasses.is_dataclass(v) or isinstance(v, dict) else v
    return out


def _plain(value):
    """YAML-safe copy (tuples to lists, unknown objects to str)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def build_model_card(
    report: dict,
    recipe,
    command: str,
    *,
    repo_id: str | None = None,
    model_name: str | None = None,
    output_dir: str | None = None,
    license: str | None = None,
    tags: list[str] | None = None,
    datasets: list[str] | None = None,
    pipeline_tag: str | None = "text-classification",
    summary: str | None = None,
):
    """
    Build the model card of a compressed checkpoint.

    Args:
        report (`dict`): from `build_report` (or `load_report(folder)`).
        recipe (`dict` or dataclass): every compression argument used (pruning, quantization, distillation,
            training); shown verbatim in the card.
        command (`str`): the exact command line that reproduces the checkpoint.
        repo_id (`str`, *optional*): where it will live on the Hub (used in the usage snippet and as the name).
        model_name (`str`, *optional*): the name in `model-index`; defaults to `repo_id`'s name.
        output_dir (`str`, *optional*): the checkpoint folder; the accuracy-vs-size plot is written there
            (`accuracy_vs_size.png`) and embedded when there is more than one variant.
        license (`str`, *optional*): a Hub license id, e.g. `apache-2.0`.
        tags (`list[str]`, *optional*): extra tags; `hf-compress`, the techniques and the format's tags
            ([`card_tags`]) are always added.
        datasets (`list[str]`, *optional*): Hub dataset ids; defaults to the report's `eval.dataset`.
        pipeline_tag (`str`, *optional*, defaults to `"text-classification"`).
        summary (`str`, *optional*): a first paragraph.

    Returns:
        `huggingface_hub.ModelCard`: save it with `card.save(os.path.join(folder, "README.md"))`.
    """
    from huggingface_hub import ModelCard

    from .loading import usage_snippet

    if not isinstance(command, str) or not command.strip():
        raise ValueError(f"command must be the non-empty command line that reproduces the checkpoint, got {command!r}.")
    if "metrics" not in report or "size" not in report:
        raise ValueError("report is not a compression report (no `metrics`/`size`); build it with `build_report`.")
    recipe = _plain(_recipe_dict(recipe))
    name = model_name or (repo_id.split("/")[-1] if repo_id else "compressed-model")
    base_id = report.get("base_model")
    metric_names = _metric_names(report)
    techniques = list(report.get("techniques") or [])
    card_data = _card_data(report, name, metric_names, license=license, tags=tags, datasets=datasets,
                           pipeline_tag=pipeline_tag)
    plot_file = _write_plot(report, metric_names, output_dir)
    weight_files = report["size"].get("compressed_weight_files") or []
    usage = usage_snippet(report, repo_id or name, weight_files, folder=output_dir)
    template = importlib.resources.files("hf_compress.model_cards").joinpath("template.md").read_text(encoding="utf-8")
    card = ModelCard.from_template(
        card_data,
        template_str=template,
        model_name=name,
        summary=summary or f"A compressed `{report.get('architecture', 'model')}`: {', '.join(techniques) or 'compressed'}.",
        base_model=base_id,
        base_model_url=f"https://huggingface.co/{base_id}" if base_id and not os.path.isabs(base_id) else base_id,
        techniques_text=", ".join(techniques) if techniques else "compression",
        eval_text=_eval_text(report),
        metric_names=metric_names,
        table=_size_table(report, metric_names),
        plot_file=plot_file,
        quantization=report.get("quantization"),
        loaders=report.get("loaders"),
        self_checks=self_check_rows(report),
        serving=report.get("serving"),
        sparsest_layers=_sparsest_layers(report),
        global_sparsity=_fmt(report["sparsity"].get("global")),
        linear_sparsity=_fmt(report["sparsity"].get("linear_weights")),
        recipe_yaml=yaml.safe_dump(recipe, sort_keys=False),
        command=command.strip(),
        usage=usage,
    )
    validate_card_metadata(card)
    return card


def _card_data(report: dict, name: str, metric_names: list[str], *, license, tags, datasets, pipeline_tag):
    """The card's metadata (`huggingface_hub.ModelCardData`, with `model-index` from [`_eval_results`])."""
    from huggingface_hub import ModelCardData

    base_id = report.get("base_model")
    dataset_id = (report.get("eval") or {}).get("dataset")
    return ModelCardData(
        base_model=base_id,
        base_model_relation=base_model_relation(report) if base_id else None,
        library_name="transformers",
        license=license,
        tags=card_tags(report, tags),
        datasets=list(datasets) if datasets else ([dataset_id] if dataset_id else None),
        metrics=metric_names or None,
        pipeline_tag=pipeline_tag,
        model_name=name,
        eval_results=_eval_results(report, metric_names) or None,
    )


def card_tags(report: dict, extra: list[str] | None = None) -> list[str]:
    """The card's Hub tags: `hf-compress`, the report's techniques, the [`format_tags`] of the format actually
    written (so a compressed-tensors checkpoint is tagged `compressed-tensors`, never `bitsandbytes`), then the
    `extra` tags not already there."""
    tags = ["hf-compress"] + [t for t in report.get("techniques") or [] if t] + format_tags(report)
    for t in extra or []:
        if t not in tags:
            tags.append(t)
    return tags


def _eval_results(report: dict, metric_names: list[str]) -> list:
    """`model-index` entries: the compressed model's metrics, then the base model's under a name that says whose."""
    from huggingface_hub import EvalResult

    ev = report.get("eval") or {}
    dataset_id = ev.get("dataset")
    if not dataset_id:
        return []
    base_id = report.get("base_model")
    common = dict(
        task_type=ev.get("task", "text-classification"),
        dataset_type=dataset_id,
        dataset_name=ev.get("dataset_name", dataset_id),
        dataset_split=ev.get("split"),
        dataset_config=ev.get("config"),
    )
    results = []
    for m in metric_names:
        value = (report["metrics"].get("compressed") or {}).get(m)
        if value is not None:
            results.append(EvalResult(metric_type=m, metric_value=float(value), metric_name=m.capitalize(), **common))
    # `model-index` has one entry per card on the Hub (huggingface_hub writes a single model name), so the
    # base model's score sits beside ours under a name that says whose it is, for comparison.
    for m in metric_names:
        value = (report["metrics"].get("base") or {}).get(m)
        if value is not None:
            results.append(EvalResult(
                metric_type=m, metric_value=float(value),
                metric_name=f"{m.capitalize()} of the base model{f' {base_id}' if base_id else ''} (before compression)",
                **common,
            ))
    return results


def _write_plot(report: dict, metric_names: list[str], output_dir: str | None) -> str | None:
    """Writes the accuracy-vs-size plot into `output_dir` when there is more than one variant; returns its name."""
    variants = [v for v in report.get("variants") or [] if metric_names and metric_names[0] in (v.get("metrics") or {})]
    if output_dir is None or len(variants) <= 1:
        return None
    plot_accuracy_vs_size(variants, os.path.join(output_dir, PLOT_NAME), metric_names[0])
    return PLOT_NAME


def _size_table(report: dict, metric_names: list[str]) -> list[dict]:
    """The card's base-against-compressed table: one row per model, every figure formatted."""
    size, params, nnz = report["size"], report["parameters"], report["nonzeros"]
    base_id = report.get("base_model")
    bpw = report.get("bits_per_weight") or {}
    base_m, comp_m = report["metrics"].get("base") or {}, report["metrics"].get("compressed") or {}
    table = []
    if size.get("base_weights_bytes") is not None:
        table.append(dict(
            name=f"base{f' (`{base_id}`)' if base_id else ''}", size=_fmt_bytes(size["base_weights_bytes"]), ratio="1.00x",
            params=_fmt(params.get("base")), nonzeros=_fmt(nnz.get("base")),
            sparsity=_fmt(report["sparsity"].get("base_global")), bits=_fmt(size.get("base_bits_per_weight_on_disk"), 2),
            metrics=[_fmt(base_m.get(m)) for m in metric_names],
        ))
    table.append(dict(
        name="compressed (this repo)", size=_fmt_bytes(size["compressed_weights_bytes"]),
        ratio=f"{size['ratio']:.2f}x" if size.get("ratio") else "n/a",
        params=_fmt(params.get("compressed")), nonzeros=_fmt(nnz.get("compressed")),
        sparsity=_fmt(report["sparsity"].get("global")), bits=_fmt(bpw.get("on_disk"), 2),
        metrics=[_fmt(comp_m.get(m)) for m in metric_names],
    ))
    return table


def _sparsest_layers(report: dict) -> list[tuple[str, str]] | None:
    """The ten sparsest layers (all of them when ten or fewer; else the five sparsest and the five densest), or
    `None` when no layer has a zero."""
    per_layer = {k: v for k, v in (report["sparsity"].get("per_layer") or {}).items() if v is not None}
    ranked = sorted(per_layer.items(), key=lambda kv: -kv[1])
    shown = ranked if len(ranked) <= 10 else ranked[:5] + ranked[-5:]
    return [(k, f"{v:.4f}") for k, v in shown] if any(v > 0 for v in per_layer.values()) else None


def _eval_text(report: dict) -> str:
    """Where the metrics come from: dataset, split and number of examples."""
    ev = report.get("eval") or {}
    base_m, comp_m = report["metrics"].get("base") or {}, report["metrics"].get("compressed") or {}
    n_eval = comp_m.get("num_examples") or base_m.get("num_examples")
    split = ev.get("split")
    text = "`{}`".format(ev.get("dataset_name", ev.get("dataset") or "the evaluation data"))
    text += f", split `{split}`" if split else ""
    text += f", {n_eval} examples" if n_eval else ""
    return text + ", the same rows for the base and the compressed model"


def self_check_rows(report: dict) -> list[dict]:
    """The pruning self-checks of the report's stages (`pipeline.stages.<stage>.check`): one row per figure, e.g.
    `pruned vs masked` or `reloaded vs permanent`, relative to the logit scale."""
    stages = (report.get("pipeline") or {}).get("stages") or {}
    rows = []
    for stage, record in stages.items():
        check = record.get("check") if isinstance(record, dict) else None
        if not isinstance(check, dict):
            continue
        for key, value in check.items():
            if "_vs_" in key and isinstance(value, (int, float)):
                rows.append(dict(stage=stage.replace("_", " "), compared=key.replace("_", " "), diff=f"{value:.3g}",
                                 scale=f"{check['logit_scale']:.3g}", tolerance=f"{check['tolerance']:g}"))
    return rows


def validate_card_metadata(card) -> None:
    """
    Check a card's metadata offline, as `huggingface_hub` parses it and as the Hub requires it: the YAML
    round-trips through `ModelCard` with `ignore_metadata_errors=False`, `model-index` parses back into the same
    `EvalResult`s, `base_model_relation` is one the Hub knows and comes with `base_model`, and list fields are
    lists of strings. (`card.validate()` asks the Hub itself and needs the network.)

    Raises:
        `ValueError`: naming the first problem found.
    """
    from huggingface_hub import ModelCard

    reparsed = ModelCard(str(card), ignore_metadata_errors=False)
    data = reparsed.data.to_dict()
    relation = data.get("base_model_relation")
    if relation is not None and relation not in BASE_MODEL_RELATIONS:
        raise ValueError(f"base_model_relation must be one of {BASE_MODEL_RELATIONS}, got {relation!r}.")
    if relation is not None and not data.get("base_model"):
        raise ValueError("base_model_relation is set but base_model is not; pass the base model's Hub id.")
    for key in ("tags", "datasets", "metrics"):
        value = data.get(key)
        if value is not None and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            raise ValueError(f"{key} must be a list of strings, got {value!r}.")
    if data.get("library_name") is not None and not isinstance(data["library_name"], str):
        raise ValueError(f"library_name must be a string, got {data['library_name']!r}.")
    before = [(r.metric_type, r.metric_value, r.metric_name) for r in (card.data.eval_results or [])]
    after = [(r.metric_type, r.metric_value, r.metric_name) for r in (reparsed.data.eval_results or [])]
    if before != after:
        raise ValueError(f"model-index does not round-trip: wrote {before}, read back {after}.")


def write_model_card(folder: str, recipe, command: str, report: dict | None = None, **kwargs):
    """Build the card of the checkpoint in `folder` (its `compression_report.json` unless `report` is given), write
    the plot there and save `README.md`. Returns the card."""
    from .report import load_report

    report = report if report is not None else load_report(folder)
    card = build_model_card(report, recipe, command, output_dir=folder, **kwargs)
    card.save(os.path.join(folder, "README.md"))
    return card
