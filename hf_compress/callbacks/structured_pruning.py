"""`StructuredPruningCallback`: remove FFN neurons, heads, hidden channels and blocks gradually during a Trainer run."""

from __future__ import annotations

import os

import torch
from transformers import TrainerCallback

from ..data.calibration import first_batches
from ..pruning.structured import (
    StructuredPlan,
    attach_structured_masks,
    check_batch,
    check_structures,
    cut_and_check,
    ffn_size,
    keep_for_parameter_budget,
    plan_masks,
    select_structures,
    structured_importance,
)
from ..pruning.structured_config import StructuredPruningArguments

REPORT_FILE = "structured_pruning.json"


def _dropped_in_order(scores: torch.Tensor, kept: list[int]) -> list[int]:
    """Indices not in `kept`, least important first (the order the gradual schedule masks them)."""
    kept_set = set(kept)
    order = torch.sort(scores.float(), stable=True).indices.tolist()
    return [i for i in order if i not in kept_set]


def partial_plan(plan: StructuredPlan, sizes: dict, fraction: float) -> StructuredPlan:
    """The plan that has dropped the first `fraction` of each dropped set (least important first): what the gradual
    schedule masks at that point. `sizes`: the full count of each structure."""
    fraction = min(max(fraction, 0.0), 1.0)

    def keep(full: int, kept: list[int], scores: torch.Tensor) -> list[int]:
        dropped = _dropped_in_order(scores, kept)
        gone = set(dropped[: round(fraction * len(dropped))])
        return [i for i in range(full) if i not in gone]

    out = StructuredPlan()
    if plan.ffn is not None:
        out.ffn = [keep(sizes["ffn"], k, s) for k, s in zip(plan.ffn, plan.scores["ffn"])]
    if plan.kv_groups is not None:
        out.kv_groups = [keep(sizes["heads"], k, s) for k, s in zip(plan.kv_groups, plan.scores["heads"])]
    if plan.hidden is not None:
        out.hidden = keep(sizes["hidden"], plan.hidden, plan.scores["hidden"])
    if plan.layers is not None:
        out.layers = keep(sizes["layers"], plan.layers, plan.scores["layers"])
    return out


def _structured_arguments(structures, keep: dict | None = None, **options) -> StructuredPruningArguments:
    """A gradual `StructuredPruningArguments` from the callback's keyword form: `keep` per structure becomes
    `prune_<structure>_keep`, every other option is its field's name without `prune_`."""
    fields = set(StructuredPruningArguments.__dataclass_fields__)
    if not isinstance(structures, str):
        structures = ",".join(structures)
    values = {"prune_structure": structures, "prune_schedule": "gradual"}
    named = [s.strip() for s in structures.split(",") if s.strip()]
    if keep is not None and set(keep) - set(named):
        raise ValueError(f"keep must name exactly the structures {named}, got {sorted(keep)}.")
    for structure, amount in (keep or {}).items():
        values[f"prune_{structure}_keep"] = amount
    values.update({f"prune_{name}": value for name, value in options.items()})
    unknown = sorted(name for name in values if name not in fields)
    if unknown:
        raise TypeError(
            f"StructuredPruningCallback got unknown options {unknown}; allowed: keep, "
            f"{', '.join(f.removeprefix('prune_') for f in sorted(fields) if not f.endswith('_keep'))}."
        )
    return StructuredPruningArguments(**values)


class StructuredPruningCallback(TrainerCallback):
    r"""
    Structured pruning during training: mask gradually, remove physically at the end.

    Changing parameter shapes mid-run would invalidate the optimizer's state (AdamW's moments are per-tensor, keyed
    by the parameter objects) and the learning-rate schedule's view of the model, so the structures are never
    removed during training. Instead, at `on_train_begin` the structures are scored on the first
    `calibration_batches` training batches ([`~hf_compress.pruning.structured_importance`]) and the final plan is
    fixed; from then on the dropped structures are masked, least important first, a growing share every
    `frequency` steps until `end_fraction` of training ([`~hf_compress.pruning.attach_structured_masks`]: exactly the
    computation of the pruned model), so the rest of the model adapts while they fade out. At `on_train_end` the
    masks are removed and the structures physically cut ([`~hf_compress.pruning.prune_structures`]): the model the
    Trainer then saves is the smaller one, and computes what the masked model computed.

    Args:
        args ([`StructuredPruningArguments`] or `str` or `list[str]`): the options (`prune_*`), or the structures
            (e.g. `"ffn,layers"`) with the options below as keywords.
        keep (`dict`, *optional*): kept fraction (float) or count (int > 1) per structure.
        target_params (`int`, *optional*): instead of `keep`, a parameter budget.
        calibration_batches (`int`, *optional*, defaults to `16`): 0 scores by weight magnitude.
        layer_metric (`str`, *optional*, defaults to `"cosine"`): `cosine` or `loss`.
        end_fraction (`float`, *optional*, defaults to `0.5`): share of `max_steps` by which all are masked.
        frequency (`int`, *optional*, defaults to `10`): optimizer steps between mask updates.

    The keywords are [`StructuredPruningArguments`]' fields without their `prune_` prefix (`keep` per structure);
    either way the options are checked by its `__post_init__`.

    After training, `callback.plan` holds the plan, the importance scores and the self-check's figures
    ([`~hf_compress.pruning.structured.check_structured_cut`]: pruned vs masked and reloaded vs masked on the first
    calibration batch; beyond the tolerance `on_train_end` raises and writes nothing); `on_train_end` also writes
    them to `output_dir/structured_pruning.json` on the main process.
    """

    def __init__(self, args, **options):
        # One construction path: keyword options become a `StructuredPruningArguments`, which checks them.
        if not isinstance(args, StructuredPruningArguments):
            args = _structured_arguments(args, **options)
        elif options:
            raise TypeError(
                f"StructuredPruningCallback takes a `StructuredPruningArguments` or the structures with keyword "
                f"options, not both (got {sorted(options)})."
            )
        if not args.enabled:
            raise ValueError("StructuredPruningCallback needs `prune_structure` (e.g. `\"ffn,layers\"`).")
        self.config = args
        self.structures = args.prune_structure
        self.keep = args.keep()
        self.target_params = args.prune_target_params
        self.calibration_batches = args.prune_calibration_batches
        self.layer_metric = args.prune_layer_metric
        self.end_fraction = args.prune_end_fraction
        self.frequency = args.prune_frequency
        self.plan: StructuredPlan | None = None
        self._sizes: dict = {}
        self._end_step = None
        self._check_batch: dict | None = None  # what the final cut is checked on
        self.history: list[tuple[int, float]] = []

    @classmethod
    def from_args(cls, args: StructuredPruningArguments) -> "StructuredPruningCallback":
        """The same as `StructuredPruningCallback(args)` (kept for older code)."""
        return cls(args)

    def fraction(self, step: int) -> float:
        """Share of the dropped structures masked after optimizer step `step` (linear, updated every `frequency`)."""
        if step >= self._end_step:
            return 1.0
        return (step - step % self.frequency) / self._end_step

    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        structures = check_structures(model, self.structures)
        keep = self.keep or keep_for_parameter_budget(model, structures, self.target_params)
        batches = None
        if self.calibration_batches and train_dataloader is not None:
            batches = first_batches(train_dataloader, self.calibration_batches)
        scores = structured_importance(model, batches, structures, self.layer_metric)
        self.plan = select_structures(model, scores, keep)
        self._check_batch = check_batch(model, batches)
        cfg = model.config
        self._sizes = {"ffn": ffn_size(model), "hidden": cfg.hidden_size, "layers": cfg.num_hidden_layers,
                       "heads": getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads}
        self._end_step = max(1, int(self.end_fraction * state.max_steps))
        self._apply(model, 0)

    def _apply(self, model, step):
        f = self.fraction(step)
        if self.history and self.history[-1][1] == f:
            return
        attach_structured_masks(model, plan_masks(model, partial_plan(self.plan, self._sizes, f)))
        self.history.append((step, f))

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.plan is not None:
            self._apply(model, state.global_step)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self.plan is None:
            return
        # The cut is checked against the fully masked model (and its reload): a wrong cut stops here, loudly.
        cut_and_check(model, self.plan, self._check_batch)
        if state.is_world_process_zero and args.output_dir:
            from ..atomic import write_json

            write_json(os.path.join(args.output_dir, REPORT_FILE), {"schedule": self.history, **self.plan.to_dict()})
