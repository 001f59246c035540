"""`StructuredPruningCallback`: remove FFN neurons, heads, hidden channels and blocks gradually during a Trainer run."""

from __future__ import annotations

import os

import torch
from transformers import TrainerCallback

from ..data.calibration import first_batches
from ..fsdp import any_dtensor, gathered_copy, unsharded, weighted_mean_over_ranks, world_size
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
PRUNED_DIR = "structured_pruned"  # under FSDP2: the cut model, written by rank 0 (the sharded one keeps its shapes)


def token_count(batch: dict) -> float:
    """The positions a batch adds to the activation means of `structured_importance` (attention mask sum, else all)."""
    mask = batch.get("attention_mask")
    if isinstance(mask, torch.Tensor):
        return float(mask.sum())
    ids = batch.get("input_ids")
    return float(ids.shape[0] * ids.shape[1]) if isinstance(ids, torch.Tensor) and ids.dim() >= 2 else 1.0


def importance_over_ranks(model, batches, structures, layer_metric: str) -> dict:
    """
    [`structured_importance`] of a model that may be sharded (FSDP2) or replicated (DDP) over ranks, the same on every
    rank: each rank scores its own calibration batches (the forward passes all-gather a sharded layer's weights as
    in training) and the per-rank means are combined weighted by their token counts, i.e. the means over every
    rank's batches ([`~hf_compress.fsdp.weighted_mean_over_ranks`]: exact for the activation sums; for
    `layer_metric="loss"` exact when every rank's batches hold the same number of tokens). The weight-magnitude
    scores (no batches) of a sharded model read the full weights inside [`~hf_compress.fsdp.unsharded`].
    """
    if batches is None:
        with unsharded(model):  # a no-op without FSDP modules; the full weights are the same on every rank
            return structured_importance(model, None, structures, layer_metric)
    scores = structured_importance(model, batches, structures, layer_metric)
    return weighted_mean_over_ranks(scores, sum(token_count(b) for b in batches))


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

    Under DDP and FSDP2 (`fully_shard`) every rank scores its own calibration batches and the scores are combined
    into the means over all of them, so every rank fixes the same plan (under DDP each rank then cuts its replica,
    rank 0 alone checking the reload). Under FSDP2 the masks are plain buffers and
    hooks on the sharded modules (they act on the activations, which FSDP never shards); at `on_train_end` the full
    state dict is gathered onto rank 0, which cuts an ordinary copy of the model ([`~hf_compress.fsdp.gathered_copy`]),
    checks it as above, keeps it as `callback.pruned_model` and writes it with `save_pretrained` to
    `output_dir/structured_pruned` (the sharded model itself keeps its shapes: a sharded parameter cannot be cut).
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
        if any(hasattr(p, "ds_id") for p in model.parameters()):  # DeepSpeed ZeRO-3 partitioned parameters
            raise ValueError(
                "`StructuredPruningCallback` cannot run under DeepSpeed ZeRO-3: its parameters are partitioned outside "
                "the forward, so neither weight-magnitude scores nor the final cut see whole weights; train with FSDP2 "
                "(`fully_shard`) or DDP, or prune the saved model with `structured_prune`."
            )
        structures = check_structures(model, self.structures)
        keep = self.keep or keep_for_parameter_budget(model, structures, self.target_params)
        batches = None
        if self.calibration_batches and train_dataloader is not None:
            batches = first_batches(train_dataloader, self.calibration_batches)
        scores = importance_over_ranks(model, batches, structures, self.layer_metric)
        self.plan = select_structures(model, scores, keep)
        self.pruned_model = None
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
        if world_size() > 1 or any_dtensor(model.parameters()):
            self._cut_across_ranks(args, model)
        else:
            cut_and_check(model, self.plan, self._check_batch)
        if state.is_world_process_zero and args.output_dir:
            from ..atomic import write_json

            write_json(os.path.join(args.output_dir, REPORT_FILE), {"schedule": self.history, **self.plan.to_dict()})

    def _cut_across_ranks(self, args, model):
        """DDP: every rank cuts its replica in place (rank 0 also checks the reload: `save_pretrained` writes on the
        main process only). FSDP2: rank 0 cuts and checks an unsharded copy of the gathered model and writes it.
        Every rank ends with rank 0's figures, or raises the first error of any rank (collective)."""
        import torch.distributed as dist

        from ..atomic import atomic_output_dir

        sharded = any_dtensor(model.parameters())
        target = gathered_copy(model) if sharded else model
        rank = dist.get_rank()
        outcome = None
        if target is not None:
            try:
                cut_and_check(target, self.plan, self._check_batch, reload=rank == 0)
                if sharded:
                    self.pruned_model = target
                    if args.output_dir:
                        with atomic_output_dir(os.path.join(args.output_dir, PRUNED_DIR)) as tmp:
                            target.save_pretrained(tmp)
                outcome = ("ok", self.plan.check)
            except Exception as err:  # every rank must leave this collective, with the same error
                outcome = ("error", err)
        outcomes = [None] * dist.get_world_size()
        dist.all_gather_object(outcomes, outcome)
        errors = [value for kind, value in filter(None, outcomes) if kind == "error"]
        if errors:
            raise errors[0]
        self.plan.check = outcomes[0][1]
